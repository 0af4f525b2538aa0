#!/usr/bin/env python
"""Peak memory of LoRA training on an int8 model built from its config alone: predicted vs measured.

The default builds the full Gemma 3n E2B text model (the config shipped in ``gemma_lowmem/configs``: 4.44B
parameters) with random weights written straight into their final form: decoder projections as bitsandbytes
``Linear8bitLt`` (random int8 weights and row scales: no float copy of a weight ever exists), the per-layer
embedding table as a row-wise int8 ``gemma_lowmem_kernels.Int8Embedding`` (drawn a chunk of rows at a time), the tied
embedding and the norms in the weights' dtype. It then adds the default LoRA adapter, runs optimizer steps of
``gemma_lowmem.train.fit`` on random token rows and prints one JSON line with the planner's prediction
(``gemma_lowmem.planner.predict_peak``), the measured peak and their ratio.

On the CPU the measured peak is the process's peak resident memory (VmHWM): the larger of the build phase
(``build_peak_gib``: imports, weights, LoRA) and the training phase (``train_peak_gib``: the loop resets the
high-water mark). Rows carry labels on their last ``--answer-tokens`` (a prompt, then the answer). Measured on
2 shared AVX2 cores (fp32): the E2B build takes ~5 min and one 2048-token step 15-30 min; ``--warmup-tokens 128``
makes the first step a short row that allocates the gradients and AdamW states, so that the second, full step
holds all a steady-state step holds, in half the time.

The same harness measures any Gemma 3 / 3n config (``--config``) or a real model (``--load``), which is how the
planner's constants were calibrated (``--calibrate`` runs that grid, one subprocess per measurement).

Examples:
  python benchmarks/e2b_memory.py                               # E2B, 2 steps of 1 x 2048 tokens
  python benchmarks/e2b_memory.py --warmup-tokens 128          # the same, the first step short (faster)
  python benchmarks/e2b_memory.py --config path/to/config.json --tokens 1024 --batch-size 2
  python benchmarks/e2b_memory.py --load gemma-3-270m --tokens 2048 --batch-size 2
  python benchmarks/e2b_memory.py --calibrate                   # the calibration grid of gemma_lowmem/planner.py
"""

from __future__ import annotations

import argparse
import atexit
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from gemma_lowmem.memory import GiB, _status_kib, return_freed_memory_to_os
from gemma_lowmem.model import INT8_SKIP_MODULES
from gemma_lowmem.planner import EMBEDDINGS, StepSpec, describe_model, load_model_config, predict_peak

# Standard deviation of integers drawn uniformly from [-127, 127]: sqrt((255^2 - 1) / 12).
INT8_UNIFORM_STD = 73.6


def rss_gib() -> float:
    return (_status_kib("VmRSS") or 0) / 2**20


def hwm_gib() -> float:
    return (_status_kib("VmHWM") or 0) / 2**20


def random_int8_linear(linear: nn.Module, threshold: float, generator: torch.Generator, dtype: torch.dtype,
                       std: float = 0.02) -> nn.Module:
    """A bitsandbytes ``Linear8bitLt`` with random int8 weights, as ``from_pretrained(load_in_8bit)`` leaves it.

    Args:
        linear: the (meta) ``nn.Linear`` to replace; only its shape and bias are read.
        threshold: LLM.int8 outlier threshold (``BitsAndBytesConfig.llm_int8_threshold``, 6.0 by default).
        generator: random generator of the int8 weights.
        dtype: dtype of a bias.
        std: standard deviation of the dequantized weight.

    Returns:
        The module, with ``weight`` (out, in) int8 and its row scales ``SCB`` (out,) fp32.
    """
    import bitsandbytes as bnb

    out_f, in_f = linear.out_features, linear.in_features
    module = bnb.nn.Linear8bitLt(in_f, out_f, bias=linear.bias is not None, has_fp16_weights=False,
                                 threshold=threshold, device="meta")
    cb = torch.randint(-127, 128, (out_f, in_f), dtype=torch.int8, generator=generator)  # (out, in), int8 only
    scb = torch.full((out_f,), std * 127 / INT8_UNIFORM_STD)  # (out,): weight = cb * scb / 127
    module.weight = bnb.nn.Int8Params(cb, requires_grad=False, has_fp16_weights=False, CB=cb, SCB=scb)
    if linear.bias is not None:
        module.bias = nn.Parameter(torch.zeros(out_f, dtype=dtype), requires_grad=False)
    return module


