#!/usr/bin/env python
"""Training throughput and memory: the usual Hugging Face recipe against gemma-lowmem's loop, and its ablations.

Every variant runs in its own process on the same token examples (the task 1 pipeline: CNN/DailyMail rows from
``../shared/data/cnn_dailymail`` when present, else the bundled demo set, or ``--data``):

- ``hf``: ``transformers.Trainer`` + PEFT LoRA (the project's r, alpha, dropout, targets) + bitsandbytes int8 through
  ``prepare_model_for_kbit_training``, gradient checkpointing, bf16 where native, per-device batch 2 with dynamic
  padding to the longest row (``DataCollatorForSeq2Seq``), labels -100 off the answer, the model's own loss.
- ``ours``: ``gemma_lowmem.run.setup`` + ``gemma_lowmem.train.fit``: packing, chunked loss, checkpointing, autocast
  where native, int8.
- ``no-packing``, ``no-bucketing``, ``no-chunked-loss``, ``no-checkpointing``, ``no-dropout``,
  ``no-float-weights``: ``ours`` with one switch off (``no-bucketing`` is ``no-packing`` with bucketing off too:
  bucketing only acts on unpacked batches; ``no-dropout`` sets LoRA dropout to 0; ``no-float-weights``
  dequantizes the int8 linears at every use instead of keeping the float copies the memory plan allows).

Each process first trains one warm-up optimizer step on its own ``2 x grad_accum`` conversations, then one epoch
over ``steps x 2 x grad_accum`` other conversations, which is what is timed (the loop only, not loading). The
held-out loss afterwards is measured the same way for all (chunked SFT loss on the same validation conversations).
The parent measures the matmul rate of this machine in the run's compute dtype (before and after the variants;
the higher counts), writes ``benchmarks/results/<date>-<host>.json`` and prints a Markdown table.

Examples:
  python benchmarks/bench_train.py --model gemma-3-270m --steps 10                  # the full matrix
  python benchmarks/bench_train.py --steps 1 --grad-accum 2 --variants hf,ours      # a quick end-to-end check
  python benchmarks/bench_train.py --variants ours --profile                        # where the time goes
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch

from gemma_lowmem.cli import run_script
from gemma_lowmem.config import DataConfig, LoraConfig, ModelConfig, RunConfig, TrainConfig
from gemma_lowmem.data.collate import IGNORE_INDEX, collate, collate_for
from gemma_lowmem.data.sampler import packing_efficiency, plan_epoch
from gemma_lowmem.device import bf16_supported, default_device, resolve_precision
from gemma_lowmem.errors import UserError
from gemma_lowmem.loss import sft_loss
from gemma_lowmem.memory import PeakMemory
from gemma_lowmem.train import fit, validation_loss

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
SHARED_DATA = SHARED / "cnn_dailymail" / "validation_first1000.jsonl"
RESULTS = Path(__file__).resolve().parent / "results"
RESULT_PREFIX = "BENCH_RESULT "  # the child's one JSON line on stdout starts with this
HF_BATCH = 2  # the usual recipe's per-device batch; unpacked variants of ours use it too
# Switches of each variant of ours; "hf" is the Hugging Face recipe.
VARIANTS: dict[str, dict[str, bool | float] | None] = {
    "hf": None,
    "ours": {},
    "no-packing": {"packing": False},
    "no-bucketing": {"packing": False, "bucketing": False},
    "no-chunked-loss": {"chunked_loss": False},
    "no-checkpointing": {"gradient_checkpointing": False},
    "no-dropout": {"lora_dropout": 0.0},
    "no-float-weights": {"float_weights": False},
}
FLOPS_FORMULA = (
    "model FLOPs = (4*N_lin + 6*N_lora) * tokens + 12 * d_attn * attended_pairs + 4 * H * V * head_positions; "
    "hardware FLOPs add (2*N_lin + 2*N_lora) * tokens + 4 * d_attn * attended_pairs with checkpointing and "
    "2 * H * V * loss_tokens with the chunked loss (its backward recomputes the logits). N_lin: frozen decoder "
    "projections (forward 2N + input gradient 2N per token, no weight gradient); N_lora: adapter parameters "
    "(forward, input and weight gradient); tokens: non-pad tokens (pads are not counted); attended_pairs: "
    "(query, key) pairs inside each conversation, causal and windowed on sliding layers; head_positions: rows the "
    "LM head projects (loss tokens for the chunked loss, every slot of the batch for full logits). "
    "MFU = model FLOPs / seconds / measured matmul rate; HFU the same with hardware FLOPs"
)


# ---- settings --------------------------------------------------------------------------------------------------


@dataclass
class Settings:
    """What every variant shares; the parent hands it to each child as flags.

    Attributes:
        model: model name or folder (``gemma_lowmem.model.resolve_model_path``).
        data: CNN/DailyMail-style file (None: the shared CNN/DailyMail rows when present, else the demo set).
        steps: timed optimizer steps of the hf recipe; the timed set is ``steps * 2 * grad_accum`` conversations.
        grad_accum: the hf recipe's gradient accumulation (conversations per step: ``2 * grad_accum``).
        max_seq_length: longest conversation in tokens (longer articles are cut).
        pack_len: tokens per packed row (None: ``max_seq_length``).
        packed_batch_size: packed rows per micro-batch of ours.
        max_article_length: articles cut to this many characters.
        lang: prompt language.
        eval_conversations: validation conversations of the held-out loss.
        seed: seed of data, LoRA init and dropout.
        threads: torch intra-op threads.
        cache_dir: tokenized-data cache (None: ``~/.cache/gemma_lowmem/tokens``).
        profile: run the timed phase under ``torch.profiler`` and write its top operators (slows the run).
        profile_dir: where profile tables go.
        malloc_mmap_threshold: glibc's ``MALLOC_MMAP_THRESHOLD_`` for every variant (None: glibc's dynamic default).
    """

    model: str = "gemma-3-270m"
    data: str | None = None
    steps: int = 10
    grad_accum: int = 4
    max_seq_length: int = 2048
    pack_len: int | None = None
    packed_batch_size: int = 1
    max_article_length: int = 2000
    lang: str = "ko"
    eval_conversations: int = 8
    seed: int = 42
    threads: int = os.cpu_count() or 1
    cache_dir: str | None = None
    profile: bool = False
    profile_dir: str = str(RESULTS)
    malloc_mmap_threshold: int | None = None

    @property
    def step_conversations(self) -> int:
        return HF_BATCH * self.grad_accum

    @property
    def timed_conversations(self) -> int:
        return self.steps * self.step_conversations


def resolve_data(data: str | None) -> str | None:
    """The data file to read, or None for the bundled demo set; a given path must exist."""
    if data is not None:
        if not Path(data).is_file():
            raise UserError(f"--data {data}: no such file; give a JSONL/CSV/Parquet file with article and highlights "
                            "(or leave --data out for the shared CNN/DailyMail rows, else the demo set)")
        return data
    return str(SHARED_DATA.resolve()) if SHARED_DATA.is_file() else None


def run_config(settings: Settings, switches: dict[str, bool | float] | None = None) -> RunConfig:
    """The project config of a variant; the hf recipe reads its LoRA, data and learning rate from it too."""
    data = resolve_data(settings.data)
    data_cfg = DataConfig(
        task="summary_eval", train_file=data, demo=data is None, lang=settings.lang,
        max_train_samples=settings.step_conversations + settings.timed_conversations,
        max_val_samples=settings.eval_conversations, max_seq_length=settings.max_seq_length,
        max_article_length=settings.max_article_length, cache_dir=settings.cache_dir,
    )
    switches = dict(switches or {})
    packing = switches.pop("packing", True)
    lora = LoraConfig(dropout=switches.pop("lora_dropout")) if "lora_dropout" in switches else LoraConfig()
    train = TrainConfig(
        seed=settings.seed, lr=2e-4, scheduler="constant", warmup_ratio=0.0, eval_every=0, save_every=0,
        log_every=1, packing=packing, pack_len=settings.pack_len or settings.max_seq_length,
        batch_size=settings.packed_batch_size if packing else HF_BATCH, **switches,
    )
    return RunConfig(model=ModelConfig(model=settings.model, quant="int8"), lora=lora, data=data_cfg, train=train)


# ---- counting --------------------------------------------------------------------------------------------------


class CountingCollate:
    """Wraps a collate function and counts what its batches hold.

    Attributes:
        slots: token slots (B x T summed over batches), pads included.
        tokens: non-pad tokens.
        loss_tokens: tokens that carry a loss (``labels[:, 1:] != -100``).
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.slots = self.tokens = self.loss_tokens = 0

    def __call__(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        batch = self.inner(*args, **kwargs)
        self.slots += batch["input_ids"].numel()
        # ours carries num_tokens (packed masks are dicts); the hf collator a (B, T) padding mask
        self.tokens += int(batch["num_tokens"] if "num_tokens" in batch else batch["attention_mask"].sum())
        self.loss_tokens += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        return batch


@dataclass(frozen=True)
class ModelShape:
    """What the FLOP count needs from a model.

    Attributes:
        n_linear: elements of the frozen decoder projections (LM head excluded).
        n_lora: trainable adapter parameters.
        hidden: H, the head's input width.
        vocab: V, the head's output width.
        attn_width: d_attn, query heads x head_dim.
        windows: per layer, the sliding window or None for full attention.
    """

    n_linear: int
    n_lora: int
    hidden: int
    vocab: int
    attn_width: int
    windows: tuple[int | None, ...]


def model_shape(model: torch.nn.Module) -> ModelShape:
    """Read the FLOP-relevant sizes off a (PEFT-wrapped, possibly int8) causal LM."""
    n_linear = 0
    for name, module in model.named_modules():
        # PEFT wrappers (base_layer inside), the adapters themselves and the head are counted elsewhere
        if hasattr(module, "base_layer") or "lora_" in name or name.endswith("lm_head"):
            continue
        if hasattr(module, "in_features") and hasattr(module, "out_features"):
            n_linear += module.in_features * module.out_features
    config = model.config
    config = getattr(config, "text_config", None) or config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    return ModelShape(
        n_linear=n_linear,
        n_lora=sum(p.numel() for p in model.parameters() if p.requires_grad),
        hidden=config.hidden_size,
        vocab=config.vocab_size,
        attn_width=heads * head_dim,
        windows=tuple(window if t == "sliding_attention" else None for t in types),
    )


def attended_pairs(lengths: list[int], windows: tuple[int | None, ...]) -> int:
    """(query, key) pairs that causal attention inside each conversation needs, summed over layers.

    Position p of a conversation attends to p + 1 keys, or min(p + 1, W) on a sliding layer of window W.
    """
    total = 0
    for length in lengths:
        for w in windows:
            if w is None or length <= w:
                total += length * (length + 1) // 2
            else:
                total += w * (w + 1) // 2 + (length - w) * w
    return total


def count_flops(shape: ModelShape, *, tokens: int, loss_tokens: int, head_positions: int, pairs: int,
                checkpointing: bool, chunked: bool) -> tuple[int, int]:
    """(model FLOPs, hardware FLOPs) of a training run, as :data:`FLOPS_FORMULA` states."""
    body = 4 * shape.n_linear + 6 * shape.n_lora
    model = body * tokens + 12 * shape.attn_width * pairs + 4 * shape.hidden * shape.vocab * head_positions
    hardware = model
    if checkpointing:
        hardware += (2 * shape.n_linear + 2 * shape.n_lora) * tokens + 4 * shape.attn_width * pairs
    if chunked:
        hardware += 2 * shape.hidden * shape.vocab * loss_tokens
    return model, hardware


def fingerprint(*example_lists: list[dict[str, list[int]]]) -> str:
    """A short hash of token examples: equal across variants means the same tokens."""
    digest = hashlib.sha256()
    for examples in example_lists:
        for ex in examples:
            digest.update(json.dumps([ex["input_ids"], ex["labels"]]).encode())
    return digest.hexdigest()[:16]


def split_examples(settings: Settings, train: list[dict], val: list[dict]) -> tuple[list, list, list]:
    """(warm-up, timed, held-out) examples; the same slices in every variant."""
    warm_n, timed_n = settings.step_conversations, settings.timed_conversations
    if len(train) < warm_n + timed_n:
        raise UserError(
            f"--steps {settings.steps} x --grad-accum {settings.grad_accum} needs {warm_n + timed_n} training "
            f"conversations ({warm_n} for the warm-up step), the data gives {len(train)} that fit "
            f"--max-seq-length {settings.max_seq_length}; lower --steps or --grad-accum, or give more rows with --data"
        )
    if not val:
        raise UserError("no validation conversations for the held-out loss; give a data file with more rows")
    return train[:warm_n], train[warm_n : warm_n + timed_n], val[: settings.eval_conversations]


def held_out_loss(model: torch.nn.Module, examples: list[dict], pad_id: int, device: torch.device) -> float:
    """Mean loss per loss token on ``examples``, one conversation per batch, computed alike for every variant."""
    batches = [collate([[ex]], pad_id=pad_id, packed=False) for ex in examples]
    return validation_loss(model, batches, partial(sft_loss, chunked=True), resolve_precision(device), device)


def compute_dtype(device: torch.device) -> torch.dtype:
    """The dtype matmuls run in: autocast's where native, else fp32 (the weights' dtype on such CPUs)."""
    return resolve_precision(device).dtype or torch.float32


def _result(name: str, counter: CountingCollate, seconds: float, peak: int, shape: ModelShape, pairs: int,
            checkpointing: bool, chunked: bool, **extra: Any) -> dict[str, Any]:
    head_positions = counter.loss_tokens if chunked else counter.slots  # full logits: every slot, pads too
    model_flops, hardware_flops = count_flops(
        shape, tokens=counter.tokens, loss_tokens=counter.loss_tokens, head_positions=head_positions, pairs=pairs,
        checkpointing=checkpointing, chunked=chunked,
    )
    return {
        "variant": name,
        "seconds": seconds,
        "loss_tokens": counter.loss_tokens,
        "tokens": counter.tokens,
        "slots": counter.slots,
        "loss_tokens_per_s": counter.loss_tokens / max(seconds, 1e-9),
        "tokens_per_s": counter.tokens / max(seconds, 1e-9),
        "padding_fraction": 1 - counter.tokens / max(counter.slots, 1),
        "peak_memory_bytes": peak,
        "model_flops": model_flops,
        "hardware_flops": hardware_flops,
        "shape": asdict(shape),
        "threads": torch.get_num_threads(),
        "compute_dtype": str(compute_dtype(default_device())).removeprefix("torch."),
        **extra,
    }


@contextmanager
def profiled(settings: Settings, name: str) -> Iterator[None]:
    """Profile the enclosed timed phase and write its top operators (``--profile``); else do nothing."""
    if not settings.profile:
        yield
        return
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        yield
    path = Path(settings.profile_dir) / f"{time.strftime('%Y-%m-%d')}-{socket.gethostname()}-profile-{name}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30) + "\n")
    print(f"profile of the timed phase: {path}", file=sys.stderr)


# ---- the variants ----------------------------------------------------------------------------------------------


def run_ours(name: str, settings: Settings) -> dict[str, Any]:
    """gemma-lowmem's loop with the variant's switches: warm-up step, then one timed epoch."""
    from gemma_lowmem.planner import PLANNED
    from gemma_lowmem.run import setup

    cfg = run_config(settings, VARIANTS[name])
    with tempfile.TemporaryDirectory() as tmp:
        cfg.train.output_dir = tmp
        prepared = setup(cfg, keep=PLANNED)  # the variant's settings as they are; the plan adds only float copies
        cfg = prepared.config  # as planned: float_weights where the budget has room (none given)
        warm, timed, held_out = split_examples(settings, prepared.training.train, prepared.training.val)
        model, pad_id = prepared.model, prepared.tokenizer.pad_token_id
        device = next(p.device for p in model.parameters() if p.requires_grad)
        # the SFT collate run.py gives fit, wrapped below to count slots and tokens
        inner = collate_for(model, pad_id=pad_id, packed=cfg.train.packing)

        def plan(examples: list[dict]) -> list:
            lengths = [len(e["input_ids"]) for e in examples]
            mode = "pack" if cfg.train.packing else "bucket" if cfg.train.bucketing else "random"
            return plan_epoch(lengths, cfg.train.batch_size, seed=cfg.train.seed, epoch=0, mode=mode,
                              pack_len=cfg.train.pack_len if cfg.train.packing else None)

        # Warm-up: one optimizer step over all warm-up conversations (allocator, oneDNN kernels, lazy imports).
        warm_cfg = replace(cfg.train, max_steps=1, grad_accum=len(plan(warm)))
        fit(model, warm, [], warm_cfg, run_dir=Path(tmp) / "warmup", collate_fn=inner, show_progress=False)

        timed_plan = plan(timed)
        accum = pick_grad_accum(len(timed_plan), settings.steps)
        counter = CountingCollate(inner)
        with profiled(settings, name):
            result = fit(model, timed, [], replace(cfg.train, grad_accum=accum, epochs=1, max_steps=None),
                         run_dir=Path(tmp) / "timed", collate_fn=counter, show_progress=False)
        # The loop's own peak as logged after its last step (fit's final read also covers saving the adapter).
        last = [r for r in result.history if "peak_rss" in r or "peak_reserved" in r][-1]
        peak = last.get("peak_reserved", last.get("peak_rss"))
        lengths = [len(e["input_ids"]) for e in timed]
        shape = model_shape(model)
        out = _result(
            name, counter, result.seconds, peak, shape, attended_pairs(lengths, shape.windows),
            cfg.train.gradient_checkpointing, cfg.train.chunked_loss,
            recipe="ours",
            switches={**{k: getattr(cfg.train, k) for k in ("packing", "bucketing", "chunked_loss",
                                                              "gradient_checkpointing", "float_weights")},
                      "lora_dropout": cfg.lora.dropout},
            batch_size=cfg.train.batch_size, grad_accum=accum, steps=result.steps, conversations=len(timed),
            packing_efficiency=(packing_efficiency(timed_plan, lengths, cfg.train.pack_len)
                                if cfg.train.packing else None),
            final_loss=held_out_loss(model, held_out, pad_id, device),
            data_sha=fingerprint(warm, timed, held_out),
        )
        if cfg.train.packing:  # the timed set is small: also the efficiency over every training conversation
            everything = [len(e["input_ids"]) for e in prepared.training.train]
            out["packing_efficiency_all"] = packing_efficiency(plan(prepared.training.train), everything,
                                                               cfg.train.pack_len)
            out["conversations_all"] = len(everything)
    return out


def pick_grad_accum(micro_batches: int, steps: int) -> int:
    """Micro-batches per optimizer step for ours: a divisor of the epoch's micro-batches (so that the epoch ends
    on a step and no example is trained twice), giving the step count closest to ``steps``."""
    divisors = [d for d in range(1, micro_batches + 1) if micro_batches % d == 0]
    return min(divisors, key=lambda d: (abs(micro_batches / d - steps), -d))


def run_hf(settings: Settings) -> dict[str, Any]:
    """The usual recipe: Trainer + PEFT LoRA + bitsandbytes int8, warm-up step, then one timed epoch."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import (
        AutoModelForCausalLM,
        BitsAndBytesConfig,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from gemma_lowmem.model import load_tokenizer, resolve_model_path
    from gemma_lowmem.run import encode, seed_everything
    from gemma_lowmem.tasks import get_task

    cfg = run_config(settings)
    seed_everything(settings.seed)
    device = default_device()
    native_bf16 = bf16_supported(device)
    path = resolve_model_path(cfg.model.model)
    tokenizer = load_tokenizer(path)  # right padding, pad token set: as ours
    train_convs, val_convs = get_task(cfg.data.task).build_datasets(cfg.data, cfg.train.seed)
    train = encode(cfg, tokenizer, train_convs, "tokenizing train").examples
    val = encode(cfg, tokenizer, val_convs, "tokenizing val").examples
    warm, timed, held_out = split_examples(settings, train, val)

    model = AutoModelForCausalLM.from_pretrained(
        path, quantization_config=BitsAndBytesConfig(load_in_8bit=True),
        dtype=torch.bfloat16 if native_bf16 else torch.float32,
        device_map={"": device.index or 0} if device.type == "cuda" else "cpu",
        attn_implementation="sdpa",  # transformers' own (ours computes packed rows per document)
    )
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = get_peft_model(model, PeftLoraConfig(
        r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
        target_modules=list(cfg.lora.target_modules), bias="none", task_type="CAUSAL_LM",
    ))

    class Window(TrainerCallback):
        """Times the training loop only (after the Trainer's setup) and takes its peak memory."""

        def __init__(self) -> None:
            self.memory = PeakMemory(device)
            self.start = self.seconds = 0.0
            self.peak = 0

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.memory.reset()
            self.start = time.perf_counter()

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # host sync: honest end time
            self.seconds = time.perf_counter() - self.start
            self.peak = self.memory.peak()

    def trainer(examples: list[dict], steps: int, collator: Any, callbacks: list, out: str) -> Trainer:
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=HF_BATCH, gradient_accumulation_steps=settings.grad_accum,
            gradient_checkpointing=True, bf16=native_bf16, max_steps=steps, report_to=[], logging_steps=1,
            save_strategy="no", dataloader_num_workers=0, learning_rate=cfg.train.lr, lr_scheduler_type="constant",
            seed=settings.seed, disable_tqdm=True, use_cpu=device.type == "cpu",  # else bf16 asks for a GPU
        )
        return Trainer(model=model, args=args, train_dataset=examples, data_collator=collator, callbacks=callbacks)

    def collator() -> DataCollatorForSeq2Seq:
        return DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=IGNORE_INDEX,
                                      return_tensors="pt")

    with tempfile.TemporaryDirectory() as tmp:
        trainer(warm, 1, collator(), [], tmp).train()
        counter, window = CountingCollate(collator()), Window()
        with profiled(settings, "hf"):
            trainer(timed, settings.steps, counter, [window], tmp).train()
    lengths = [len(e["input_ids"]) for e in timed]
    shape = model_shape(model)
    return _result(
        "hf", counter, window.seconds, window.peak, shape, attended_pairs(lengths, shape.windows),
        True, False,
        recipe="hf", switches={"packing": False, "bucketing": False, "chunked_loss": False,
                               "gradient_checkpointing": True},
        batch_size=HF_BATCH, grad_accum=settings.grad_accum, steps=settings.steps, conversations=len(timed),
        packing_efficiency=None, final_loss=held_out_loss(model, held_out, tokenizer.pad_token_id, device),
        data_sha=fingerprint(warm, timed, held_out),
    )


