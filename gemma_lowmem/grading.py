"""Grade student summaries with a trained evaluator: rows (article, summary, optional reference and id) -> grades.

:func:`grade` is the Python API; :func:`grade_file` is what ``scripts/grade.py`` does with a CSV, JSONL, JSON or
Parquet file: read it with :func:`~gemma_lowmem.data.records.read_records` (bad rows named by row and field and
skipped with a count), skip the ids already graded in the output (resume), grade the rest batch by batch and after
every batch rewrite the output in the input's format through a temporary file and a rename, so an interrupted run
never leaves a half-written file and loses at most one batch.

A row without a reference is graded with a request that compares the summary with the article alone and shows no
reference section (:func:`~gemma_lowmem.tasks.summary_eval.evaluation_prompt`); training shows such requests in
``data.no_reference_share`` of its conversations.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from gemma_lowmem.data.records import BadRows, read_records
from gemma_lowmem.data.tokenize import render
from gemma_lowmem.errors import UserError
from gemma_lowmem.evaluation.generate import Autocast
from gemma_lowmem.evaluation.guided import MODES, RubricAnswer, rubric_answers
from gemma_lowmem.evaluation.rubric import CRITERIA
from gemma_lowmem.model import float_weight_cache
from gemma_lowmem.tasks.summary_eval import evaluation_prompt
from gemma_lowmem.text import cut_at_sentence_end

INPUT_FIELDS = ("id", "article", "summary", "reference")


@dataclass
class Grade:
    """One graded summary.

    Attributes:
        id: the row's id (its own, else ``row-N``, N counted from 1 in file order).
        valid: the answer holds every score (always, in ``guided``/``scores`` mode).
        total: the sum of the criteria's scores (None when the free answer is not valid).
        expected_total: the sum of the criteria's expected scores (``guided``/``scores``; else None).
        scores: criterion -> integer score (None when not valid).
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

        def whole(x: float | None) -> int | None:
            return int(x) if result.valid and x is not None and float(x).is_integer() else None

        return cls(
            id=row_id, valid=result.valid, total=whole(result.total), expected_total=answer.expected_total,
            scores={key: whole(result.scores[key]) for key in CRITERIA},
            expected={key: answer.readings[key].expected if key in answer.readings else None for key in CRITERIA},
            comments=dict(result.comments), feedback=result.feedback, suggestions=result.suggestions,
            answer=answer.text, mode=mode,
        )

    def columns(self) -> dict[str, Any]:
        """Flat output columns: ``total``, ``expected_total``, per criterion ``<key>``, ``<key>_expected`` and
        ``<key>_comment``, then ``feedback``, ``suggestions``, ``answer``, ``valid``, ``mode``."""
        out: dict[str, Any] = {"total": self.total, "expected_total": _round(self.expected_total)}
        for key in CRITERIA:
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


def grading_prompts(tokenizer: Any, rows: Sequence[Mapping[str, Any]], *, lang: str, max_article_length: int,
                    system_role: bool) -> list[str]:
    """The rendered prompts that ask the evaluator to grade each row (``article``, ``summary``, ``reference``)."""
    prompts = []
    for row in rows:
        article = cut_at_sentence_end(str(row["article"]).strip(), max_article_length)
        reference = row.get("reference")
        messages = evaluation_prompt(article, str(row.get("summary") or ""),
                                     str(reference) if reference not in (None, "") else None, lang)
        prompts.append(render(tokenizer, messages, add_generation_prompt=True, system_role=system_role))
    return prompts


def grade(
    model: torch.nn.Module,
    tokenizer: Any,
    rows: Sequence[Mapping[str, Any]],
    *,
    lang: str = "ko",
    mode: str = "guided",
    max_article_length: int = 2000,
    system_role: bool = False,
    batch_size: int = 8,
    max_new_tokens: int = 384,
    show_progress: bool = True,
    autocast: Autocast = contextlib.nullcontext,
    memory_budget: int | None = None,
) -> list[Grade]:
    """Grade student summaries.

    Args:
        model: the evaluator (base model or PEFT adapter).
        tokenizer: its tokenizer.
        rows: mappings with ``article`` and ``summary`` (may be empty), optional ``reference`` and ``id``.
        lang: prompt and answer language, ``"ko"`` or ``"en"`` (as the evaluator was trained).
        mode: ``guided`` (default), ``scores`` or ``free`` (see :mod:`gemma_lowmem.evaluation.guided`).
        max_article_length: articles are cut to this many characters at a sentence end, as in training.
        system_role: as the evaluator was trained (Gemma: False).
        batch_size: prompts per batch.
        max_new_tokens: ``free`` mode's longest answer.
        show_progress: show a progress bar.
        autocast: zero-argument callable returning the context manager of every forward (training's
            ``Precision.autocast``).
        memory_budget: a budget in bytes for the int8 layers' float copies kept while decoding
            (:func:`~gemma_lowmem.model.float_weight_cache`); None: what the device has free.

    Returns:
        One :class:`Grade` per row, in order.
    """
    if mode not in MODES:
        raise UserError(f"--mode {mode!r} is not one of {', '.join(MODES)}")
    prompts = grading_prompts(tokenizer, rows, lang=lang, max_article_length=max_article_length,
                              system_role=system_role)
    with float_weight_cache(model, budget=memory_budget):
        answers = rubric_answers(model, tokenizer, prompts, lang=lang, mode=mode, max_new_tokens=max_new_tokens,
                                 batch_size=batch_size, show_progress=show_progress, autocast=autocast)
    return [Grade.from_answer(row_id(row, i + 1), a, mode) for i, (row, a) in enumerate(zip(rows, answers))]


