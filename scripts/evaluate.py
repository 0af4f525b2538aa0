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

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from gemma_lowmem.checkpoint import check_adapter
from gemma_lowmem.cli import build_parser, config_from_args, given_settings, run_script
from gemma_lowmem.config import SECTIONS, RunConfig, read_config_file
from gemma_lowmem.device import default_device, resolve_precision
from gemma_lowmem.errors import UserError
from gemma_lowmem.evaluation.answers import answer_and_score, compare_systems
from gemma_lowmem.evaluation.guided import Decoding
from gemma_lowmem.evaluation.human import read_judgments
from gemma_lowmem.evaluation.report import format_value, write_report
from gemma_lowmem.model import load_adapter, load_base_model, load_tokenizer, resolve_model_path
from gemma_lowmem.run import writable_dir
from gemma_lowmem.tasks import get_task
from gemma_lowmem.tasks.summary_human import (
    correlation_table,
    grade_rated_summaries,
    limit_documents,
    rouge_correlations,
)

DATA_SOURCES = {"data", "train_file", "val_file", "demo"}  # data fields that pick where rows come from


@dataclass
class EvalOptions:
    """What the evaluation script adds to the run configuration."""

    adapter: str | None = None  # adapter folder (PEFT format, as training saves it)
    compare: bool = False  # evaluate the base model (adapter disabled) and the adapter in one run
    human_judgments: str | None = None  # SummEval-style JSONL of rated summaries
    show_progress: bool = True  # progress bar while generating

    def __post_init__(self) -> None:
        if self.compare and not self.adapter:
            raise UserError("--compare evaluates the base model against an adapter: give the adapter with --adapter")

def config_for_eval(args: argparse.Namespace, adapter: str | None) -> RunConfig:
    """The run configuration, with defaults from the adapter's training run.

    When the adapter folder holds ``run_config.json`` (written by training), the model section, the data section
    and the seed default to the training run's (the seed builds the same validation conversations). Anything given
    on the command line overrides them, and a data source given there (``--data``, ``--train-file``,
    ``--val-file``, ``--demo``) replaces all of the training run's.

    Args:
        args: parsed flags of :func:`gemma_lowmem.cli.build_parser`.
        adapter: the adapter folder, or None.

    Returns:
        The validated configuration.
    """
    if adapter is None:
        return config_from_args(args)
    folder = Path(adapter)
    if not (folder / "adapter_config.json").is_file():
        raise UserError(f"{folder}: not an adapter folder (no adapter_config.json)")
    saved_path = folder / "run_config.json"
    if not saved_path.is_file():
        return config_from_args(args)
    saved = read_config_file(saved_path)
    given = given_settings(args)
    data = dict(saved.get("data", {}))
    if DATA_SOURCES & set(given["data"]):  # new data named: the training run's source (its demo flag too) is out
        data = {k: v for k, v in data.items() if k not in DATA_SOURCES}
    inherited = {"model": saved.get("model", {}), "data": data,
                 "train": {k: v for k, v in saved.get("train", {}).items() if k == "seed"}}
    merged = {name: {**inherited.get(name, {}), **given[name]} for name in SECTIONS}
    return RunConfig.from_dict(merged, source=f"{saved_path} and the command line")


def output_dir_for(cfg: RunConfig, options: EvalOptions) -> Path:
    """``--output-dir``, else ``<adapter>/eval`` (``eval-human`` for human judgments), else ``runs/eval-<time>``."""
    if cfg.train.output_dir:
        out = Path(cfg.train.output_dir)
    elif options.adapter:
        out = Path(options.adapter) / ("eval-human" if options.human_judgments else "eval")
    else:
        out = Path("runs") / time.strftime("eval-%Y%m%d-%H%M%S")
    return writable_dir(out)


def run_evaluation(cfg: RunConfig, options: EvalOptions) -> tuple[dict[str, Any], Path, Path]:
    """Load data, the base model and the adapter; evaluate; write the report.

    Everything that can fail on user input (adapter files, data, judgments file, output folder, model name) is
    checked before the model loads.

    Args:
        cfg: the run configuration (model, data, seed; ``train.output_dir`` is the report folder).
        options: the evaluation options.

    Returns:
        ``(report, report.json path, report.md path)``.
    """
    if options.adapter:
        check_adapter(options.adapter)  # a damaged adapter_config.json or adapter_model.safetensors: fail now
    task = get_task(cfg.data.task)
    out_dir = output_dir_for(cfg, options)
    if options.human_judgments:
        if cfg.data.task != "summary_eval":
            raise UserError(f"--human-judgments grades summaries with the summary_eval rubric; --task is "
                            f"{cfg.data.task}")
        judgments = read_judgments(options.human_judgments)
        judgments = limit_documents(judgments, cfg.data.max_val_samples)
        print(f"{options.human_judgments}: {len(judgments)} rated summaries of "
              f"{len({j.doc_id for j in judgments})} documents")
    else:
        if task.score_outputs is None:
            raise UserError(f"task {cfg.data.task} has no generation metrics (no score_outputs)")
        conversations = task.validation_conversations(cfg.data, cfg.train.seed)
        if not conversations:
            raise UserError("no validation conversations to evaluate; check --data / --val-file")
        print(f"evaluating on {len(conversations)} validation conversations")
    model_path = resolve_model_path(cfg.model.model)
    device = default_device()
    tokenizer = load_tokenizer(model_path)
    model = load_base_model(cfg.model, device, cfg.train.precision)
    if options.adapter:
        model = load_adapter(model, options.adapter)
    decoding = Decoding.from_config(cfg, resolve_precision(device, cfg.train.precision).autocast, options.show_progress)
    examples = cfg.eval.report_examples
    settings = {"task": cfg.data.task, "adapter": options.adapter, "device": str(device),
                "eval": asdict(cfg.eval),
                "seed": cfg.train.seed, "model": asdict(cfg.model)}
    if options.human_judgments:
        systems = compare_systems(model, options.compare, lambda m: grade_rated_summaries(
            m, tokenizer, judgments, decoding, lang=cfg.data.lang, max_article_length=cfg.data.max_article_length,
            examples=examples))
        rouge = rouge_correlations(judgments)
        report = {"settings": {**settings, "human_judgments": options.human_judgments, "lang": cfg.data.lang},
                  "systems": systems, "rouge_correlations": rouge, "tables": [correlation_table(systems, rouge)]}
        title = f"Evaluator vs human judgments: {Path(options.human_judgments).name}"
    else:
        systems = compare_systems(model, options.compare, lambda m: answer_and_score(
            m, tokenizer, conversations, task.score_outputs, decoding, rubric=task.rubric, examples=examples))
        report = {"settings": {**settings, "data": asdict(cfg.data)}, "systems": systems}
        title = f"Evaluation: {cfg.data.task}" + (f" ({options.adapter})" if options.adapter else "")
    json_path, md_path = write_report(report, out_dir, title)
    return report, json_path, md_path


def add_eval_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("evaluation")
    group.add_argument("--adapter", metavar="DIR", help="adapter folder saved by training (none: the base model)")
    group.add_argument("--compare", action="store_true",
                       help="also evaluate the base model (adapter disabled; one model in memory): one report, "
                            "a column per system")
    group.add_argument("--human-judgments", metavar="FILE.jsonl",
                       help="grade SummEval-style rated summaries and correlate with the human ratings (the "
                            "file's format: below)")
    group.add_argument("--no-progress", action="store_true", help="no progress bar while generating")


def main(argv: list[str] | None = None) -> None:
    parser = build_parser(__doc__, extra=add_eval_flags)  # the docstring's examples end --help
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