def run_variant(name: str, settings: Settings) -> dict[str, Any]:
    """Run one variant in this process and return its measurements.

    Args:
        name: a key of :data:`VARIANTS`.
        settings: the shared settings.

    Returns:
        ``variant``, ``recipe``, ``switches``, ``batch_size``, ``grad_accum``, ``steps``, ``conversations``,
        ``seconds`` (the timed loop), ``loss_tokens``, ``tokens`` (non-pad), ``slots`` (pads included),
        ``loss_tokens_per_s``, ``tokens_per_s``, ``padding_fraction``, ``packing_efficiency`` (packed only, else
        None), ``peak_memory_bytes`` (CPU: peak RSS of the process during the timed loop; CUDA: peak reserved),
        ``model_flops``, ``hardware_flops``, ``shape``, ``final_loss`` (held-out), ``data_sha``, ``threads``,
        ``compute_dtype``.
    """
    if name not in VARIANTS:
        raise UserError(f"variant {name!r} is not one of {', '.join(VARIANTS)}")
    torch.set_num_threads(settings.threads)
    return run_hf(settings) if VARIANTS[name] is None else run_ours(name, settings)


# ---- the parent ------------------------------------------------------------------------------------------------


def matmul_rate(dtype: torch.dtype, size: int = 2048, repeats: int = 5) -> float:
    """Best measured FLOP/s of a ``size``^3 matmul in ``dtype`` on the default device."""
    device = default_device()
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    torch.mm(a, b)  # warm-up: kernel selection and first-touch of the output
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # host sync: the timing must cover the kernel
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def run_child(name: str, settings: Settings) -> dict[str, Any]:
    """Run one variant in a fresh process; its output is echoed to stderr with the variant's name."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--variant", name, *settings_to_argv(settings)]
    # A fixed hash seed: the task's summary edits iterate over a set, so conversations differ between processes
    # with different seeds (gemma_lowmem/tasks/student_summaries.py, the swap types), and so would the tokens.
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    if settings.malloc_mmap_threshold is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = str(settings.malloc_mmap_threshold)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    result = None
    for line in proc.stdout:
        if line.startswith(RESULT_PREFIX):
            result = json.loads(line[len(RESULT_PREFIX) :])
        else:
            print(f"[{name}] {line}", end="", file=sys.stderr)
    code = proc.wait()
    if code != 0 or result is None:
        return {"variant": name, "error": f"exit code {code}" + ("" if result is None else " after a result")}
    return result


def render_table(report: dict[str, Any]) -> str:
    """The Markdown table of a report; its last line is ``ours/hf: peak_mem=<x> loss_tokens_per_s=<y>``."""
    lines = [
        "| variant | loss tok/s | non-pad tok/s | padding | packing eff. | peak mem GiB | MFU | HFU | held-out loss "
        "| steps | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    variants = report["variants"]
    for name, r in variants.items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error']} |" + " |" * 9)
            continue
        packed = "-" if r["packing_efficiency"] is None else f"{100 * r['packing_efficiency']:.1f}%"
        lines.append(
            f"| {name} | {r['loss_tokens_per_s']:.1f} | {r['tokens_per_s']:.1f} | {100 * r['padding_fraction']:.1f}% "
            f"| {packed} | {r['peak_memory_bytes'] / 2**30:.2f} "
            f"| {100 * r['mfu']:.1f}% | {100 * r['hfu']:.1f}% | {r['final_loss']:.4f} | {r['steps']} "
            f"| {r['seconds']:.1f} |"
        )
    rate = report["matmul"]
    lines += [
        "",
        f"matmul rate: {rate['flops_per_s'] / 1e9:.1f} GFLOP/s ({rate['dtype']}, {rate['size']}^3, best of "
        f"before/after {rate['before'] / 1e9:.1f}/{rate['after'] / 1e9:.1f}); {report['threads']} threads",
        f"FLOPs: {FLOPS_FORMULA}",
        f"same tokens: {report['same_tokens']}",
    ]
    everything = variants.get("ours", {})
    if everything.get("packing_efficiency_all") is not None:
        lines.append(f"packing efficiency of ours over all {everything['conversations_all']} training conversations: "
                     f"{100 * everything['packing_efficiency_all']:.1f}%")
    ours, hf = variants.get("ours", {}), variants.get("hf", {})
    if all(k in r for r in (ours, hf) for k in ("peak_memory_bytes", "loss_tokens_per_s")):
        mem = ours["peak_memory_bytes"] / hf["peak_memory_bytes"]
        speed = ours["loss_tokens_per_s"] / hf["loss_tokens_per_s"]
        lines.append(f"ours/hf: peak_mem={mem:.3f} loss_tokens_per_s={speed:.2f}")
    else:
        lines.append("ours/hf: peak_mem=n/a loss_tokens_per_s=n/a")
    return "\n".join(lines)


def same_tokens(variants: dict[str, dict[str, Any]]) -> str:
    """Whether every finished variant trained the same examples and loss tokens."""
    done = [r for r in variants.values() if "error" not in r]
    if not done:
        return "n/a"
    shas = {r["data_sha"] for r in done}
    counts = {r["loss_tokens"] for r in done}
    if len(shas) == 1 and len(counts) == 1:
        first = done[0]
        return f"yes ({first['conversations']} conversations, {first['loss_tokens']} loss tokens, data {shas.pop()})"
    return f"NO: data hashes {sorted(shas)}, loss tokens {sorted(counts)}"


def run_all(settings: Settings, variants: list[str], out: Path | None) -> dict[str, Any]:
    """Run the variants one process each, add MFU, write the JSON report and return it."""
    data = resolve_data(settings.data)
    rows = len(get_conversations(settings))  # bad rows and too little data fail here, before any model loads
    torch.set_num_threads(settings.threads)
    dtype = compute_dtype(default_device())
    before = matmul_rate(dtype)
    results = {name: run_child(name, settings) for name in variants}
    after = matmul_rate(dtype)
    peak = max(before, after)
    for r in results.values():
        if "error" not in r:
            r["mfu"] = r["model_flops"] / max(r["seconds"], 1e-9) / peak
            r["hfu"] = r["hardware_flops"] / max(r["seconds"], 1e-9) / peak
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "host": socket.gethostname(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": settings.threads,
        "torch": torch.__version__,
        "device": str(default_device()),
        "data": data or "demo set",
        "conversations_loaded": rows,
        "settings": asdict(settings),
        "matmul": {"dtype": str(dtype).removeprefix("torch."), "size": 2048, "before": before, "after": after,
                   "flops_per_s": peak},
        "flops_formula": FLOPS_FORMULA,
        "same_tokens": same_tokens(results),
        "variants": results,
    }
    out = out or RESULTS / f"{time.strftime('%Y-%m-%d')}-{socket.gethostname()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    report["path"] = str(out)
    return report


def get_conversations(settings: Settings) -> list:
    """The training conversations the variants will read (checks the data before any model loads)."""
    from gemma_lowmem.tasks import get_task

    cfg = run_config(settings)
    train, _ = get_task(cfg.data.task).build_datasets(cfg.data, cfg.train.seed)
    needed = settings.step_conversations + settings.timed_conversations
    if len(train) < needed:
        raise UserError(f"--steps {settings.steps} x --grad-accum {settings.grad_accum} needs {needed} training "
                        f"conversations ({settings.step_conversations} for the warm-up step); the data has "
                        f"{len(train)}: lower --steps or --grad-accum")
    return train


# ---- command line ----------------------------------------------------------------------------------------------

HELP = {
    "model": "model name or folder (gemma-3-270m: the bundled Gemma 3 270M)",
    "data": "CNN/DailyMail-style JSONL/CSV/Parquet (article, highlights); default: ../shared/data/cnn_dailymail/"
            "validation_first1000.jsonl when present, else the bundled demo set",
    "steps": "timed optimizer steps of the hf recipe; every variant trains one epoch over steps x 2 x grad-accum "
             "conversations",
    "grad_accum": "the hf recipe's gradient accumulation (it takes 2 x this conversations per step; ours picks "
                  "its own micro-batches per step to end the same epoch in about as many steps)",
    "max_seq_length": "longest conversation in tokens (longer articles are cut)",
    "pack_len": "tokens per packed row of ours (default: --max-seq-length)",
    "packed_batch_size": "packed rows per micro-batch of ours (unpacked variants take 2 conversations, as hf)",
    "max_article_length": "cut articles to this many characters",
    "lang": "prompt language: ko or en",
    "eval_conversations": "validation conversations of the held-out loss",
    "seed": "seed of data, LoRA init and dropout",
    "threads": "torch threads per variant (default: all CPUs)",
    "cache_dir": "tokenized-data cache (default: ~/.cache/gemma_lowmem/tokens)",
    "profile": "profile the timed phase with torch.profiler and write its top operators (timings then run slower)",
    "profile_dir": "folder for the profile tables",
    "malloc_mmap_threshold": "set glibc's MALLOC_MMAP_THRESHOLD_ (bytes) in every variant: allocations this large are "
                             "mmapped and given back when freed. Default: glibc's dynamic threshold, under which "
                             "peak RSS also counts freed, fragmented heap (measured: +1.1 GiB for one 1024-token "
                             "step of ours)",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog="Examples:" + __doc__.split("Examples:")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    defaults = Settings()
    for f in fields(Settings):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        if f.type == "bool":
            parser.add_argument(flag, action="store_true", help=HELP[f.name])
            continue
        kind = int if f.type.startswith("int") else str
        text = HELP[f.name] if "default" in HELP[f.name] else f"{HELP[f.name]} (default: {default})"
        parser.add_argument(flag, type=kind, default=default, help=text)
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated variants to run, in order (default: all: {','.join(VARIANTS)})")
    parser.add_argument("--out", type=Path, default=None,
                        help="result JSON path (default: benchmarks/results/<date>-<host>.json)")
    parser.add_argument("--variant", default=None,
                        help="internal: run this one variant in this process and print its JSON result line "
                             "(the parent starts one process per variant this way)")
    return parser


def settings_from_args(args: argparse.Namespace) -> Settings:
    settings = Settings(**{f.name: getattr(args, f.name) for f in fields(Settings)})
    for name in ("steps", "grad_accum", "max_seq_length", "packed_batch_size", "max_article_length",
                 "eval_conversations", "threads"):
        if getattr(settings, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} {getattr(settings, name)} must be >= 1")
    for name in ("pack_len", "malloc_mmap_threshold"):
        if getattr(settings, name) is not None and getattr(settings, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} {getattr(settings, name)} must be >= 1")
    if settings.lang not in ("ko", "en"):
        raise UserError(f"--lang {settings.lang}: use ko or en")
    return settings


def settings_to_argv(settings: Settings) -> list[str]:
    """Flags that rebuild ``settings`` in a child process."""
    argv = []
    for f in fields(Settings):
        value = getattr(settings, f.name)
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            argv += [flag] if value else []
        elif value is not None:
            argv += [flag, str(value)]
    return argv


def main() -> None:
    args = build_parser().parse_args()
    settings = settings_from_args(args)
    resolve_data(settings.data)  # a missing --data fails in one line before anything loads
    if args.variant:
        print(RESULT_PREFIX + json.dumps(run_variant(args.variant, settings)), flush=True)
        return
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        raise UserError(f"--variants {args.variants}: unknown {', '.join(unknown) or '(none given)'}; "
                        f"choose from {', '.join(VARIANTS)}")
    report = run_all(settings, variants, args.out)
    print(f"results: {report['path']}", file=sys.stderr)
    print(render_table(report))
    if any("error" in r for r in report["variants"].values()):
        sys.exit(1)


if __name__ == "__main__":
    run_script(main)
