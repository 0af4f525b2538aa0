#!/usr/bin/env python
"""Print the memory plan of a LoRA run for a model and a budget, without loading any weights (meta device).

MODEL is a config.json file, a model folder, ``gemma-3n-e2b`` (the Gemma 3n E2B text config shipped in the
package), ``gemma-3-270m`` (the bundled Gemma 3 270M) or a hub id (its config is fetched, not its weights).

Examples:
  python scripts/plan_memory.py --model gemma-3n-e2b --max-mem 8GB
  python scripts/plan_memory.py --model gemma-3-270m --max-mem 4GB --max-seq-length 1024
  python scripts/plan_memory.py --model ./my-model --max-mem 16GiB --max-seq-length 1024 --device cuda
  python scripts/plan_memory.py --model gemma-3n-e2b --max-mem 12GB --task preference
"""

from __future__ import annotations

import argparse

import torch

from gemma_lowmem.cli import run_script
from gemma_lowmem.config import LoraConfig
from gemma_lowmem.device import DTYPES, default_device, resolve_precision, weight_dtype
from gemma_lowmem.errors import UserError
from gemma_lowmem.memory import GiB, parse_size
from gemma_lowmem.planner import EMBEDDINGS, StepSpec, describe_model, load_model_config, plan_memory
from gemma_lowmem.tasks import get_task


def _dtypes(device: str, dtype: str, precision: str) -> tuple[torch.dtype, torch.dtype]:
    """(frozen weights' dtype, activations' dtype) as a run on ``device`` would pick them."""
    target = default_device() if device == "auto" else torch.device(device)
    if target.type == "cuda" and not torch.cuda.is_available():
        # Planning for a GPU from a machine without one: assume a bf16 GPU (Ampere or newer) unless told; under
        # fp16 (a T4) the float weights are fp32, as weight_dtype picks them.
        autocast = DTYPES["bf16" if precision == "auto" else precision]
        if dtype != "auto":
            return DTYPES[dtype], autocast
        return (torch.bfloat16 if autocast == torch.bfloat16 else torch.float32), autocast
    weights = weight_dtype(target, dtype, precision)
    return weights, resolve_precision(target, precision).dtype or torch.float32


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", required=True,
                        help="config.json, model folder, gemma-3n-e2b, gemma-3-270m or hub id")
    parser.add_argument("--max-mem", default="8GB", help="memory budget, e.g. 8GB, 7.5GiB, 8000MB")
    parser.add_argument("--max-seq-length", type=int, default=2048, help="tokens per row")
    parser.add_argument("--global-batch-tokens", type=int, default=None,
                        help="tokens per optimizer step (default: 8 rows of --max-seq-length)")
    parser.add_argument("--quant", default="int8", choices=("int8", "nf4", "none"))
    parser.add_argument("--dtype", default="auto", choices=("auto", *DTYPES), help="frozen non-quantized weights")
    parser.add_argument("--precision", default="auto", choices=("auto", *DTYPES), help="autocast of activations")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--task", default="summary_eval", help="task (preference pairs count twice)")
    parser.add_argument("--lora-r", type=int, default=LoraConfig().r)
    parser.add_argument("--lora-target-modules", nargs="+", default=LoraConfig().target_modules)
    parser.add_argument("--embeddings", default="int8", choices=EMBEDDINGS,
                        help="big embedding tables: float (the weights' dtype), int8 rows, or int8 with Gemma 3n's "
                        "per-layer table memory-mapped from disk (--embeddings-on-disk)")
    args = parser.parse_args()

    parse_size(args.max_mem)  # a bad size fails before the model config is read
    for flag, value in (("--max-seq-length", args.max_seq_length), ("--global-batch-tokens", args.global_batch_tokens),
                        ("--lora-r", args.lora_r)):
        if value is not None and value <= 0:
            raise UserError(f"{flag}={value} must be > 0")
    device_type = (default_device().type if args.device == "auto" else args.device)
    weights_dtype, act_dtype = _dtypes(args.device, args.dtype, args.precision)
    dtype_bytes = torch.finfo(weights_dtype).bits // 8
    model_config = load_model_config(args.model)
    kw = dict(quant=args.quant, dtype_bytes=dtype_bytes, embeddings=args.embeddings,
              lora_r=args.lora_r, lora_targets=args.lora_target_modules)
    shape = describe_model(model_config, **kw)
    print(f"model {args.model}: {shape.num_layers} layers, hidden {shape.hidden}, vocab {shape.vocab}; "
          f"frozen weights {sum(shape.weight_bytes.values()) / GiB:.2f} GiB ({args.quant}, "
          f"{str(weights_dtype).removeprefix('torch.')} otherwise); LoRA {shape.lora_params:,} parameters; "
          f"{device_type}, activations {str(act_dtype).removeprefix('torch.')}")
    step = StepSpec(batch_size=1, seq_len=args.max_seq_length, task_factor=get_task(args.task).activation_factor)
    plan = plan_memory(shape, budget=args.max_mem, step=step, device_type=device_type,
                       global_batch_tokens=args.global_batch_tokens or 8 * args.max_seq_length)
    print(plan.table())


if __name__ == "__main__":
    run_script(main)
