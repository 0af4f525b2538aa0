"""The training loop: one function, readable top to bottom, for any Hugging Face causal LM with a LoRA adapter.

``fit`` takes token examples (``{"input_ids", "labels"}``) and a ``TrainConfig``; it knows nothing about tasks.
The objective is the summed loss of a micro-batch divided by the loss tokens of the whole accumulation window.
"""

from __future__ import annotations

import json
import math
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from gemma_lowmem.checkpoint import find_checkpoint, load_checkpoint, save_adapter, save_checkpoint, set_rng_state
from gemma_lowmem.config import TrainConfig
from gemma_lowmem.data.collate import collate
from gemma_lowmem.data.sampler import plan_epoch
from gemma_lowmem.device import resolve_precision
from gemma_lowmem.errors import UserError
from gemma_lowmem.loss import sft_loss
from gemma_lowmem.memory import PeakMemory, format_size
from gemma_lowmem.runlog import MetricsLog, plot_loss_curve

Example = dict[str, list[int]]
# loss_fn(model, batch) -> summed loss, or (summed loss, {name: summed 0-dim metric}) for extra logged metrics
LossFn = Callable[[torch.nn.Module, dict[str, Any]], torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]]


@dataclass
class FitResult:
    """What a run did; also written to ``summary.json``."""

    steps: int
    tokens: int  # non-pad tokens seen in training
    loss_tokens: int  # tokens that carried loss
    seconds: float
    final_loss: float | None
    best_val_loss: float | None
    peak_memory: dict[str, int]
    skipped_steps: int
    stopped: str  # "max_steps", "early_stopping", "signal", "non_finite"
    run_dir: str
    history: list[dict[str, Any]] = field(default_factory=list, repr=False)

    @property
    def loss_tokens_per_s(self) -> float:
        return self.loss_tokens / max(self.seconds, 1e-9)


def lr_factor(step: int, total: int, warmup: int, kind: str) -> float:
    """Linear warmup to 1, then cosine or linear decay to 0 (or constant)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    if kind == "linear":
        return max(0.0, 1 - progress)
    return 1.0


class _StopSignal:
    """SIGINT/SIGTERM ask for a checkpoint at the next step boundary; a second signal stops at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopSignal:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. inside a notebook worker): no signal handling
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        tqdm.write(f"{signal.Signals(signum).name}: saving a checkpoint at the end of this step (again to stop now)")

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    moved = {}
    for key, value in batch.items():
        if isinstance(value, dict):  # packed attention masks: {"full_attention": ..., "sliding_attention": ...}
            moved[key] = {k: v.to(device, non_blocking=True) for k, v in value.items()}
        elif isinstance(value, torch.Tensor):
            moved[key] = value.to(device, non_blocking=True)
        else:
            moved[key] = value
    return moved


def _micro_batches(plan_for: Callable[..., list], epoch: int, index: int) -> Iterator[tuple[int, int, list]]:
    """Endless stream of (epoch, index, rows) starting at a saved position; epochs follow each other."""
    while True:
        plan = plan_for(epoch=epoch)
        for i in range(index, len(plan)):
            yield epoch, i, plan[i]
        epoch, index = epoch + 1, 0


def backward_window(
    model: torch.nn.Module,
    window: list[dict[str, Any]],
    loss_fn: LossFn,
    precision: Any,
    scaler: torch.amp.GradScaler,
    device: torch.device,
) -> tuple[torch.Tensor, int, dict[str, torch.Tensor]]:
    """Forward and backward every micro-batch of one accumulation window.

    The gradients left in ``.grad`` are those of (sum of token losses) / (loss tokens of the whole window), so
    how the window is split into micro-batches never changes them.

    Returns:
        (summed loss of the window as a 0-dim device tensor, loss tokens in the window, summed extra metrics).
    """
    window_tokens = sum(int(b["num_loss_tokens"]) for b in window)  # CPU tensors: no device sync
    window_loss = torch.zeros((), device=device)
    extras: dict[str, torch.Tensor] = {}
    for batch in window:
        with precision.autocast():
            loss_sum, metrics = _split(loss_fn(model, _to_device(batch, device)))
        scaler.scale(loss_sum / max(window_tokens, 1)).backward()
        window_loss += loss_sum.detach().float()
        for name, value in metrics.items():
            extras[name] = extras.get(name, 0) + value.detach().float()
        del loss_sum  # the graph is freed by backward; drop the last reference too
    return window_loss, window_tokens, extras


def _split(output: torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]):
    return output if isinstance(output, tuple) else (output, {})


@torch.no_grad()
def evaluate_loss(
    model: torch.nn.Module, batches: list[dict[str, Any]], loss_fn: LossFn, precision: Any, device: torch.device
) -> float:
    """Mean loss per loss token over pre-collated validation batches."""
    was_training = model.training
    model.eval()
    total, count = torch.zeros((), device=device), 0
    for batch in batches:
        with precision.autocast():
            total += _split(loss_fn(model, _to_device(batch, device)))[0].float()
        count += int(batch["num_loss_tokens"])  # a CPU tensor: no device sync
    model.train(was_training)
    return total.item() / max(count, 1)  # host sync: once per validation


