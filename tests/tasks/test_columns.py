"""``--columns FIELD=COLUMN`` for every task's loader: a file with its own column names loads exactly like the same
rows under the task's names, and a missing field's error says how to map it."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gemma_lowmem.config import DataConfig
from gemma_lowmem.errors import UserError
from gemma_lowmem.tasks import essay, essay_write, preference, summary_eval, topic
from gemma_lowmem.tasks.summary_eval import DEMO_FILE

ARTICLES = [json.loads(line) for line in DEMO_FILE.read_text(encoding="utf-8").splitlines()[:4]]


@dataclass(frozen=True)
class Case:
    """A task's loader, rows under the task's field names, and the data's own names for those fields."""

    load: Any
    rows: list[dict[str, Any]]
    renames: dict[str, str]  # task field -> the data's column
    first_missing: str  # the field the loader reports first when nothing is mapped


CASES = {
    "summary_eval": Case(summary_eval.load_data,
                         [{"article": r["article"], "highlights": r["highlights"]} for r in ARTICLES],
                         {"article": "text", "highlights": "reference"}, "article"),
    "topic": Case(topic.load_data,
                  [{"text": r["article"][:300], "label": i % 4} for i, r in enumerate(ARTICLES)],
                  {"text": "body", "label": "category"}, "label"),
    "essay": Case(essay.load_data,
                  [{"essay": f"Essay number {i}. " + r["article"][:400], "score": 1 + i, "score_min": 1,
                    "score_max": 6} for i, r in enumerate(ARTICLES)],
                  {"essay": "response", "score": "grade"}, "essay"),
    "essay_write": Case(essay_write.load_data, [{"article": r["article"]} for r in ARTICLES],
                        {"article": "story"}, "article"),
    "preference": Case(preference.load_pairs,
                       [{"prompt": f"Question {i}: why is the sky blue?", "chosen": f"Because of scattering ({i}).",
                         "rejected": f"It is not ({i})."} for i in range(4)],
                       {"prompt": "question", "chosen": "good", "rejected": "bad"}, "chosen"),
}


def write(path: Path, rows: list[dict[str, Any]]) -> Path:
    """Rows as JSONL, CSV (a teacher's spreadsheet: every value text) or Parquet, by the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".csv":
        with path.open("w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    elif path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def renamed(rows: list[dict[str, Any]], renames: dict[str, str]) -> list[dict[str, Any]]:
    return [{renames.get(k, k): v for k, v in row.items()} for row in rows]


def load(case: Case, task: str, path: Path, columns: dict[str, str] | None = None):
    # The same file trains and validates: no held-out draw, so two loads compare row for row.
    return case.load(DataConfig(task=task, train_file=str(path), val_file=str(path), columns=columns or {},
                                max_article_length=5000))


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
@pytest.mark.parametrize("task", CASES)
def test_mapped_columns_load_like_the_task_names(task, suffix, tmp_path):
    case = CASES[task]
    # The same file name in two folders: summary_eval derives row ids from it.
    expected = load(case, task, write(tmp_path / "ours" / f"data{suffix}", case.rows))
    theirs = write(tmp_path / "theirs" / f"data{suffix}", renamed(case.rows, case.renames))
    got = load(case, task, theirs, case.renames)
    assert (got.train, got.val) == (expected.train, expected.val)
    assert len(got.train) == len(case.rows)


@pytest.mark.parametrize("task", CASES)
def test_a_missing_field_names_the_columns_flag(task, tmp_path):
    case = CASES[task]
    theirs = write(tmp_path / "theirs.csv", renamed(case.rows, case.renames))
    field = case.first_missing
    with pytest.raises(UserError, match=f"--columns {field}=YOUR_COLUMN") as err:
        load(case, task, theirs)
    assert "theirs.csv" in str(err.value) and f"'{field}'" in str(err.value)
    # a mapping to a column the file lacks says so
    wrong = {**case.renames, field: "no_such_column"}
    with pytest.raises(UserError, match=f"--columns {field}=no_such_column names a column this row lacks"):
        load(case, task, theirs, wrong)


@pytest.mark.parametrize("task", CASES)
def test_a_mapping_to_a_field_the_task_never_reads_is_refused(task, tmp_path):
    case = CASES[task]
    path = write(tmp_path / "data.jsonl", case.rows)
    with pytest.raises(UserError, match=f"--columns colour=hue: task '{task}' reads no such field; its fields: "):
        load(case, task, path, {"colour": "hue"})


def test_mapped_fields_win_over_a_column_of_the_same_name_and_the_demo_keeps_its_own(tmp_path):
    """A file with both ``text`` (unused) and ``summary`` (the reference): the mapping picks ``summary``; the
    bundled demo set, which has the task's names, loads the same with or without a mapping."""
    rows = [{"article": r["article"], "highlights": "stale", "summary": r["highlights"]} for r in ARTICLES]
    got = load(CASES["summary_eval"], "summary_eval", write(tmp_path / "t.jsonl", rows), {"highlights": "summary"})
    assert [r["highlights"] for r in got.train] == [summary_eval.clean_reference(r["highlights"]) for r in ARTICLES]
    demo = summary_eval.load_data(DataConfig(demo=True))
    mapped = summary_eval.load_data(DataConfig(demo=True, columns={"article": "text"}))
    assert (mapped.train, mapped.val) == (demo.train, demo.val)


def test_hub_rows_are_mapped_too(monkeypatch, tmp_path):
    """A hub set with other column names (e.g. XSum's document/summary), through the real load_hub_records."""
    datasets = pytest.importorskip("datasets")
    case = CASES["summary_eval"]
    hub_rows = renamed(case.rows, {"article": "document", "highlights": "summary"})
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config, split: list(hub_rows))
    got = summary_eval.load_data(DataConfig(data="someone/xsum-like", max_article_length=5000,
                                            columns={"article": "document", "highlights": "summary"}))
    local = load(case, "summary_eval", write(tmp_path / "data.jsonl", case.rows))
    texts = [(r["article"], r["highlights"]) for r in local.train]
    assert [(r["article"], r["highlights"]) for r in got.train] == texts  # the train split
    assert [(r["article"], r["highlights"]) for r in got.val] == texts  # the validation split (the same rows here)
    with pytest.raises(UserError, match="field 'article' is missing or empty; if your data calls it otherwise, "
                                        "map it: --columns article=YOUR_COLUMN"):
        summary_eval.load_data(DataConfig(data="someone/xsum-like"))
    pairs = renamed(CASES["preference"].rows, CASES["preference"].renames)
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config, split: list(pairs))
    got = preference.load_pairs(DataConfig(task="preference", data="someone/pairs",
                                           columns=CASES["preference"].renames))
    assert [r["chosen"] for r in got.train] == [r["chosen"] for r in CASES["preference"].rows]
