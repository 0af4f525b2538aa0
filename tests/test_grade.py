"""Grading: the Python API on a tiny random model, files in and out (resume, bad rows, atomic rewrite), the script's
one-line errors."""

import csv
import json

import pytest

from gemma_lowmem.errors import UserError
from gemma_lowmem.evaluation.rubric import CRITERIA
from gemma_lowmem.grading import Grade, grade, grade_file, grading_prompts, read_grading_input
from gemma_lowmem.tasks.summary_eval import evaluation_prompt
from tests.tiny import tiny_gemma3, tiny_tokenizer

ARTICLE = "The city opened a new library on Monday. It has 20,000 books. The mayor spoke at the opening."
SLOTS = {"comment": 3, "feedback": 3, "suggestions": 3}


def _rows(n: int, reference: bool = True) -> list[dict]:
    return [{"id": f"s{i}", "article": ARTICLE, "summary": "A library opened." * (i % 2),
             **({"reference": "A new library opened."} if reference else {})} for i in range(n)]


@pytest.mark.parametrize("mode", ["guided", "scores"])
def test_grade_gives_every_score_with_and_without_a_reference(mode, monkeypatch):
    monkeypatch.setattr("gemma_lowmem.evaluation.guided.SLOT_TOKENS", SLOTS)
    rows = _rows(2) + _rows(1, reference=False)
    grades = grade(tiny_gemma3(), tiny_tokenizer(), rows, mode=mode, batch_size=2, show_progress=False)
    assert [g.id for g in grades] == ["s0", "s1", "s0"]
    for g in grades:
        assert g.valid and g.mode == mode and set(g.scores) == set(CRITERIA)
        assert g.total == sum(g.scores.values())
        assert all(0 <= g.expected[k] <= CRITERIA[k][0] for k in CRITERIA)
        columns = g.columns()
        assert columns["total"] == g.total and {f"{k}_expected" for k in CRITERIA} <= set(columns)


def test_a_row_without_reference_gets_a_request_without_a_reference_section():
    with_ref = evaluation_prompt(ARTICLE, "S.", "A new library opened.", "ko")[-1]["content"]
    without = evaluation_prompt(ARTICLE, "S.", None, "ko")[-1]["content"]
    assert "참고 요약:\n" in with_ref and "참고 요약:\n" not in without
    assert evaluation_prompt(ARTICLE, "S.", "", "en")[-1]["content"] == evaluation_prompt(
        ARTICLE, "S.", None, "en")[-1]["content"]
    prompts = grading_prompts(tiny_tokenizer(), _rows(1, reference=False), lang="en", max_article_length=2000,
                              system_role=False)
    assert "Reference summary" not in prompts[0] and ARTICLE in prompts[0]


def _fake_grades(rows):
    return [Grade(id=r["id"], valid=True, total=50, expected_total=50.5, scores=dict.fromkeys(CRITERIA, 1),
                  expected=dict.fromkeys(CRITERIA, 1.25), comments=dict.fromkeys(CRITERIA), feedback="ok",
                  suggestions="- more", answer="text", mode="guided") for r in rows]


def _write_csv(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["id", "article", "summary", "reference"])
        writer.writeheader()
        writer.writerows(rows)


def test_file_grading_skips_bad_rows_resumes_and_keeps_the_format(tmp_path):
    src, out = tmp_path / "in.csv", tmp_path / "out.csv"
    rows = _rows(5)
    rows[2]["article"] = ""  # bad: named by row and field
    rows[3]["id"] = ""  # no id: row-4
    _write_csv(src, rows)
    calls = []

    def interrupted(batch):
        calls.append(len(batch))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return _fake_grades(batch)

    data = read_grading_input(src, out)
    assert data.bad_rows.count == 1 and "row 3: field 'article'" in data.bad_rows.reasons[0]
    assert [r["id"] for r in data.rows] == ["s0", "s1", "row-4", "s4"]
    with pytest.raises(KeyboardInterrupt):
        grade_file(data, out, interrupted, batch_size=2, show_progress=False)
    with open(out, encoding="utf-8") as f:
        first = list(csv.DictReader(f))
    assert [r["id"] for r in first] == ["s0", "s1"] and first[0]["total"] == "50"  # the finished batch survived
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]

    resumed = read_grading_input(src, out)
    assert [r["id"] for r in resumed.todo] == ["row-4", "s4"]
    summary = grade_file(resumed, out, _fake_grades, batch_size=2, show_progress=False)
    assert (summary.graded, summary.resumed) == (2, 2)
    with open(out, encoding="utf-8") as f:
        final = list(csv.DictReader(f))
    assert [r["id"] for r in final] == ["s0", "s1", "row-4", "s4"]
    assert {"coverage", "coverage_expected", "coverage_comment", "feedback", "answer"} <= set(final[0])


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_other_formats_round_trip(tmp_path, suffix):
    pytest.importorskip("pyarrow") if suffix == ".parquet" else None
    src, out = tmp_path / f"in{suffix}", tmp_path / f"out{suffix}"
    if suffix == ".jsonl":
        src.write_text("".join(json.dumps(r) + "\n" for r in _rows(3)), encoding="utf-8")
    else:
        import pandas as pd

        pd.DataFrame(_rows(3)).to_parquet(src)
    grade_file(read_grading_input(src, out), out, _fake_grades, show_progress=False)
    assert read_grading_input(src, out).todo == []


def test_input_errors_are_one_line_user_errors(tmp_path):
    src = tmp_path / "in.csv"
    _write_csv(src, _rows(1))
    with pytest.raises(UserError, match="input's format"):
        read_grading_input(src, tmp_path / "out.jsonl")
    other = tmp_path / "other.csv"
    _write_csv(other, _rows(1))
    with pytest.raises(UserError, match="not a grading output"):
        read_grading_input(src, other)
    empty = tmp_path / "empty.csv"
    _write_csv(empty, [{"id": "x", "article": "", "summary": "s", "reference": ""}])
    with pytest.raises(UserError, match="no row to grade"):
        read_grading_input(empty, tmp_path / "o.csv")


def test_script_checks_its_arguments_before_loading_a_model(tmp_path):
    from scripts.grade import main

    with pytest.raises(UserError, match="--input needs --output"):
        main(["--input", str(tmp_path / "x.csv")])
    with pytest.raises(UserError, match="ARTICLE SUMMARY"):
        main(["--text", "only one"])
    with pytest.raises(UserError, match="no such file"):
        main(["--input", str(tmp_path / "missing.csv"), "--output", str(tmp_path / "o.csv")])
    with pytest.raises(UserError, match="not an adapter folder"):
        main(["--text", "a", "b", "--adapter", str(tmp_path)])