def build_random_int8(model_config, dtype: torch.dtype, *, threshold: float = 6.0, embeddings: str = "int8",
                      table_file: str | None = None, seed: int = 0) -> nn.Module:
    """The causal LM of ``model_config`` with random weights, materialized module by module in their final form.

    The model is first built on the meta device (no memory). Decoder ``nn.Linear`` layers become int8
    ``Linear8bitLt`` (except ``INT8_SKIP_MODULES``); with ``embeddings`` "int8" or "disk" the tied embedding and
    Gemma 3n's per-layer table are ``Int8Embedding.random`` (the head reads the embedding's rows:
    ``model.Int8TiedHead``), and with "disk" the per-layer table is written to ``table_file`` and memory-mapped;
    the remaining parameters (norms, AltUp coefficients) are allocated in ``dtype`` and initialised by the
    model's own ``_init_weights``; rotary embeddings are rebuilt on the CPU (their buffers are computed).

    Returns:
        The model on the CPU, every parameter frozen.
    """
    from transformers import AutoModelForCausalLM

    from gemma_lowmem.model import Int8TiedHead, use_int8_kernels
    from gemma_lowmem_kernels import Int8Embedding

    generator = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config, dtype=dtype)
    decoder = model.get_decoder()
    table = getattr(decoder, "embed_tokens_per_layer", None)
    if embeddings != "float" and isinstance(table, nn.Embedding):
        decoder.embed_tokens_per_layer = Int8Embedding.random(
            table.num_embeddings, table.embedding_dim, std=0.02, generator=generator, padding_idx=table.padding_idx,
            embed_scale=getattr(table, "scalar_embed_scale", None), dtype=dtype,
            table_file=table_file if embeddings == "disk" else None,
        )
    embedding = model.get_input_embeddings()
    if embeddings != "float" and model.get_output_embeddings().weight is embedding.weight:
        tied = Int8Embedding.random(
            embedding.num_embeddings, embedding.embedding_dim, std=0.02, generator=generator,
            padding_idx=embedding.padding_idx, embed_scale=getattr(embedding, "scalar_embed_scale", None), dtype=dtype,
        )
        model.set_input_embeddings(tied)
        model.set_output_embeddings(Int8TiedHead(tied))
    for name, module in list(decoder.named_modules()):
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] not in INT8_SKIP_MODULES:
            decoder.set_submodule(name, random_int8_linear(module, threshold, generator, dtype))
    for name, module in list(model.named_modules()):
        if "RotaryEmbedding" in type(module).__name__:
            model.set_submodule(name, type(module)(model_config))  # small; its buffers are computed, not loaded

    # Everything still on the meta device: allocate in place (tied tensors once), then the model's own init.
    fresh: dict[int, torch.Tensor] = {}
    for module in model.modules():
        touched = False
        for store in (module._parameters, module._buffers):
            for key, tensor in store.items():
                if tensor is None or not tensor.is_meta:
                    continue
                if id(tensor) not in fresh:
                    empty = torch.empty(tensor.shape, dtype=tensor.dtype)
                    fresh[id(tensor)] = nn.Parameter(empty, requires_grad=False) if store is module._parameters \
                        else empty
                store[key] = fresh[id(tensor)]
                touched = True
        if touched:
            decoder._init_weights(module)  # the decoder's: Gemma 3n's reads attributes of the text model
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    assert not leftover, f"still on the meta device: {leftover[:5]}"
    model.requires_grad_(False)
    use_int8_kernels(model)  # as load_base_model does
    return model


PER_LAYER_LISTS = ("intermediate_size", "activation_sparsity_pattern", "layer_types")


def override_config(model_config, sets: list[str]):
    """A copy of ``model_config`` with ``KEY=JSON`` fields set; per-layer lists follow ``num_hidden_layers``."""
    values = model_config.to_dict()
    for item in sets:
        key, _, text = item.partition("=")
        values[key] = json.loads(text)
    layers = values["num_hidden_layers"]
    for key in PER_LAYER_LISTS:
        if isinstance(values.get(key), list) and not any(item.startswith(key + "=") for item in sets):
            values[key] = (values[key] * layers)[:layers] if len(values[key]) < layers else values[key][:layers]
    return type(model_config)(**values)


