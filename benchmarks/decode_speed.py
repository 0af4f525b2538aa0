#!/usr/bin/env python
"""Grading speed with and without the decoding weight cache, in one run, on the bundled Gemma 3 270M (int8).

For each mode (``scores``, ``guided``) the same rows are graded twice, the order alternating per round: once with
``float_weight_cache`` off (budget 0: every int8 layer dequantizes its weight at every forward, the head its
262,144-row table per token) and once on (each layer's whole float weight made once). It reports seconds per
graded summary, the ratio, the float copies' size, and whether both ways gave the same scores. JSON goes to
``benchmarks/results/``.

Example (rows from the shared CNN/DailyMail validation file; the student summary is the reference's first
sentence)::

  python benchmarks/decode_speed.py --rows 4 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from gemma_lowmem.cli import run_script
from gemma_lowmem.config import DataConfig, ModelConfig
from gemma_lowmem.device import default_device, resolve_precision
from gemma_lowmem.errors import UserError
from gemma_lowmem.evaluation.guided import Decoding
from gemma_lowmem.grading import grade
from gemma_lowmem.model import float_weight_cache, load_base_model, load_tokenizer, resolve_model_path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "cnn_dailymail" / "validation_first1000.jsonl"
RESULTS = ROOT / "benchmarks" / "results"


def _rows(path: Path, n: int) -> list[dict[str, str]]:
    if not path.exists():
        raise UserError(f"{path}: not found (the shared CNN/DailyMail rows; see ../shared/data/README.md)")
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines()[:n]:
        record = json.loads(line)
        sentences = [s.strip() for s in record["highlights"].split("\n") if s.strip()]
        rows.append({"id": record["id"], "article": record["article"], "reference": " ".join(sentences),
                     "summary": sentences[0]})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=4, help="summaries graded per timing (default 4)")
    parser.add_argument("--rounds", type=int, default=2, help="timings per mode and setting (default 2)")
    parser.add_argument("--modes", nargs="+", default=["scores", "guided"], choices=("scores", "guided", "free"))
    parser.add_argument("--data", type=Path, default=DATA, help="JSONL with article and highlights")
    parser.add_argument("--output", type=Path, help="JSON path (default benchmarks/results/<date>-decode-speed.json)")
    args = parser.parse_args(argv)

    device = default_device()
    rows = _rows(args.data, args.rows)
    path = resolve_model_path("gemma-3-270m")
    tokenizer = load_tokenizer(path)
    model = load_base_model(ModelConfig(model="gemma-3-270m"), device, "auto")
    autocast = resolve_precision(device, "auto").autocast
    with float_weight_cache(model) as weights:  # the size of the copies, read off one forward
        with torch.no_grad(), autocast():
            model(input_ids=torch.tensor([[tokenizer.bos_token_id]], device=device))
        copies_gib = weights.used / 2**30
    result: dict = {"machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                                "device": str(device)},
                    "rows": len(rows), "rounds": args.rounds, "float_copies_gib": copies_gib, "modes": {}}
    for mode in args.modes:
        seconds: dict[str, list[float]] = {"off": [], "on": []}
        scores: dict[str, list] = {}
        for r in range(args.rounds):
            for setting in (("off", "on") if r % 2 == 0 else ("on", "off")):
                start = time.perf_counter()
                decoding = Decoding(mode=mode, batch_size=len(rows), show_progress=False, autocast=autocast,
                                    memory_budget=0 if setting == "off" else None)
                grades = grade(model, tokenizer, rows, DataConfig(lang="en"), decoding)
                seconds[setting].append((time.perf_counter() - start) / len(rows))
                scores[setting] = [g.scores for g in grades]
        off, on = min(seconds["off"]), min(seconds["on"])
        result["modes"][mode] = {"seconds_per_summary": seconds, "best_off": off, "best_on": on,
                                 "speedup": off / on, "same_scores": scores["off"] == scores["on"]}
        print(f"{mode}: {off:.2f} s/summary without the cache, {on:.2f} with ({off / on:.2f}x); "
              f"same scores: {scores['off'] == scores['on']}")
    out = args.output or RESULTS / f"{time.strftime('%Y-%m-%d')}-decode-speed.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {out}")


if __name__ == "__main__":
    run_script(main)
