#!/usr/bin/env python
"""Build a task's conversations, tokenize them once (cached) and print their statistics.

Prints counts per student-summary kind, the score distribution per criterion, token length percentiles and how
many conversations were cut or dropped; writes a few rendered examples to a file for a person to read.

Example:
  python scripts/prepare_data.py --task summary_eval --data ../shared/data/cnn_dailymail/validation_first1000.jsonl \
      --model gemma-3-270m --examples-file examples.md
"""

import json
from pathlib import Path

import numpy as np

from gemma_lowmem.cli import build_parser, config_from_args, run_script
from gemma_lowmem.data.tokenize import render
from gemma_lowmem.model import load_tokenizer, resolve_model_path
from gemma_lowmem.run import encode
from gemma_lowmem.tasks import get_task


def extra_flags(parser) -> None:
    parser.add_argument("--examples-file", default="prepared_examples.md", help="where rendered examples go")
    parser.add_argument("--n-examples", type=int, default=4, help="how many rendered examples to write")


def main() -> None:
    args = build_parser(__doc__, extra_flags).parse_args()
    cfg = config_from_args(args)
    task = get_task(cfg.data.task)
    train, val = task.build_datasets(cfg.data, cfg.train.seed)
    print(f"conversations: {len(train)} train, {len(val)} val")
    if task.summary_statistics is not None:
        print(json.dumps(task.summary_statistics(train), indent=2, ensure_ascii=False))
    tokenizer = load_tokenizer(resolve_model_path(cfg.model.model))
    encoded = encode(cfg, tokenizer, train, "tokenizing train")
    lengths = np.array([len(e["input_ids"]) for e in encoded.examples])
    answers = np.array([sum(t != -100 for t in e["labels"]) for e in encoded.examples])
    pct = [50, 90, 99, 100]
    for name, values in (("tokens per conversation", lengths), ("answer (loss) tokens", answers)):
        print(f"{name}, percentiles {pct}: {np.percentile(values, pct).astype(int).tolist()}")
    print(f"cut to fit {cfg.data.max_seq_length} tokens: {encoded.n_cut}; dropped: {encoded.n_dropped}")
    out = Path(args.examples_file)
    parts = []
    for conv in train[: args.n_examples]:
        text = render(tokenizer, conv.messages, add_generation_prompt=False, system_role=cfg.model.system_role)
        parts.append(f"## {conv.meta.get('id', '')} ({conv.meta.get('kind', '')})\n\n```\n{text}\n```\n")
    out.write_text("\n".join(parts), encoding="utf-8")
    print(f"rendered examples: {out}")


if __name__ == "__main__":
    run_script(main)
