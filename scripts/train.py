#!/usr/bin/env python
"""Train a LoRA adapter on an 8-bit Gemma within a memory budget.

Examples:
  python scripts/train.py --max-mem 8GB --demo                  # bundled Gemma 3 270M + demo set, CPU-friendly
  python scripts/train.py --model google/gemma-3n-E2B-it --preset baseline --data abisee/cnn_dailymail
  python scripts/train.py --model ./my-model --train-file train.jsonl --val-file val.jsonl --lang en
  python scripts/train.py --model ./my-model --data teacher.csv --columns article=text highlights=reference

At the end (finished, stopped early or by Ctrl-C / SIGTERM) it prints where the adapter, the report and the
summary are, and the command that resumes the run.
"""

import shlex
from pathlib import Path

from gemma_lowmem.cli import build_parser, config_from_args, given_settings, run_script
from gemma_lowmem.distributed import close_distributed, current_ranks
from gemma_lowmem.run import report_after_training, train_from_config

STOPPED = {
    "max_steps": "finished",
    "early_stopping": "stopped early (validation loss stopped improving)",
    "signal": "stopped by a signal (the last step is checkpointed)",
}


def _quote(path: Path) -> str:
    return shlex.quote(str(path))  # a path with spaces stays copy-pasteable


def where_things_are(run_dir: Path, stopped: str, report: Path | None, evaluated: bool, world_size: int) -> str:
    """The end-of-run lines: the run folder, the adapters, the report (or how to write one), the summary, and the
    command that resumes the run (``config.json`` holds the planned settings, so the data order matches).

    Args:
        run_dir: the run folder.
        stopped: ``FitResult.stopped``.
        report: the evaluation report, if one was written.
        evaluated: evaluation was asked for (``--evaluate``).
        world_size: processes under torchrun (the resumed run needs as many).

    Returns:
        The lines, joined.
    """
    adapter = run_dir / "adapter"
    lines = [f"run {STOPPED.get(stopped, stopped)}: {run_dir}", f"  adapter:      {adapter}"]
    if (run_dir / "adapter_best").is_dir():
        lines.append(f"  best adapter: {run_dir / 'adapter_best'}")  # the lowest validation loss
    if report is not None:
        lines.append(f"  report:       {report}")
    else:
        why = ("stopped by a signal" if stopped == "signal" else "no generation metrics or no validation rows"
               if evaluated else "evaluation off")
        lines.append(f"  report:       none ({why}); write one with: "
                     f"python scripts/evaluate.py --adapter {_quote(adapter)}")
    lines.append(f"  summary:      {run_dir / 'summary.json'}")
    launcher = f"torchrun --nproc-per-node {world_size} " if world_size > 1 else "python "
    resume = f"{launcher}scripts/train.py --config {_quote(run_dir / 'config.json')} --resume {_quote(run_dir)}"
    more = "" if stopped == "signal" else " (to train further, add a larger --max-steps or --epochs)"
    lines.append(f"  resume{more}: {resume}")
    return "\n".join(lines)


def main() -> None:
    parser = build_parser(__doc__)
    args = parser.parse_args()
    cfg = config_from_args(args)
    # the memory planner chooses batch split, checkpointing and loss chunk unless they were given
    prepared, result = train_from_config(cfg, keep=set(given_settings(args)["train"]))
    cfg = prepared.config
    ranks = current_ranks()
    if ranks.is_main:
        print(
            f"done: {result.steps} steps, {result.loss_tokens:,} loss tokens in {result.seconds:.0f} s "
            f"({result.loss_tokens_per_s:.1f} loss tokens/s), final loss {result.final_loss}, "
            f"best validation loss {result.best_val_loss}, peak memory "
            + ", ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in result.peak_memory.items())
        )
        # A stopped run is resumed, not evaluated: generation would take as long as the user just cut short.
        evaluate = cfg.eval.evaluate and result.stopped != "signal"
        report = report_after_training(cfg, prepared) if evaluate else None
        print(where_things_are(prepared.run_dir, result.stopped, report, cfg.eval.evaluate, ranks.world_size))
    close_distributed()


if __name__ == "__main__":
    run_script(main)
