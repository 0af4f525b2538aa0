#!/usr/bin/env python
"""Evaluate a Gemma evaluator by generation: answer validation prompts greedily, score the answers, write a report.

The report folder gets report.json (every number, every answer), report.md (metric tables, a column per evaluated
system, a few examples, the plots) and PNG plots. With --adapter, the model, data and seed default to the training
run's (the adapter folder's run_config.json); flags override them. --output-dir sets the report folder (default:
<adapter>/eval, <adapter>/eval-human with --human-judgments, else runs/eval-<time>).

Examples:
  python scripts/evaluate.py --adapter runs/20250101-120000/adapter             # the adapter, its training data
  python scripts/evaluate.py --adapter runs/20250101-120000/adapter --compare   # base vs adapter, one report
  python scripts/evaluate.py --demo --max-val-samples 10                        # the bundled Gemma 3 270M alone
  python scripts/evaluate.py --adapter RUN/adapter --human-judgments summeval.jsonl --lang en --max-val-samples 160

--human-judgments FILE.jsonl: one rated summary per line with doc_id, system_id, article, summary, references (a
list; the first is used), coherence, consistency, fluency, relevance (1-5, e.g. SummEval's expert means). The
evaluator grades each summary; the report gives summary-level Spearman and Kendall (per document over its systems,
averaged over documents) of coverage~relevance, accuracy~consistency, grammar~fluency, total~mean rating, next to
ROUGE-1/2/L's on the same rows. --max-val-samples caps the rows, whole documents only.
"""

import argparse

from gemma_lowmem.cli import build_parser, run_script
from gemma_lowmem.evaluate import EvalOptions, config_for_eval, run_evaluation
from gemma_lowmem.evaluation.report import format_value


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in the flag help, and the examples above kept as written."""


def add_eval_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("evaluation")
    group.add_argument("--adapter", metavar="DIR", help="adapter folder saved by training (none: the base model)")
    group.add_argument("--compare", action="store_true",
                       help="also evaluate the base model (adapter disabled; one model in memory): one report, "
                            "a column per system")
    group.add_argument("--human-judgments", metavar="FILE.jsonl",
                       help="grade SummEval-style rated summaries and correlate with the human ratings (see above)")
    group.add_argument("--no-progress", action="store_true", help="no progress bar while generating")


def main(argv: list[str] | None = None) -> None:
    parser = build_parser(__doc__.strip().splitlines()[0], extra=add_eval_flags)
    parser.description = __doc__.strip()
    parser.formatter_class = _HelpFormatter
    args = parser.parse_args(argv)
    options = EvalOptions(adapter=args.adapter, compare=args.compare, human_judgments=args.human_judgments,
                          show_progress=not args.no_progress)
    cfg = config_for_eval(args, options.adapter)
    report, json_path, md_path = run_evaluation(cfg, options)
    for name, system in report["systems"].items():
        headline = {k: v for k, v in system["metrics"].items() if not isinstance(v, (dict, list))}
        print(f"{name}: " + ", ".join(f"{k} {format_value(v)}" for k, v in headline.items()))
    print(f"report: {md_path}  (all numbers: {json_path})")


if __name__ == "__main__":
    run_script(main)
