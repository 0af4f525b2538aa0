#!/usr/bin/env python
"""Print the memory plan of a training run without loading any weights (the model is built on the meta device).

Takes the flags of scripts/train.py and plans as a run with them does (planner.plan_run: the step's peak, the
load's peak, and on a GPU the per-layer table's place; the settings given are kept), then prints the plan the run
prints. --model also takes a config.json file and gemma-3n-e2b (the Gemma 3n E2B text config shipped in the
package); a hub id's config is fetched, not its weights.

Examples:
  python scripts/plan_memory.py --model gemma-3n-e2b --max-mem 8GB
  python scripts/plan_memory.py --model gemma-3-270m --max-mem 4GB --max-seq-length 1024
  python scripts/plan_memory.py --model ./my-model --max-mem 16GiB --max-seq-length 1024 --device cuda
  python scripts/plan_memory.py --model gemma-3n-e2b --max-mem 8GB --device cuda --gpu-capability 7.5  # a T4
  python scripts/plan_memory.py --model gemma-3n-e2b --max-mem 12GB --task preference
"""

from __future__ import annotations

import argparse
from contextlib import AbstractContextManager, nullcontext
from unittest import mock

import torch

from gemma_lowmem.cli import build_parser, config_from_args, given_settings, run_script
from gemma_lowmem.device import default_device, resolve_precision, weight_dtype
from gemma_lowmem.errors import UserError
from gemma_lowmem.memory import GiB, parse_size
from gemma_lowmem.planner import apply_plan, describe_run, load_model_config, plan_run
from gemma_lowmem.tasks import get_task


def _device_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("plan_memory (the device to plan for)")
    group.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                       help="where the run trains (default: auto, where a run on this machine would)")
    group.add_argument("--gpu-capability", default="8.0", metavar="MAJOR.MINOR",
                       help="--device cuda on a machine without a GPU: the GPU's compute capability, which picks "
                       "the precision as a run there would: 8.0 or newer bf16 (A100, L4, H100), older fp16 with "
                       "fp32 weights (7.5: a T4) (default: 8.0)")


def _capability(text: str) -> tuple[int, int]:
    major, dot, minor = text.partition(".")
    if not (dot and major.isdigit() and minor.isdigit()):
        raise UserError(f"--gpu-capability {text!r} is not a compute capability; write e.g. 8.0 or 7.5")
    return int(major), int(minor)


def _simulated_gpu(device: torch.device, capability: tuple[int, int]) -> AbstractContextManager:
    """Planning for a GPU from a machine without one: torch answers the one question the plan asks the GPU (its
    compute capability: bf16 or fp16 autocast, and so the weights' dtype) as that GPU would."""
    if device.type != "cuda" or torch.cuda.is_available():
        return nullcontext()
    name = "the simulated GPU (--gpu-capability)"  # named in the error for --precision bf16 on a T4
    return mock.patch.multiple(torch.cuda, get_device_capability=lambda device=None: capability,
                               get_device_name=lambda device=None: name)


def main() -> None:
    args = build_parser(__doc__, _device_flags).parse_args()
    cfg = config_from_args(args)
    parse_size(cfg.train.max_mem)  # a bad size fails before the model config is read (a hub id's is fetched)
    capability = _capability(args.gpu_capability)
    device = {"auto": default_device(), "cpu": torch.device("cpu"), "cuda": torch.device("cuda", 0)}[args.device]
    task = get_task(cfg.data.task)
    model_config = load_model_config(cfg.model.model)
    with _simulated_gpu(device, capability):
        # as scripts/train.py: the memory planner keeps the training settings given, chooses the rest
        plan = plan_run(cfg, model_config, device, keep=set(given_settings(args)["train"]),
                        activation_factor=task.activation_factor)
        planned = plan.apply(cfg)
        shape = describe_run(planned, model_config, device)
        weights = weight_dtype(device, planned.model.dtype, planned.train.precision)
        activations = resolve_precision(device, planned.train.precision).dtype or torch.float32
    print(f"model {cfg.model.model}: {shape.num_layers} layers, hidden {shape.hidden}, vocab {shape.vocab}; "
          f"frozen weights {sum(shape.weight_bytes.values()) / GiB:.2f} GiB ({shape.quant}, "
          f"{str(weights).removeprefix('torch.')} otherwise); LoRA {shape.lora_params:,} parameters; "
          f"{device.type}, activations {str(activations).removeprefix('torch.')}")
    apply_plan(cfg, plan, device.type)


if __name__ == "__main__":
    run_script(main)
