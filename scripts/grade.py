#!/usr/bin/env python
"""Grade rows of a rubric task with a trained evaluator: a file of rows, or one row typed here.

--task names what is graded (default: the adapter's training run's task, else summary_eval): student summaries
(summary_eval, as below), essays (essay: the columns essay and optional prompt, and optional id) or another
registered task with a rubric and a request prompt; the input's columns are the task's fields.

For summaries, the input (CSV, XLSX, JSONL, JSON or Parquet) has the columns article, summary (may be empty),
optional reference and optional id; --columns reads them from columns of other names (a teacher's text, summary,
reference: --columns article=text). The output, in the same format, has them under the input's names and every
criterion's score (integer and expected value, G-Eval's sum of p(s) * s), the total, the comments, the feedback, the
suggestions and the whole rendered answer. Rows already in the output (same id; rows without one are row-1, row-2,
... in file order) are skipped, so an interrupted run continues where it stopped (give the same --columns); the
output is rewritten through a temporary file after every batch. Bad rows (a JSONL line that is not JSON too) are
named (row or line, field), skipped and counted; the rest are graded. A row without a reference is graded against
the article alone.

Examples:
  python scripts/grade.py --adapter runs/20250101-120000/adapter --input summaries.csv --output graded.csv
  python scripts/grade.py --adapter RUN/adapter --input rows.jsonl --output graded.jsonl --mode scores --lang en
  python scripts/grade.py --adapter RUN/adapter --input teacher.csv --output graded.csv --columns article=text
  python scripts/grade.py --adapter RUN/adapter --text "ARTICLE TEXT" "STUDENT SUMMARY" ["REFERENCE"]
  python scripts/grade.py --adapter ESSAY_RUN/adapter --task essay --input essays.csv --output graded.csv
  python scripts/grade.py --adapter ESSAY_RUN/adapter --task essay --text "ESSAY TEXT" ["WRITING PROMPT"]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, fields

# Light imports only (no torch): --help and a bad flag answer at once. The model code is imported in main.
from gemma_lowmem.cli import PairsAction, pair_parser, run_script
from gemma_lowmem.config import DataConfig, EvalConfig, TrainConfig
from gemma_lowmem.errors import UserError
from gemma_lowmem.tasks import Task, task_names

_EVAL = {f.name: f for f in fields(EvalConfig)}
_MAX_MEM = {f.name: f for f in fields(TrainConfig)}["max_mem"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.strip(), formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", metavar="FILE", help="rows to grade (.csv, .xlsx, .jsonl, .json, .parquet)")
    source.add_argument("--text", nargs="+", metavar="TEXT",
                        help="grade one row, its fields in order: ARTICLE SUMMARY [REFERENCE] (summary_eval), ESSAY "
                             "[PROMPT] (essay); prints the answer and the scores")
    parser.add_argument("--output", metavar="FILE", help="graded rows, the input's format (needed with --input)")
    parser.add_argument("--task", metavar="NAME",
                        help="the rubric task graded: summary_eval or essay, or another registered task with a rubric "
                             f"and a request ({', '.join(task_names())}; default: the adapter's training run's, else "
                             "summary_eval)")
    parser.add_argument("--columns", nargs="+", type=pair_parser("--columns"), action=PairsAction, default={},
                        metavar="FIELD=COLUMN",
                        help="read a field of the task (summary_eval: id, article, summary, reference; essay: id, "
                             "essay, prompt) from a column of another name: --columns article=text "
                             "summary=student_summary")
    parser.add_argument("--adapter", metavar="DIR",
                        help="adapter or checkpoint folder saved by training (none: the base model grades)")
    parser.add_argument("--model", help="base model (default: the adapter's training run's, else gemma-3-270m)")
    parser.add_argument("--lang", choices=("ko", "en"), help="prompt and answer language (default: the "
                        "adapter's training run's, else ko)")
    parser.add_argument("--mode", choices=_EVAL["mode"].metadata["choices"], default="guided",
                        help="guided: the code writes the format, the model scores and texts (default); scores: "
                             "score slots only (fastest); free: plain generation, parsed")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per batch (default 8)")
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                        help="autocast, as in training (default auto)")
    parser.add_argument("--max-mem", default=_MAX_MEM.default, metavar="SIZE",
                        help="memory budget, as training's --max-mem (e.g. 8GB, 7.5GiB, 8000MB): the float copies "
                             f"of the int8 weights kept while decoding stay within it (default {_MAX_MEM.default})")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _text_row(values: list[str], task: Task) -> dict[str, str]:
    """The row ``--text`` gives: its values are the task's request fields, in order (the optional ones may be left
    out)."""
    request = task.request
    assert request is not None, "a task grading serves"
    fields_in_order = request.fields[1:]  # without the id
    needed = len(fields_in_order) - len(request.optional)
    if not needed <= len(values) <= len(fields_in_order):
        usage = " ".join([f.upper() for f in fields_in_order[:needed]] + [f"[{f.upper()}]" for f in request.optional])
        raise UserError(f"--text takes {usage} for --task {task.name}; got {len(values)} value(s)")
    return dict(zip(fields_in_order, values)) | {"id": "text"}


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.input and not args.output:
        raise UserError("--input needs --output (a file of the same format for the graded rows)")
    if args.text and args.columns:
        raise UserError("--columns names the columns of an --input file; --text takes the fields themselves")
    if args.batch_size <= 0:
        raise UserError(f"--batch-size {args.batch_size} must be > 0")

    # Parsed and checked: now the model code (torch, transformers, peft).
    from gemma_lowmem.grading import grade_file, grading_task, load_grader, read_grading_input, trained_settings
    from gemma_lowmem.memory import parse_size

    parse_size(args.max_mem)  # a bad size fails before anything loads
    run = trained_settings(args.adapter)  # a damaged adapter fails now, not after the model has loaded
    task = grading_task(args.task or run.get("data", {}).get("task") or DataConfig().task)
    text_row = _text_row(args.text, task) if args.text else None
    data = read_grading_input(args.input, args.output, args.columns, task) if args.input else None  # before loading
    if data is not None and not data.todo:
        print(f"{args.output}: all {len(data.rows)} rows are graded already")
        return
    grader = load_grader(args.adapter, args.model, task=task.name, lang=args.lang, mode=args.mode,
                         max_mem=args.max_mem, precision=args.precision, batch_size=args.batch_size)
    grade_rows = grader.grade_rows
    if text_row is not None:
        g = grade_rows([text_row])[0]
        print(g.answer)
        print(json.dumps({k: v for k, v in asdict(g).items() if k not in ("answer", "comments", "feedback",
                                                                         "suggestions")}, ensure_ascii=False))
        return
    summary = grade_file(data, args.output, grade_rows, batch_size=args.batch_size,
                         show_progress=not args.no_progress)
    print(f"{summary.output}: graded {summary.graded} rows ({summary.resumed} were graded already), "
          f"{summary.bad_rows.count} bad rows skipped" + (f", e.g. {summary.bad_rows.reasons[0]}"
                                                          if summary.bad_rows.count else ""))


if __name__ == "__main__":
    run_script(main)
