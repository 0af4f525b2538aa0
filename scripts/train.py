#!/usr/bin/env python
"""Train a LoRA adapter on an 8-bit Gemma within a memory budget.

Examples:
  python scripts/train.py --max-mem 8GB --demo                  # bundled Gemma 3 270M + demo set, CPU-friendly
  python scripts/train.py --model google/gemma-3n-E2B-it --preset baseline --data abisee/cnn_dailymail
  python scripts/train.py --model ./my-model --train-file train.jsonl --val-file val.jsonl --lang en
"""

from gemma_lowmem.cli import build_parser, config_from_args, given_settings, run_script
from gemma_lowmem.distributed import close_distributed, current_ranks
from gemma_lowmem.run import evaluate_after_training, train_from_config


def main() -> None:
    parser = build_parser(__doc__.strip().splitlines()[0])
    args = parser.parse_args()
    cfg = config_from_args(args)
    # the memory planner chooses batch split, checkpointing and loss chunk unless they were given
    prepared, result = train_from_config(cfg, keep=set(given_settings(args)["train"]))
    cfg = prepared.config
    if current_ranks().is_main:
        print(
            f"done: {result.steps} steps, {result.loss_tokens:,} loss tokens in {result.seconds:.0f} s "
            f"({result.loss_tokens_per_s:.1f} loss tokens/s), final loss {result.final_loss}, "
            f"best validation loss {result.best_val_loss}, peak memory "
            + ", ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in result.peak_memory.items())
        )
        print(f"adapter: {prepared.run_dir / 'adapter'}  summary: {prepared.run_dir / 'summary.json'}")
        if cfg.eval.evaluate and result.stopped == "signal":
            print("stopped by a signal: no evaluation now (scripts/evaluate.py --adapter on the adapter later)")
        elif cfg.eval.evaluate:
            report = evaluate_after_training(cfg, prepared)
            print(f"evaluation report: {report}" if report else f"task {cfg.data.task}: no generation metrics")
    close_distributed()


if __name__ == "__main__":
    run_script(main)
