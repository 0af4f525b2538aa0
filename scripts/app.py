#!/usr/bin/env python
"""The grading page for teachers: paste an article and a student's summary, or upload a class set, in a browser.

Starts a local web page (Gradio; install it with: pip install -e ".[app]"), Korean by default with an English
switch on the page. One summary: each criterion's score with its expected value and a bar, the total, the comments,
the feedback and the suggestions, beside the rubric. A class set: a CSV, XLSX or JSONL file (column mapping as in
grade.py --columns), graded with a progress bar into a table and a download in the same format; bad rows are listed
and skipped. The page grades with the same code as scripts/grade.py and shows which model and adapter grade. Without
--adapter the base model grades: it was never trained as a judge, and every result says so.

The page listens on 127.0.0.1 (this computer only) unless --host says otherwise; --share also opens a public link
(Colab, where the notebook's localhost is not yours). Stop it with Ctrl-C.

Examples:
  python scripts/app.py --adapter runs/20250101-120000/adapter
  python scripts/app.py --adapter RUN/adapter --lang en --port 8080
  python scripts/app.py --adapter RUN/adapter --share
  python scripts/app.py --model gemma-3-270m            (the bundled base model: a demo, not grades)
"""

from __future__ import annotations

import argparse
import importlib.util
import os
from dataclasses import fields

# Light imports only (no torch, no gradio): --help and a bad flag answer at once.
from gemma_lowmem.cli import run_script
from gemma_lowmem.config import EvalConfig, TrainConfig
from gemma_lowmem.errors import UserError

_EVAL = {f.name: f for f in fields(EvalConfig)}
_MAX_MEM = {f.name: f for f in fields(TrainConfig)}["max_mem"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.strip(), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", metavar="DIR",
                        help="adapter or checkpoint folder saved by training (none: the base model grades, with a "
                             "warning on every result)")
    parser.add_argument("--model", help="base model (default: the adapter's training run's, else gemma-3-270m)")
    parser.add_argument("--lang", choices=("ko", "en"), default="ko",
                        help="the page's language at start (default ko; the page has a switch); also the prompt and "
                             "answer language when the adapter's training run does not give one")
    parser.add_argument("--mode", choices=_EVAL["mode"].metadata["choices"], default="guided",
                        help="guided: the code writes the format, the model scores and texts (default); scores: "
                             "score slots only (fastest); free: plain generation, parsed")
    parser.add_argument("--max-mem", default=_MAX_MEM.default, metavar="SIZE",
                        help="memory budget, as training's --max-mem (e.g. 8GB, 7.5GiB, 8000MB): the float copies "
                             f"of the int8 weights kept while decoding stay within it (default {_MAX_MEM.default})")
    parser.add_argument("--batch-size", type=int, default=8, help="summaries per batch of a class set (default 8)")
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                        help="autocast, as in training (default auto)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this computer only; 0.0.0.0: the network)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    parser.add_argument("--share", action="store_true",
                        help="also open a public *.gradio.live link (Colab); anyone with the link can grade")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if not 0 < args.port < 65536:
        raise UserError(f"--port {args.port} is not a port (1-65535)")
    if args.batch_size <= 0:
        raise UserError(f"--batch-size {args.batch_size} must be > 0")
    if importlib.util.find_spec("gradio") is None:
        raise UserError('the page needs Gradio: pip install -e ".[app]" (or pip install gradio openpyxl)')
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a teacher's computer

    # Parsed and checked: now the model code (torch, transformers, peft) and Gradio.
    from gemma_lowmem.app import build_page, serve
    from gemma_lowmem.grading import load_grader
    from gemma_lowmem.memory import parse_size

    parse_size(args.max_mem)  # a bad size fails before the model loads
    grader = load_grader(args.adapter, args.model, default_lang=args.lang, mode=args.mode, max_mem=args.max_mem,
                         precision=args.precision, batch_size=args.batch_size)
    if not grader.trained:
        print(f"warning: no --adapter: {grader.model_name} grades, a base model not trained as a judge; the page "
              "marks every result", flush=True)
    serve(build_page(grader, args.lang), host=args.host, port=args.port, share=args.share)


if __name__ == "__main__":
    run_script(main)