def random_examples(count: int, length: int, vocab: int, answer_tokens: int, seed: int) -> list[dict[str, list[int]]]:
    """Random token rows; labels only on the last ``answer_tokens`` tokens (a prompt, then the answer)."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(count):
        ids = torch.randint(3, vocab, (length,), generator=generator).tolist()
        labels = [-100] * (length - answer_tokens) + ids[length - answer_tokens:]
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def predict(args: argparse.Namespace, model_config=None) -> dict:
    """The planner's prediction for the measured setting: ``predicted_peak_gib`` and its breakdown."""
    from gemma_lowmem.config import LoraConfig
    from gemma_lowmem.device import weight_dtype
    from gemma_lowmem.model import BUNDLED, resolve_model_path

    if model_config is None:
        source = args.load or args.config
        source = resolve_model_path(source) if source in BUNDLED else source
        model_config = override_config(load_model_config(source), args.set)
    device = torch.device("cpu")
    dtype = weight_dtype(device, args.dtype)
    lora = LoraConfig()
    shape = describe_model(model_config, quant="int8", dtype_bytes=torch.finfo(dtype).bits // 8,
                           embeddings=args.embeddings, lora_r=lora.r, lora_targets=lora.target_modules)
    step = StepSpec(batch_size=args.batch_size, seq_len=args.tokens // args.batch_size,
                    gradient_checkpointing=not args.no_checkpointing, loss_chunk_size=args.loss_chunk,
                    packed=not args.no_packing)
    breakdown = predict_peak(shape, step, "cpu")
    return {
        "predicted_peak_gib": round(sum(breakdown.values()) / GiB, 3),
        "breakdown_gib": {k: round(v / GiB, 3) for k, v in breakdown.items()},
        "tokens": args.tokens, "batch_size": args.batch_size, "checkpointing": not args.no_checkpointing,
        "loss_chunk_size": args.loss_chunk, "dtype": str(dtype), "steps": args.steps,
        "warmup_tokens": args.warmup_tokens,
    }


def _seed_planning_first(short: int, rows: int, count: int) -> int:
    """A seed whose first packed micro-batch (one row) is the short warm-up example (index 0)."""
    from gemma_lowmem.data.sampler import plan_epoch

    lengths = [short] + [rows] * (count - 1)
    return next(s for s in range(1000) if plan_epoch(lengths, 1, seed=s, epoch=0, mode="pack", pack_len=rows)[0]
                == [[0]])


def measure(args: argparse.Namespace) -> dict:
    """Build (or load), add LoRA, train ``args.steps`` steps; return the JSON record."""
    from gemma_lowmem.config import LoraConfig, ModelConfig, TrainConfig
    from gemma_lowmem.data.collate import collate_for
    from gemma_lowmem.device import weight_dtype
    from gemma_lowmem.model import BUNDLED, add_lora, load_base_model, resolve_model_path
    from gemma_lowmem.train import fit

    device = torch.device("cpu")
    dtype = weight_dtype(device, args.dtype)
    scratch = Path(tempfile.mkdtemp(prefix="e2b_memory-"))  # the memory-mapped table of --embeddings disk
    atexit.register(shutil.rmtree, scratch, True)
    record: dict = {"config": args.load or args.config, "embeddings": args.embeddings, "set": args.set,
                    "runtime_gib": rss_gib(), "malloc_tuned": not args.keep_malloc_default}
    t0 = time.perf_counter()
    if args.load:
        path = resolve_model_path(args.load)
        model_config = load_model_config(path)
        base = load_base_model(ModelConfig(model=path, quant="int8", dtype=args.dtype,
                                           int8_embeddings=args.embeddings != "float",
                                           embeddings_on_disk=args.embeddings == "disk"), device)
    else:
        source = resolve_model_path(args.config) if args.config in BUNDLED else args.config
        model_config = override_config(load_model_config(source), args.set)
        base = build_random_int8(model_config, dtype, embeddings=args.embeddings, seed=args.seed,
                                 table_file=str(scratch / "per-layer.int8"))
    record["build_s"] = round(time.perf_counter() - t0, 1)
    record["after_weights_gib"] = rss_gib()
    lora = LoraConfig()
    torch.manual_seed(args.seed)
    model = add_lora(base, lora, gradient_checkpointing=not args.no_checkpointing)
    record["after_lora_gib"] = rss_gib()
    record["build_peak_gib"] = hwm_gib()

    rows = args.tokens // args.batch_size
    vocab = min(model_config.vocab_size, getattr(model_config, "vocab_size_per_layer_input", None) or 10**9)
    answer = min(args.answer_tokens or rows, rows)
    train = random_examples(args.batch_size * args.steps, rows, vocab, answer, args.seed)
    seed = args.seed
    if args.warmup_tokens:
        # Step 1 trains one short row: it allocates the LoRA gradients and AdamW states, so the full-size steps
        # after it hold everything a steady-state step holds, at a fraction of a full step's time.
        train = random_examples(1, args.warmup_tokens, vocab, args.warmup_tokens, args.seed) + train[:-1]
        seed = _seed_planning_first(args.warmup_tokens, rows, len(train))
    cfg = TrainConfig(
        max_steps=args.steps, batch_size=args.batch_size, grad_accum=1, eval_every=0, save_every=0,
        gradient_checkpointing=not args.no_checkpointing, loss_chunk_size=args.loss_chunk,
        packing=not args.no_packing, pack_len=rows, warmup_ratio=0.0, precision=args.precision, seed=seed,
    )
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as run_dir:
        collate_fn = collate_for(model, pad_id=0, packed=cfg.packing)
        result = fit(model, train, [], cfg, run_dir=run_dir, collate_fn=collate_fn, show_progress=False)
    record["train_s"] = round(time.perf_counter() - t0, 1)
    record["final_loss"] = result.final_loss
    record["train_peak_gib"] = result.peak_memory["peak_rss"] / GiB
    record["measured_peak_gib"] = max(record["build_peak_gib"], record["train_peak_gib"])

    record.update(predict(args, model_config))
    record["ratio"] = round(record["measured_peak_gib"] / record["predicted_peak_gib"], 3)
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in record.items()}


