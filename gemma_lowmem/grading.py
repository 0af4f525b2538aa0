"""Grade rows with a trained evaluator of a rubric task: each row's fields (and an optional id) -> a grade.

The task says what a row holds and how to ask for its grade (``Task.request``) and the rubric the answer follows
(``Task.rubric``): ``summary_eval`` grades student summaries (article, summary, optional reference), ``essay``
grades essays (essay, optional prompt), and so does any registered task with both.

:func:`grade` is the Python API; :func:`grade_file` is what ``scripts/grade.py`` does with a CSV, XLSX, JSONL,
JSON or Parquet file: read it with :func:`~gemma_lowmem.data.records.read_rows` (bad rows, a JSONL line that is not JSON
among them, named by row or line and field, skipped and counted), skip the ids already graded in the output
(resume), grade the rest batch by batch and after every batch rewrite the output in the input's format through a
temporary file and a rename, so an interrupted run never leaves a half-written file and loses at most one batch.

``columns`` (``--columns FIELD=COLUMN``) reads a field from a column of another name, as in training
(:func:`~gemma_lowmem.data.records.apply_columns`): ``{"article": "text"}`` grades a teacher's file of summaries
with columns ``text``, ``summary``, ``reference``. The output keeps the user's names (``text``, not ``article``),
except for a column named like one of the grade's own (``answer``, ``total``, ...), which keeps the field's name; the
ids of an earlier output are read from the same column, so a resume needs the same ``--columns``.

A summary without a reference is graded with a request that compares the summary with the article alone and shows
no reference section (:func:`~gemma_lowmem.tasks.summary_eval.evaluation_prompt`); training shows such requests in
``data.no_reference_share`` of its conversations.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from gemma_lowmem.config import DataConfig, ModelConfig, read_config_file
from gemma_lowmem.data.records import (
    BadRows,
    Columns,
    apply_columns,
    check_columns,
    missing_field,
    read_records,
    read_rows,
    warn_unmatched,
)
from gemma_lowmem.data.tokenize import render
from gemma_lowmem.errors import UserError
from gemma_lowmem.evaluation.guided import MODES, Decoding, RubricAnswer, rubric_answers
from gemma_lowmem.evaluation.rubric import RubricSpec
from gemma_lowmem.model import float_weight_cache
from gemma_lowmem.tasks import Request, Task, get_task, task_names


def grading_task(name: str) -> Task:
    """The task ``name`` when grading serves it: it has a rubric and a request (``Task.request``).

    Raises:
        UserError: an unknown task, or one without both (the message lists the tasks grading serves).
    """
    task = get_task(name)
    if task.rubric is None or task.request is None:
        served = [n for n in task_names() if (t := get_task(n)).rubric is not None and t.request is not None]
        raise UserError(f"--task {name}: grading needs a task with a rubric and a request prompt; these have both: "
                        f"{', '.join(served)}")
    return task


def grade_columns(spec: RubricSpec) -> tuple[str, ...]:
    """The output's own columns, after the input fields: :meth:`Grade.columns` in its order, for ``spec``."""
    per_criterion = (c for key in spec.criteria for c in (key, f"{key}_expected", f"{key}_comment"))
    return ("total", "expected_total", *per_criterion, "feedback", "suggestions", "answer", "valid", "mode")


