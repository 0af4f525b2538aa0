#!/usr/bin/env python
"""Grade student summaries with a trained evaluator: a file of rows, or one article and summary typed here.

The input (CSV, JSONL, JSON or Parquet) has the columns article, summary (may be empty), optional reference and
optional id; the output, in the same format, has them and every criterion's score (integer and expected value,
G-Eval's sum of p(s) * s), the total, the comments, the feedback, the suggestions and the whole rendered answer.
Rows already in the output (same id; rows without one are row-1, row-2, ... in file order) are skipped, so an
interrupted run continues where it stopped; the output is rewritten through a temporary file after every batch.
Bad rows are named (row, field), skipped and counted. A row without a reference is graded against the article
alone.

Examples:
  python scripts/grade.py --adapter runs/20250101-120000/adapter --input summaries.csv --output graded.csv
  python scripts/grade.py --adapter RUN/adapter --input rows.jsonl --output graded.jsonl --mode scores --lang en
  python scripts/grade.py --adapter RUN/adapter --text "ARTICLE TEXT" "STUDENT SUMMARY" ["REFERENCE"]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, fields
from functools import partial
from pathlib import Path

from gemma_lowmem.cli import run_script
from gemma_lowmem.config import ModelConfig, read_config_file
from gemma_lowmem.device import default_device, resolve_precision
from gemma_lowmem.errors import UserError
from gemma_lowmem.evaluation.guided import MODES
from gemma_lowmem.grading import grade, grade_file, read_grading_input
from gemma_lowmem.model import load_adapter, load_base_model, load_tokenizer, resolve_model_path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.strip(), formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", metavar="FILE", help="rows to grade (.csv, .jsonl, .json, .parquet)")
    source.add_argument("--text", nargs="+", metavar="TEXT",
                        help="grade one summary: ARTICLE SUMMARY [REFERENCE]; prints the answer and the scores")
    parser.add_argument("--output", metavar="FILE", help="graded rows, the input's format (needed with --input)")
    parser.add_argument("--adapter", metavar="DIR",
                        help="adapter or checkpoint folder saved by training (none: the base model grades)")
    parser.add_argument("--model", help="base model (default: the adapter's training run's, else gemma-3-270m)")
    parser.add_argument("--lang", choices=("ko", "en"), help="prompt and answer language (default: the "
                        "adapter's training run's, else ko)")
    parser.add_argument("--mode", choices=MODES, default="guided",
                        help="guided: the code writes the format, the model scores and texts (default); scores: "
                             "score slots only (fastest); free: plain generation, parsed")
    parser.add_argument("--batch-size", type=int, default=8, help="summaries per batch (default 8)")
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                        help="autocast, as in training (default auto)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _training_run(adapter: str | None) -> dict:
    """The adapter's training config (``run_config.json`` next to it), or empty without one."""
    if adapter is None:
        return {}
    folder = Path(adapter)
    if not (folder / "adapter_config.json").is_file():
        raise UserError(f"--adapter {folder}: not an adapter folder (no adapter_config.json)")
    saved = folder / "run_config.json"
    return read_config_file(saved) if saved.is_file() else {}


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.input and not args.output:
        raise UserError("--input needs --output (a file of the same format for the graded rows)")
    if args.text and len(args.text) not in (2, 3):
        raise UserError(f"--text takes ARTICLE SUMMARY [REFERENCE]; got {len(args.text)} value(s)")
    if args.batch_size <= 0:
        raise UserError(f"--batch-size {args.batch_size} must be > 0")
    data = read_grading_input(args.input, args.output) if args.input else None  # bad input fails before loading
    run = _training_run(args.adapter)
    known = {f.name for f in fields(ModelConfig)}
    model_cfg = ModelConfig(**{**{k: v for k, v in run.get("model", {}).items() if k in known},
                               "model": args.model or run.get("model", {}).get("model", "gemma-3-270m")})
    lang = args.lang or run.get("data", {}).get("lang", "ko")
    max_article_length = run.get("data", {}).get("max_article_length", 2000)
    if data is not None and not data.todo:
        print(f"{args.output}: all {len(data.rows)} rows are graded already")
        return
    device = default_device()
    tokenizer = load_tokenizer(resolve_model_path(model_cfg.model))
    model = load_base_model(model_cfg, device, args.precision)
    if args.adapter:
        model = load_adapter(model, args.adapter)
    grade_rows = partial(grade, model, tokenizer, lang=lang, mode=args.mode, max_article_length=max_article_length,
                         system_role=model_cfg.system_role, batch_size=args.batch_size, show_progress=False,
                         autocast=resolve_precision(device, args.precision).autocast)
    if data is None:
        row = dict(zip(("article", "summary", "reference"), args.text)) | {"id": "text"}
        g = grade_rows([row])[0]
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