# E2B widths (hidden 2048, MLP 8192, AltUp 4) with a small vocabulary, and the Gemma 3 270M shape.
_N = ["--set", "vocab_size=4096", "--set", "vocab_size_per_layer_input=4096", "--set", "num_kv_shared_layers=0"]
_G = ["--config", "gemma-3-270m"]
_TINY = ["--set", "num_hidden_layers=1", "--set", "num_kv_shared_layers=0", "--set", "vocab_size=512", "--set",
         "vocab_size_per_layer_input=512", "--set", "hidden_size=64", "--set", "intermediate_size=[128]", "--set",
         "num_attention_heads=2", "--set", "num_key_value_heads=1", "--set", "head_dim=32", "--set",
         "hidden_size_per_layer_input=8", "--set", "laurel_rank=4", "--tokens", "64"]
CALIBRATION_GRID: list[list[str]] = [
    _TINY,  # the runtime: Python, torch, transformers, peft, bitsandbytes through a whole fit()
    [*_N, "--set", "num_hidden_layers=2", "--tokens", "512"],
    [*_N, "--set", "num_hidden_layers=4", "--tokens", "512"],
    [*_N, "--set", "num_hidden_layers=2", "--tokens", "2048"],
    [*_N, "--set", "num_hidden_layers=2", "--tokens", "2048", "--batch-size", "2"],
    [*_N, "--set", "num_hidden_layers=2", "--tokens", "1024", "--no-checkpointing"],
    [*_N, "--set", "num_hidden_layers=4", "--tokens", "512", "--keep-malloc-default"],
    [*_G, "--tokens", "2048", "--batch-size", "2"],
    [*_G, "--tokens", "2048"],
    [*_G, "--tokens", "2048", "--batch-size", "2", "--loss-chunk", "64"],
    [*_G, "--tokens", "1024", "--no-checkpointing"],
    ["--load", "gemma-3-270m", "--tokens", "2048", "--batch-size", "2"],
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--config", default="gemma-3n-e2b", help="config.json, model folder, gemma-3n-e2b or hub id")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                        help="override a config field, e.g. num_hidden_layers=4 (per-layer lists follow)")
    parser.add_argument("--load", help="load this real model (int8 via load_base_model) instead of random weights")
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per micro-batch (batch size x row length)")
    parser.add_argument("--batch-size", type=int, default=1, help="rows per micro-batch")
    parser.add_argument("--answer-tokens", type=int, default=512, help="labelled tokens per row (0: all)")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps (2: the second has AdamW states)")
    parser.add_argument("--warmup-tokens", type=int, default=0,
                        help="make step 1 a short row of this many tokens (allocates grads and AdamW states fast)")
    parser.add_argument("--predict-only", action="store_true", help="print the prediction only (no model built)")
    parser.add_argument("--loss-chunk", type=int, default=None, help="tokens per loss chunk (default: the loss's)")
    parser.add_argument("--no-checkpointing", action="store_true")
    parser.add_argument("--no-packing", action="store_true")
    parser.add_argument("--dtype", default="auto", help="frozen non-int8 weights: auto, bf16, fp32")
    parser.add_argument("--precision", default="auto", help="autocast: auto, bf16, fp32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--embeddings", default="int8", choices=EMBEDDINGS,
                        help="big tables: float, int8 rows, or int8 with the per-layer table memory-mapped (disk)")
    parser.add_argument("--keep-malloc-default", action="store_true",
                        help="skip gemma_lowmem.memory.return_freed_memory_to_os (glibc keeps freed blocks)")
    parser.add_argument("--calibrate", action="store_true", help="run the calibration grid, one process each")
    args = parser.parse_args()
    if args.calibrate:
        for extra in CALIBRATION_GRID:
            out = subprocess.run([sys.executable, __file__, *extra], capture_output=True, text=True, check=False)
            print(out.stdout.strip().splitlines()[-1] if out.returncode == 0 else f"{extra}: {out.stderr[-500:]}",
                  flush=True)
        return
    if args.warmup_tokens and (args.batch_size != 1 or args.no_packing or args.steps < 2):
        parser.error("--warmup-tokens needs --batch-size 1, packing and --steps >= 2")
    if args.predict_only:
        print(json.dumps(predict(args)))
        return
    if not args.keep_malloc_default:
        return_freed_memory_to_os()
    print(json.dumps(measure(args)))


if __name__ == "__main__":
    main()