@dataclass
class Grade:
    """One graded row.

    Attributes:
        id: the row's id (its own, else ``row-N``, N counted from 1 in file order).
        valid: the answer holds every score (always, in ``guided``/``scores`` mode).
        total: the sum of the criteria's scores (None when the free answer is not valid).
        expected_total: the sum of the criteria's expected scores (``guided``/``scores``; else None).
        scores: criterion of the task's rubric -> integer score (None when not valid).
        expected: criterion -> expected score ``sum p(s) * s`` (``guided``/``scores``; else None).
        comments: criterion -> its one-line comment (None when there is none).
        feedback: the overall feedback (None when there is none).
        suggestions: the suggestions (None when there are none).
        answer: the whole answer, as the model's format writes it.
        mode: the decoding mode.
    """

    id: str
    valid: bool
    total: int | None
    expected_total: float | None
    scores: dict[str, int | None]
    expected: dict[str, float | None]
    comments: dict[str, str | None]
    feedback: str | None
    suggestions: str | None
    answer: str
    mode: str

    @classmethod
    def from_answer(cls, row_id: str, answer: RubricAnswer, mode: str) -> Grade:
        """The grade of one :class:`~gemma_lowmem.evaluation.guided.RubricAnswer`."""
        result = answer.result
        assert result is not None, "rubric_answers parses every answer"

        def whole(x: float | None) -> int | None:
            return int(x) if result.valid and x is not None and float(x).is_integer() else None

        return cls(
            id=row_id, valid=result.valid, total=whole(result.total), expected_total=answer.expected_total,
            scores={key: whole(value) for key, value in result.scores.items()},
            expected={key: answer.readings[key].expected if key in answer.readings else None for key in result.scores},
            comments=dict(result.comments), feedback=result.feedback, suggestions=result.suggestions,
            answer=answer.text, mode=mode,
        )

    def columns(self) -> dict[str, Any]:
        """Flat output columns: ``total``, ``expected_total``, per criterion ``<key>``, ``<key>_expected`` and
        ``<key>_comment``, then ``feedback``, ``suggestions``, ``answer``, ``valid``, ``mode``."""
        out: dict[str, Any] = {"total": self.total, "expected_total": _round(self.expected_total)}
        for key in self.scores:
            out |= {key: self.scores[key], f"{key}_expected": _round(self.expected[key]),
                    f"{key}_comment": self.comments[key]}
        return out | {"feedback": self.feedback, "suggestions": self.suggestions, "answer": self.answer,
                      "valid": self.valid, "mode": self.mode}


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def row_id(row: Mapping[str, Any], number: int) -> str:
    """A row's id: its ``id`` field, else ``row-<number>`` (1-based position in the file: stable for a resume)."""
    value = row.get("id")
    return str(value) if value not in (None, "") else f"row-{number}"


def grading_prompts(tokenizer: Any, rows: Sequence[Mapping[str, Any]], data: DataConfig, *, system_role: bool
                    ) -> list[str]:
    """The rendered prompts that ask the evaluator of ``data.task`` to grade each row (its request's fields)."""
    request = grading_task(data.task).request
    assert request is not None, "grading_task checked it"
    return [render(tokenizer, request.messages(row, data), add_generation_prompt=True, system_role=system_role)
            for row in rows]


def grade(
    model: torch.nn.Module,
    tokenizer: Any,
    rows: Sequence[Mapping[str, Any]],
    data: DataConfig,
    decoding: Decoding,
) -> list[Grade]:
    """Grade rows of a rubric task.

    Args:
        model: the evaluator (base model or PEFT adapter).
        tokenizer: its tokenizer.
        rows: mappings with the fields of the task's request (summaries: ``article`` and ``summary``, which may be
            empty, optional ``reference``) and an optional ``id``.
        data: the task (``data.task``, one :func:`grading_task` accepts) and the data settings the evaluator was
            trained with: prompt and answer language ``lang``, and ``max_article_length`` (articles are cut to it at
            a sentence end, as in training).
        decoding: how to decode (:class:`~gemma_lowmem.evaluation.guided.Decoding`): ``mode`` (``guided``,
            ``scores`` or ``free``), ``system_role`` as the evaluator was trained (Gemma: False), batch size, token
            cap, autocast, progress bar, and the memory budget of the int8 layers' float copies kept while decoding
            (:func:`~gemma_lowmem.model.float_weight_cache`).

    Returns:
        One :class:`Grade` per row, in order.
    """
    rubric = grading_task(data.task).rubric
    assert rubric is not None, "grading_task checked it"
    prompts = grading_prompts(tokenizer, rows, data, system_role=decoding.system_role)
    with float_weight_cache(model, budget=decoding.memory_budget):
        answers = rubric_answers(model, tokenizer, prompts, spec=rubric, lang=data.lang, decoding=decoding)
    return [Grade.from_answer(row_id(row, i + 1), a, decoding.mode) for i, (row, a) in enumerate(zip(rows, answers))]


# ------------------------------------------------------------------------------------------------------------ files


def _csv_text(rows: list[dict[str, Any]]) -> str:
    names = list(dict.fromkeys(k for row in rows for k in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=names)
    writer.writeheader()
    writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)
    return buffer.getvalue()