def fit(
    model: torch.nn.Module,
    train: list[Example],
    val: list[Example],
    cfg: TrainConfig,
    *,
    run_dir: str | Path,
    pad_id: int,
    run_config: dict[str, Any] | None = None,
    loss_fn: LossFn | None = None,
    collate_fn: Callable[..., dict[str, Any]] | None = None,
    show_progress: bool = True,
) -> FitResult:
    """Train the model's trainable (LoRA) parameters on ``train``; validate on ``val``.

    Args:
        model: a causal LM whose trainable parameters are the adapter (e.g. from ``model.add_lora``).
        train: training examples ``{"input_ids": [...], "labels": [...]}``, labels -100 off the answer.
        val: validation examples (may be empty).
        cfg: the loop's configuration.
        run_dir: where checkpoints, the adapter, the metrics log, the loss curve and the summary go.
        pad_id: the tokenizer's pad token id.
        run_config: the full resolved config, saved with every checkpoint.
        loss_fn: ``loss_fn(model, batch) -> summed loss``; default: chunked SFT cross-entropy.
        collate_fn: turns rows of examples into a batch with ``num_loss_tokens`` and ``num_tokens``.
        show_progress: draw the tqdm bar.

    Returns:
        A :class:`FitResult` (also written to ``run_dir/summary.json``).
    """
    # ---- setup -------------------------------------------------------------------------------------------------
    run_dir = Path(run_dir)
    run_config = run_config or {"train": cfg.__dict__}
    device = next(p.device for p in model.parameters() if p.requires_grad)
    precision = resolve_precision(device, cfg.precision)
    loss_fn = loss_fn or partial(sft_loss, chunked=cfg.chunked_loss, chunk_size=cfg.loss_chunk_size)
    model_config = getattr(model, "config", None)
    collate_fn = collate_fn or partial(
        collate,
        pad_id=pad_id,
        packed=cfg.packing,
        sliding_window=getattr(model_config, "sliding_window", None),
        attn_implementation=getattr(model_config, "_attn_implementation", None) or "sdpa",
    )
    if not train:
        raise UserError("no training examples left after tokenization; check the data and --max-seq-length")
    lengths = [len(e["input_ids"]) for e in train]
    pack_len = cfg.pack_len or max(lengths)
    if cfg.packing and max(lengths) > pack_len:
        raise UserError(f"pack_len={pack_len} is shorter than the longest example ({max(lengths)} tokens)")
    mode = "pack" if cfg.packing else "bucket" if cfg.bucketing else "random"
    plan_for = partial(
        plan_epoch, lengths, cfg.batch_size, seed=cfg.seed, mode=mode, pack_len=pack_len if cfg.packing else None
    )
    micro_per_epoch = len(plan_for(epoch=0))
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * micro_per_epoch / cfg.grad_accum))
    warmup = int(cfg.warmup_ratio * total_steps)

    val_lengths = [len(e["input_ids"]) for e in val]
    val_plan = plan_epoch(val_lengths, cfg.batch_size, seed=0, epoch=0, mode="bucket") if val else []
    val_batches = [collate_fn([[val[i] for i in row] for row in rows]) for rows in val_plan]

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(lr_factor, total=total_steps, warmup=warmup, kind=cfg.scheduler)
    )
    scaler = torch.amp.GradScaler(device.type, enabled=precision.use_scaler)
    memory = PeakMemory(device)
    log = MetricsLog(run_dir / "metrics.jsonl")
    counters = {
        "step": 0,
        "epoch": 0,
        "index": 0,
        "tokens": 0,
        "loss_tokens": 0,
        "seconds": 0.0,
        "best_val": None,
        "bad_evals": 0,
        "skipped": 0,
    }

    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.resume:
        checkpoint = find_checkpoint(cfg.resume)
        state = load_checkpoint(checkpoint, model)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        counters.update(state["counters"])
        set_rng_state(state["rng"])
        log.truncate_after(counters["step"])
        tqdm.write(f"resumed from {checkpoint} at step {counters['step']}")

    def trainer_state() -> dict[str, Any]:
        return {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "counters": dict(counters),
        }

    def checkpoint_now() -> Path:
        folder = run_dir / "checkpoints" / f"step-{counters['step']:06d}"
        return save_checkpoint(folder, model, trainer_state(), run_config, cfg.keep_checkpoints)

    model.train()
    memory.reset()
    stream = _micro_batches(plan_for, counters["epoch"], counters["index"])
    bar = tqdm(total=total_steps, initial=counters["step"], desc="train", unit="step", disable=not show_progress)
    stopped, bad_in_row, last_loss = "max_steps", 0, None
    t_last, tokens_last = time.perf_counter(), counters["loss_tokens"]

    # ---- loop --------------------------------------------------------------------------------------------------
    with _StopSignal() as stop:
        while counters["step"] < total_steps:
            # Collate the whole window first: its loss-token count normalises every micro-step (CPU ints, no sync).
            window = []
            for _ in range(cfg.grad_accum):
                epoch, index, rows = next(stream)
                window.append(collate_fn([[train[i] for i in row] for row in rows]))
            window_loss, window_tokens, extras = backward_window(model, window, loss_fn, precision, scaler, device)
            scaler.unscale_(optimizer)
            max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
            loss = window_loss.item() / max(window_tokens, 1)  # host sync: once per optimizer step
            finite = math.isfinite(loss) and bool(torch.isfinite(grad_norm))
            if finite or precision.use_scaler:
                scaler.step(optimizer)  # GradScaler itself skips a step with inf/nan gradients
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()

            counters["step"] += 1
            counters["epoch"], counters["index"] = epoch, index + 1
            counters["tokens"] += sum(int(b["num_tokens"]) for b in window)
            counters["loss_tokens"] += window_tokens
            if finite:
                bad_in_row, last_loss = 0, loss
            else:
                bad_in_row += 1
                counters["skipped"] += 1
                tqdm.write(f"step {counters['step']}: non-finite loss or gradient; optimizer step skipped")

            record: dict[str, Any] = {
                "step": counters["step"],
                "epoch": epoch,
                "loss": loss,
                "lr": scheduler.get_last_lr()[0],
                "grad_norm": float(grad_norm),
            }
            if cfg.eval_every and counters["step"] % cfg.eval_every == 0 and val_batches:
                record["val_loss"] = evaluate_loss(model, val_batches, loss_fn, precision, device)
            if "val_loss" in record:
                best = counters["best_val"]
                if best is None or record["val_loss"] < best:
                    counters["best_val"], counters["bad_evals"] = record["val_loss"], 0
                    save_adapter(model, run_dir / "adapter_best", run_config)
                else:
                    counters["bad_evals"] += 1

            if counters["step"] % cfg.log_every == 0 or "val_loss" in record:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)  # host sync: honest timings at log steps only
                now = time.perf_counter()
                counters["seconds"] += now - t_last
                record["loss_tokens_per_s"] = (counters["loss_tokens"] - tokens_last) / max(now - t_last, 1e-9)
                t_last, tokens_last = now, counters["loss_tokens"]
                record.update(memory.read())
                # host sync: extra metrics (e.g. DPO reward accuracy) per loss unit, at log steps only
                record.update({k: v.item() / max(window_tokens, 1) for k, v in extras.items()})
                log.write(record)
                bar.set_postfix(
                    loss=f"{loss:.4f}",
                    lr=f"{record['lr']:.2e}",
                    tok_s=f"{record['loss_tokens_per_s']:.1f}",
                    mem=format_size(memory.peak()),
                )
            bar.update(1)

            if bad_in_row >= cfg.max_bad_steps:
                stopped = "non_finite"
                break
            if cfg.early_stopping_patience and counters["bad_evals"] >= cfg.early_stopping_patience:
                stopped = "early_stopping"
                break
            if stop.requested:
                stopped = "signal"
                break
            if cfg.save_every and counters["step"] % cfg.save_every == 0 and counters["step"] < total_steps:
                checkpoint_now()
    bar.close()

    # ---- report ------------------------------------------------------------------------------------------------
    counters["seconds"] += time.perf_counter() - t_last
    if val_batches and "val_loss" not in record and stopped != "non_finite":
        record["val_loss"] = evaluate_loss(model, val_batches, loss_fn, precision, device)
        log.write({"step": counters["step"], "val_loss": record["val_loss"]})
        if counters["best_val"] is None or record["val_loss"] < counters["best_val"]:
            counters["best_val"] = record["val_loss"]
            save_adapter(model, run_dir / "adapter_best", run_config)
    folder = checkpoint_now()
    if stopped == "non_finite":
        raise UserError(
            f"{cfg.max_bad_steps} optimizer steps in a row had a non-finite loss or gradient; "
            f"stopped. Last state saved in {folder}; try a lower --lr"
        )
    save_adapter(model, run_dir / "adapter", run_config)
    history = log.read()
    plot_loss_curve(history, run_dir / "loss_curve.png")
    result = FitResult(
        steps=counters["step"],
        tokens=counters["tokens"],
        loss_tokens=counters["loss_tokens"],
        seconds=counters["seconds"],
        final_loss=last_loss,
        best_val_loss=counters["best_val"],
        peak_memory=memory.read(),
        skipped_steps=counters["skipped"],
        stopped=stopped,
        run_dir=str(run_dir),
        history=history,
    )
    summary = {k: v for k, v in result.__dict__.items() if k != "history"}
    summary["loss_tokens_per_s"] = result.loss_tokens_per_s
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    if stopped == "signal":
        tqdm.write(f"stopped by signal; checkpoint saved in {folder} (resume with --resume {run_dir})")
    return result