# ------------------------------------------------------------------------------------------------------------ files


def _csv_text(rows: list[dict[str, Any]]) -> str:
    names = list(dict.fromkeys(k for row in rows for k in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=names)
    writer.writeheader()
    writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)
    return buffer.getvalue()


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
    """A checked grading input: its good rows (each with an ``id``), the bad rows skipped, the rows already in
    the output and those still to grade."""

    rows: list[dict[str, Any]]
    bad_rows: BadRows
    done: list[dict[str, Any]]
    todo: list[dict[str, Any]]


def read_grading_input(input_path: str | Path, output_path: str | Path) -> GradingInput:
    """Read and check the input and any earlier output (before a model is loaded: bad input fails fast).

    Args:
        input_path: CSV, JSONL, JSON or Parquet with ``article``, ``summary``, optional ``reference`` and ``id``.
        output_path: where the graded rows go (the input's suffix). When it exists, the ids in it are graded
            already: they are kept and skipped.

    Returns:
        The rows, the bad rows, the earlier output rows and the rows to grade.

    Raises:
        UserError: an unreadable input or output, a wrong output suffix, an output that is not a grading output,
            an input without a good row.
    """
    input_path, output_path = Path(input_path), Path(output_path)
    if output_path.suffix.lower() != input_path.suffix.lower():
        raise UserError(f"--output {output_path}: write the input's format ({input_path.suffix or 'no suffix'}), "
                        f"e.g. {output_path.with_suffix(input_path.suffix)}")
    bad = BadRows()
    rows = _read_input(input_path, bad)
    if not rows:
        raise UserError(f"{input_path}: no row to grade ({bad.count} bad: {'; '.join(bad.reasons[:2]) or 'empty'})")
    done: list[dict[str, Any]] = []
    if output_path.exists():
        done = read_records(output_path)
        if done and "total" not in done[0]:
            raise UserError(f"--output {output_path}: exists and is not a grading output (no 'total' column); "
                            "choose another file")
    graded_ids = {str(r.get("id")) for r in done}
    return GradingInput(rows, bad, done, [r for r in rows if r["id"] not in graded_ids])


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
    bar = tqdm(total=len(todo), desc="grading", unit="summary", disable=not show_progress)
    for start in range(0, len(todo), batch_size):
        batch = todo[start : start + batch_size]
        grades = grade_rows(batch)
        done += [{k: row[k] for k in INPUT_FIELDS if k in row} | g.columns() for row, g in zip(batch, grades)]
        write_rows(output_path, done)
        bar.update(len(batch))
    bar.close()
    if not todo and not output_path.exists():
        write_rows(output_path, done)
    return FileSummary(len(todo), len(data.rows) - len(todo), data.bad_rows, output_path)


def _read_input(path: Path, bad: BadRows) -> list[dict[str, Any]]:
    """The input rows with an ``id`` each. A row without an article, or whose summary is missing or not text, is
    named (row, field), counted in ``bad`` and skipped; ids count every row, so fixing a bad row moves no id."""
    out: list[dict[str, Any]] = []
    for number, row in enumerate(read_records(path), start=1):
        article, summary = row.get("article"), row.get("summary")
        if not isinstance(article, str) or not article.strip():
            bad.add(f"{path}: row {number}: field 'article' is missing or empty")
        elif not isinstance(summary, str):
            what = "missing" if summary is None else f"not text (got {type(summary).__name__})"
            bad.add(f"{path}: row {number}: field 'summary' is {what}; an empty summary is written as \"\"")
        else:
            out.append(dict(row) | {"id": row_id(row, number)})
    return out