def _write_xlsx(path: str, rows: list[dict[str, Any]]) -> None:
    """One sheet, ``graded``: the header, then the rows. Text stays text, never a formula (a summary that starts
    with ``=`` is written as typed), and the control characters a workbook cannot hold are dropped."""
    from openpyxl import Workbook
    from openpyxl.cell import WriteOnlyCell
    from openpyxl.cell.cell import ILLEGAL_CHARACTERS_RE

    book = Workbook(write_only=True)
    sheet = book.create_sheet("graded")

    def cell(value: Any) -> Any:
        if not isinstance(value, str):
            return value
        out = WriteOnlyCell(sheet, ILLEGAL_CHARACTERS_RE.sub("", value))
        out.data_type = "s"  # openpyxl reads a string starting with "=" as a formula
        return out

    names = list(dict.fromkeys(k for row in rows for k in row))
    sheet.append([cell(name) for name in names])
    for row in rows:
        sheet.append([cell(row.get(name)) for name in names])
    book.save(path)


def write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write rows in the format of ``path``'s suffix, through a temporary file in the same folder and a rename
    (a reader, or an interrupted run, never sees a half-written file)."""
    suffix = path.suffix.lower()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        if suffix == ".parquet":
            import pandas as pd

            pd.DataFrame(rows).to_parquet(tmp, index=False)
        elif suffix == ".xlsx":
            _write_xlsx(tmp, rows)
        else:
            text = {".csv": _csv_text(rows), ".json": json.dumps(rows, ensure_ascii=False, indent=1) + "\n"}.get(
                suffix) or "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
            Path(tmp).write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@dataclass
class FileSummary:
    """What :func:`grade_file` did: rows graded now, rows already in the output, bad rows skipped."""

    graded: int
    resumed: int
    bad_rows: BadRows
    output: Path


@dataclass
class GradingInput:
    """A checked grading input: its good rows (each with an ``id``; fields under the task's names), the bad rows
    skipped, the rows already in the output and those still to grade, and each input field's output column (in
    the output's order)."""

    rows: list[dict[str, Any]]
    bad_rows: BadRows
    done: list[dict[str, Any]]
    todo: list[dict[str, Any]]
    names: dict[str, str]


def output_names(task: Task, columns: Columns | None) -> dict[str, str]:
    """Input field of ``task`` -> its output column: the user's column (``columns``), or the field's own name when
    that column would clash with a grade column (``--columns summary=answer``: the model's ``answer`` has that
    name)."""
    assert task.request is not None and task.rubric is not None, "a task grading serves"
    names = {name: (columns or {}).get(name, name) for name in task.request.fields}
    return {name: name if column in grade_columns(task.rubric) else column for name, column in names.items()}


def read_grading_input(input_path: str | Path, output_path: str | Path, columns: Columns | None = None,
                       task: Task | None = None) -> GradingInput:
    """Read and check the input and any earlier output (before a model is loaded: bad input fails fast).

    Args:
        input_path: CSV, JSONL, JSON, Parquet or .xlsx with the task's fields (summaries: ``article``, ``summary``,
            optional ``reference``) and an optional ``id``.
        output_path: where the graded rows go (the input's suffix). When it exists, the ids in it are graded
            already: they are kept and skipped.
        columns: field -> the input's column of another name (``--columns``), e.g. ``{"article": "text"}``.
        task: the task graded (one :func:`grading_task` accepts; its request names the fields); None: the default
            task, ``DataConfig.task``'s default.

    Returns:
        The rows, the bad rows, the earlier output rows, the rows to grade and the output's column names.

    Raises:
        UserError: an unreadable input or output, a wrong output suffix, ``columns`` naming a field grading does
            not read, an output that is not a grading output or has no id column, an input without a good row.
    """
    input_path, output_path = Path(input_path), Path(output_path)
    task = task or grading_task(DataConfig().task)
    request = task.request
    assert request is not None, "a task grading serves"
    check_columns(columns, request.fields, "grading")
    if output_path.suffix.lower() != input_path.suffix.lower():
        raise UserError(f"--output {output_path}: write the input's format ({input_path.suffix or 'no suffix'}), "
                        f"e.g. {output_path.with_suffix(input_path.suffix)}")
    bad = BadRows()
    rows = _read_input(input_path, bad, columns, request)
    if not rows:
        raise UserError(f"{input_path}: no row to grade ({bad.count} bad: {'; '.join(bad.reasons[:2]) or 'empty'})")
    names = output_names(task, columns)
    done: list[dict[str, Any]] = []
    if output_path.exists():
        done = read_records(output_path)
        if done and "total" not in done[0]:
            raise UserError(f"--output {output_path}: exists and is not a grading output (no 'total' column); "
                            "choose another file")
        if any(names["id"] not in r for r in done):
            raise UserError(f"--output {output_path}: its rows have no '{names['id']}' column to tell the graded "
                            "ones; give the --columns of the run that wrote it, or another --output")
    graded_ids = {str(r[names["id"]]) for r in done}
    return GradingInput(rows, bad, done, [r for r in rows if r["id"] not in graded_ids], names)


def grade_file(
    data: GradingInput,
    output_path: str | Path,
    grade_rows: Callable[[list[dict[str, Any]]], list[Grade]],
    *,
    batch_size: int = 8,
    show_progress: bool = True,
) -> FileSummary:
    """Grade the rows still to grade into the output, rewriting it (atomically) after every batch.

    Args:
        data: from :func:`read_grading_input`.
        output_path: the output file; it gets the earlier output's rows, then the new ones.
        grade_rows: grades one batch of rows (e.g. :func:`grade` with the model bound).
        batch_size: rows per batch.
        show_progress: show a progress bar.

    Returns:
        What was done.
    """
    output_path = Path(output_path)
    done, todo = list(data.done), data.todo
    bar = tqdm(total=len(todo), desc="grading", unit="row", disable=not show_progress)
    for start in range(0, len(todo), batch_size):
        batch = todo[start : start + batch_size]
        grades = grade_rows(batch)
        done += [{column: row[k] for k, column in data.names.items() if k in row} | g.columns()
                 for row, g in zip(batch, grades)]
        write_rows(output_path, done)
        bar.update(len(batch))
    bar.close()
    if not todo and not output_path.exists():
        write_rows(output_path, done)
    return FileSummary(len(todo), len(data.rows) - len(todo), data.bad_rows, output_path)


def _row_problem(row: Mapping[str, Any], raw: Mapping[str, Any], columns: Columns | None, request: Request
                 ) -> str | None:
    """Why ``row`` (``columns`` applied to ``raw``) cannot be graded, naming the field; None when it can."""
    for name in (*request.required, *request.may_be_empty):
        if name not in row:
            return missing_field(name, raw, columns)
        value = row[name]
        if name in request.required and (not isinstance(value, str) or not value.strip()):
            what = "empty" if value is None or isinstance(value, str) else f"not text ({type(value).__name__})"
            return f"field '{name}' is {what}"
        if not isinstance(value, str):
            what = "null" if value is None else f"not text ({type(value).__name__})"
            return f"field '{name}' is {what}; an empty {name} is written as \"\""
    return None


def _read_input(path: Path, bad: BadRows, columns: Columns | None, request: Request) -> list[dict[str, Any]]:
    """The input rows, fields under the task's names (``columns`` applied), with an ``id`` each.

    A JSONL line that is not JSON, a row missing a field the request needs, or whose field is not text (or empty,
    where the request needs it written), is named (file, row or line, field), counted in ``bad`` and skipped; ids
    count every row, so fixing a bad row moves no id.
    """
    out: list[dict[str, Any]] = []
    rows = read_rows(path)
    for number, (where, raw) in enumerate(rows, start=1):
        if isinstance(raw, UserError):  # a JSONL line that is not JSON: its message names the line
            bad.add(str(raw))
            continue
        if not isinstance(raw, dict):
            bad.add(f"{path}: {where}: expected an object with fields, got {type(raw).__name__}")
            continue
        row = apply_columns(raw, columns)
        problem = _row_problem(row, raw, columns, request)
        if problem is not None:
            bad.add(f"{path}: row {number}: {problem}")
        else:
            out.append(dict(row) | {"id": row_id(row, number)})
    warn_unmatched(str(path), [raw for _, raw in rows], columns)
    return out


@dataclass
class Grader:
    """A loaded evaluator and the settings :func:`grade` gets (``scripts/grade.py`` and the grading page).

    Attributes:
        model: the evaluator: a PEFT adapter on its base model, or the base model alone.
        tokenizer: its tokenizer.
        model_name: the base model as given (shown on the page).
        adapter: the adapter folder; None: the base model grades, and the page warns on every result.
        data: the task and the data settings the evaluator was trained with (prompt and answer ``lang``,
            ``max_article_length``).
        decoding: how the evaluator answers (``mode``, ``batch_size`` per batch of a class set, ``system_role``,
            ``autocast``, ``memory_budget``); no progress bar of its own.
    """

    model: torch.nn.Module
    tokenizer: Any
    model_name: str
    adapter: str | None = None
    data: DataConfig = field(default_factory=DataConfig)
    decoding: Decoding = field(default_factory=lambda: Decoding(show_progress=False))

    def __post_init__(self) -> None:
        self.decoding = replace(self.decoding, show_progress=False)  # callers show their own progress

    @property
    def task(self) -> Task:
        """The graded task (its request's fields, its rubric)."""
        return grading_task(self.data.task)

    @property
    def lang(self) -> str:
        """The prompt and answer language."""
        return self.data.lang

    @property
    def mode(self) -> str:
        """The decoding mode."""
        return self.decoding.mode

    @property
    def trained(self) -> bool:
        """Whether the grades come from an evaluator trained as a judge (an adapter)."""
        return self.adapter is not None

    def grade_rows(self, rows: Sequence[Mapping[str, Any]]) -> list[Grade]:
        """:func:`grade` on ``rows`` with this grader's model and settings."""
        return grade(self.model, self.tokenizer, rows, self.data, self.decoding)


def trained_settings(adapter: str | Path | None) -> dict[str, Any]:
    """The adapter's training config (``run_config.json`` beside it; empty without one or without an adapter).

    Raises:
        UserError: a damaged adapter folder (:func:`~gemma_lowmem.checkpoint.check_adapter`): before any loading.
    """
    from gemma_lowmem.checkpoint import check_adapter

    if adapter is None:
        return {}
    check_adapter(adapter)
    saved = Path(adapter) / "run_config.json"
    return read_config_file(saved) if saved.is_file() else {}


def load_grader(adapter: str | None = None, model: str | None = None, *, task: str | None = None,
                lang: str | None = None, default_lang: str = "ko", mode: str = "guided", max_mem: str | None = None,
                precision: str = "auto", batch_size: int = 8) -> Grader:
    """Load the evaluator (``scripts/grade.py``, the grading page): the adapter's training run
    (:func:`trained_settings`) gives the base model, its settings, the task, the language and the article length
    unless the arguments say otherwise.

    Args:
        adapter: an adapter or checkpoint folder saved by training; None: the base model grades (not a judge).
        model: the base model (default: the adapter's training run's, else the bundled ``gemma-3-270m``).
        task: the graded task (default: the adapter's training run's, else ``summary_eval``).
        lang: prompt and answer language (default: the adapter's training run's, else ``default_lang``).
        default_lang: the language when neither ``lang`` nor a training run gives one.
        mode: ``guided``, ``scores`` or ``free``.
        max_mem: memory budget as training's ``--max-mem`` (``8GB``); None: what the device has free.
        precision: ``auto``, ``bf16`` or ``fp32``: the forwards' autocast, as in training.
        batch_size: summaries per batch of a class set.

    Returns:
        The loaded :class:`Grader`.

    Raises:
        UserError: a damaged adapter folder, a bad size, a model that cannot be loaded.
    """
    from gemma_lowmem.device import default_device, resolve_precision
    from gemma_lowmem.memory import parse_size
    from gemma_lowmem.model import load_adapter, load_base_model, load_tokenizer, resolve_model_path

    if mode not in MODES:
        raise UserError(f"--mode {mode!r} is not one of {', '.join(MODES)}")
    if batch_size <= 0:
        raise UserError(f"--batch-size {batch_size} must be > 0")
    memory_budget = parse_size(max_mem) if max_mem else None
    run = trained_settings(adapter)  # a damaged adapter fails now, not after the model has loaded
    saved_data = run.get("data", {})
    data = DataConfig(task=grading_task(task or saved_data.get("task") or DataConfig().task).name,
                      lang=lang or saved_data.get("lang", default_lang),
                      max_article_length=saved_data.get("max_article_length", 2000))
    known = {f.name for f in fields(ModelConfig)}
    model_cfg = ModelConfig(**{**{k: v for k, v in run.get("model", {}).items() if k in known},
                               "model": model or run.get("model", {}).get("model", "gemma-3-270m")})
    device = default_device()
    tokenizer = load_tokenizer(resolve_model_path(model_cfg.model))
    loaded = load_base_model(model_cfg, device, precision)
    if adapter is not None:
        loaded = load_adapter(loaded, adapter)
    decoding = Decoding(mode=mode, batch_size=batch_size, system_role=model_cfg.system_role,
                        autocast=resolve_precision(device, precision).autocast, memory_budget=memory_budget,
                        show_progress=False)
    return Grader(loaded, tokenizer, model_name=model_cfg.model, adapter=None if adapter is None else str(adapter),
                  data=data, decoding=decoding)
