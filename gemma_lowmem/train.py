"""The training loop: one function, readable top to bottom, for any Hugging Face causal LM with a LoRA adapter.

``fit`` takes token examples (``{"input_ids", "labels"}``) and a ``TrainConfig``; it knows nothing about tasks.
The objective is the summed loss of a micro-batch divided by the loss tokens of the whole accumulation window.

Reliability: a checkpoint holds everything needed to go on exactly where it was (adapter, optimizer, scheduler,
GradScaler, data position, every rank's RNG); SIGINT/SIGTERM stop at the next step boundary with a checkpoint; a
step with a non-finite loss or gradient is skipped, and ``max_bad_steps`` of them in a row stop the run; an
out-of-memory error halves the micro-batch and redoes the step (one process; under ``torchrun`` it stops the run).
Under ``torchrun`` the same loop runs data parallel (see :mod:`gemma_lowmem.distributed`).
"""

from __future__ import annotations

import json
import math
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from gemma_lowmem.checkpoint import (
    find_checkpoint,
    load_checkpoint,
    rng_state,
    save_adapter,
    save_checkpoint,
    set_rng_state,
)
from gemma_lowmem.config import TrainConfig
from gemma_lowmem.data.collate import to_device
from gemma_lowmem.data.sampler import plan_epoch
from gemma_lowmem.device import resolve_precision
from gemma_lowmem.distributed import Ranks, init_distributed, wrap_ddp
from gemma_lowmem.errors import UserError
from gemma_lowmem.loss import sft_loss
from gemma_lowmem.memory import BudgetTooSmall, PeakMemory, format_size, is_oom
from gemma_lowmem.model import float_weight_cache
from gemma_lowmem.runlog import MetricsLog, plot_loss_curve

Example = dict[str, list[int]]
# collate_fn(rows) -> batch with num_loss_tokens and num_tokens; rows: B lists of examples (data/collate.py)
CollateFn = Callable[[list[list[Example]]], dict[str, Any]]
# loss_fn(model, batch) -> summed loss, or (summed loss, {name: summed 0-dim metric}) for extra logged metrics
LossFn = Callable[[torch.nn.Module, dict[str, Any]], torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]]
SINGLE = Ranks()


def _note(message: str) -> None:
    """An event of the loop (resume, a skipped step, out of memory, a signal) on stderr, above the progress bar:
    stdout stays the scripts' own output (``benchmarks/gpu_check.py`` prints one JSON object per line there)."""
    tqdm.write(message, file=sys.stderr)


@dataclass
class FitResult:
    """What a run did; also written to ``summary.json``."""

    steps: int
    tokens: int  # non-pad tokens seen in training (all ranks)
    loss_tokens: int  # tokens that carried loss (all ranks)
    seconds: float
    final_loss: float | None
    best_val_loss: float | None
    peak_memory: dict[str, int]
    skipped_steps: int
    stopped: str  # "max_steps", "early_stopping", "signal", "non_finite"
    run_dir: str
    history: list[dict[str, Any]] = field(default_factory=list, repr=False)  # rank 0 only

    @property
    def loss_tokens_per_s(self) -> float:
        return self.loss_tokens / max(self.seconds, 1e-9)


@dataclass
class LoopState:
    """Where the loop is and what it has counted; a checkpoint holds it as the dict ``trainer_state["counters"]``
    (:func:`dataclasses.asdict`), and ``--resume`` reads it back with ``LoopState(**counters)``."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # data position: the epoch and the index in its plan of the next micro-batch
    index: int = 0
    tokens: int = 0  # non-pad tokens trained on (all ranks)
    loss_tokens: int = 0  # tokens that carried loss (all ranks)
    seconds: float = 0.0  # training time, measured at log steps
    best_val: float | None = None
    bad_evals: int = 0  # validations in a row without a new best (early stopping)
    skipped: int = 0  # optimizer steps skipped for a non-finite loss or gradient
    last_loss: float | None = None  # checkpointed: a resume from the final checkpoint still reports the final loss


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
    """SIGINT/SIGTERM ask for a checkpoint at the next step boundary; a second signal stops at once.

    (Under torchrun the workers run in their own sessions: a Ctrl-C reaches them once, forwarded by torchrun.)
    """

    def __init__(self, announce: bool = True) -> None:
        self.requested = False
        self.announce = announce
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
        if self.announce:
            name = signal.Signals(signum).name
            _note(f"{name}: saving a checkpoint at the end of this step (send it again to stop at once)")

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _micro_batches(plan_for: Callable[..., list], epoch: int, index: int) -> Iterator[tuple[int, int, list]]:
    """Endless stream of (epoch, index, rows) starting at a saved position; epochs follow each other."""
    while True:
        plan = plan_for(epoch=epoch)
        for i in range(index, len(plan)):
            yield epoch, i, plan[i]
        epoch, index = epoch + 1, 0


def split_rows(rows: list, parts: int) -> list[list]:
    """``rows`` in at most ``parts`` consecutive parts of equal size (the last may be shorter)."""
    size = -(-len(rows) // parts)
    return [rows[i : i + size] for i in range(0, len(rows), size)]


def more_splits(splits: int, batch_size: int) -> int:
    """After an out-of-memory error: run each micro-batch of ``batch_size`` rows in twice as many parts.

    Raises:
        BudgetTooSmall: the parts are already single rows.
    """
    if splits >= batch_size:
        raise BudgetTooSmall(
            "out of memory with a micro-batch of one row: give more memory (--max-mem), a smaller "
            "--max-seq-length or --pack-len, --gradient-checkpointing, or a smaller --loss-chunk-size",
            needed=0,
        )
    return min(2 * splits, batch_size)


def _split(output: torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]):
    return output if isinstance(output, tuple) else (output, {})


def backward_window(
    model: torch.nn.Module,
    window: list[dict[str, Any]],
    loss_fn: LossFn,
    precision: Any,
    scaler: torch.amp.GradScaler,
    device: torch.device,
    *,
    window_tokens: int | None = None,
    ddp: DistributedDataParallel | None = None,
    ranks: Ranks = SINGLE,
) -> tuple[torch.Tensor, int, dict[str, torch.Tensor]]:
    """Forward and backward every micro-batch of one accumulation window.

    The gradients left in ``.grad`` are those of (sum of token losses) / (loss tokens of the whole window), so
    how the window is split into micro-batches never changes them. Data parallel (``ddp`` wrapping
    ``loss_fn(model, .)``, ``ranks``, ``window_tokens`` summed over ranks), each rank runs its own window and
    gradients are all-reduced only on the last micro-batch (``no_sync`` before): the result equals one process
    running all ranks' windows.

    Returns:
        (summed loss of the window as a 0-dim device tensor, loss tokens in the window, summed extra metrics);
        data parallel, all three over all ranks.
    """
    if window_tokens is None:
        window_tokens = sum(int(b["num_loss_tokens"]) for b in window)  # CPU tensors: no device sync
    # DDP averages gradients over ranks: dividing by tokens / world_size makes that average the sum over ranks.
    denominator = max(window_tokens, 1) / ranks.world_size
    forward = ddp if ddp is not None else partial(loss_fn, model)
    window_loss = torch.zeros((), device=device)
    extras: dict[str, torch.Tensor] = {}
    for i, batch in enumerate(window):
        last = i == len(window) - 1
        with ddp.no_sync() if ddp is not None and not last else nullcontext():
            with precision.autocast():
                loss_sum, metrics = _split(forward(to_device(batch, device)))
            scaler.scale(loss_sum / denominator).backward()
        window_loss += loss_sum.detach().float()
        for name, value in metrics.items():
            extras[name] = extras.get(name, 0) + value.detach().float()
        del loss_sum, metrics  # the graph is freed by backward; drop the last references too
    if ranks.parallel:
        names = sorted(extras)
        summed = ranks.sum(torch.stack([window_loss, *(extras[n] for n in names)]))
        window_loss, extras = summed[0], dict(zip(names, summed[1:]))
    return window_loss, window_tokens, extras


@torch.no_grad()
def validation_loss(
    model: torch.nn.Module,
    batches: list[dict[str, Any]],
    loss_fn: LossFn,
    precision: Any,
    device: torch.device,
    *,
    ranks: Ranks = SINGLE,
) -> float:
    """Mean loss per loss token over pre-collated validation batches (data parallel: each rank's share, summed)."""
    was_training = model.training
    model.eval()
    total, count = torch.zeros((), device=device), 0
    for batch in batches:
        with precision.autocast():
            total += _split(loss_fn(model, to_device(batch, device)))[0].float()
        count += int(batch["num_loss_tokens"])  # a CPU tensor: no device sync
    model.train(was_training)
    sums = ranks.sum(torch.stack([total.double(), torch.tensor(count, dtype=torch.float64, device=device)]))
    total_loss, total_count = sums.tolist()  # host sync: once per validation
    return total_loss / max(total_count, 1)


class Window(NamedTuple):
    """One accumulation window after its backward (data parallel: every count over all ranks)."""

    loss: torch.Tensor  # summed loss, 0-dim on the device
    loss_tokens: int
    tokens: int  # non-pad tokens
    extras: dict[str, torch.Tensor]  # summed extra metrics of the loss_fn, 0-dim on the device


def run_window(
    model: torch.nn.Module,
    micro_batches: list[list[list[int]]],
    examples: list[Example],
    collate_fn: CollateFn,
    loss_fn: LossFn,
    precision: Any,
    scaler: torch.amp.GradScaler,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    *,
    splits: int,
    batch_size: int,
    step: int,
    log: MetricsLog,
    ddp: DistributedDataParallel | None = None,
    ranks: Ranks = SINGLE,
) -> tuple[Window, int]:
    """Collate, count and :func:`backward_window` one window; out of memory, redo it in smaller micro-batches.

    Args:
        micro_batches: the window's planned micro-batches, each a list of rows of indices into ``examples``.
        splits: parts each micro-batch runs in; doubled (:func:`more_splits`) after each out-of-memory error.
        batch_size: rows per planned micro-batch (the most parts there can be).
        step: the optimizer step this window is for (1-based), for the out-of-memory message and log record.
        Others: as in :func:`backward_window`; ``optimizer`` drops a failed attempt's partial gradients.

    Returns:
        (the :class:`Window`, the split count to use from now on).

    Raises:
        BudgetTooSmall: out of memory with single rows.
    """
    while True:  # once, unless out of memory: then again with each micro-batch run in smaller parts
        # Collate the whole window first: its loss-token count normalises every micro-step (CPU, no sync).
        window = [collate_fn([[examples[i] for i in row] for row in part])
                  for rows in micro_batches for part in split_rows(rows, splits)]
        counts = [sum(int(b[key]) for b in window) for key in ("num_loss_tokens", "num_tokens")]
        if ranks.parallel:  # host sync: once per optimizer step, under data parallelism only
            counts = [int(c) for c in ranks.sum(torch.tensor(counts, device=device)).tolist()]
        window_tokens, tokens = counts
        try:
            loss, window_tokens, extras = backward_window(
                model, window, loss_fn, precision, scaler, device, window_tokens=window_tokens, ddp=ddp, ranks=ranks
            )
            return Window(loss, window_tokens, tokens, extras), splits
        except RuntimeError as err:  # torch.OutOfMemoryError is one
            if not is_oom(err) or ranks.parallel:  # one rank cannot retry alone: the others wait for it
                raise
        # Out of memory: drop the failed window's partial gradients and batches, halve the micro-batch (the same
        # rows, in twice as many parts: the objective does not change) and redo the step.
        optimizer.zero_grad(set_to_none=True)
        del window
        splits = more_splits(splits, batch_size)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the cap counts reserved memory: give the failed step's blocks back
        rows_now = -(-batch_size // splits)
        _note(f"step {step}: out of memory; micro-batches of {rows_now} rows from now on "
              f"({len(micro_batches) * splits} per optimizer step)")
        log.write({"step": step, "out_of_memory": True, "micro_batch_rows": rows_now})


def validate(
    model: torch.nn.Module,
    batches: list[dict[str, Any]],
    loss_fn: LossFn,
    precision: Any,
    device: torch.device,
    state: LoopState,
    *,
    best_dir: Path,
    run_config: dict[str, Any],
    final: bool = False,
    ranks: Ranks = SINGLE,
) -> float:
    """:func:`validation_loss`, keeping the best: a new best goes into ``state.best_val`` and ``best_dir`` (rank 0).

    Args:
        state: the loop's state; ``best_val`` and ``bad_evals`` (validations in a row without a new best) change.
        best_dir: where the best adapter is saved, with ``run_config``.
        final: the validation after the last step: it leaves ``bad_evals`` as it was, so early stopping after a
            ``--resume`` counts only the validations every ``eval_every`` steps.
        Others: as in :func:`validation_loss`.

    Returns:
        The validation loss.
    """
    val_loss = validation_loss(model, batches, loss_fn, precision, device, ranks=ranks)
    improved = state.best_val is None or val_loss < state.best_val
    if improved:
        state.best_val = val_loss
        if ranks.is_main:
            save_adapter(model, best_dir, run_config)
    if not final:
        state.bad_evals = 0 if improved else state.bad_evals + 1
    return val_loss


def _data_order(train: list[Example], cfg: TrainConfig, ranks: Ranks) -> tuple[dict[str, Any], Callable[..., list]]:
    """(What fixes the order of micro-batches, ``plan_for(epoch=...)``: this rank's micro-batches of an epoch).

    A checkpoint's data position means nothing under other values of the first. Raises UserError: no examples,
    or a ``pack_len`` shorter than an example.
    """
    if not train:
        raise UserError("no training examples left after tokenization; check the data and --max-seq-length")
    lengths = [len(e["input_ids"]) for e in train]
    pack_len = cfg.pack_len or max(lengths)
    if cfg.packing and max(lengths) > pack_len:
        raise UserError(f"pack_len={pack_len} is shorter than the longest example ({max(lengths)} tokens)")
    mode = "pack" if cfg.packing else "bucket" if cfg.bucketing else "random"
    plan = {"seed": cfg.seed, "batch_size": cfg.batch_size, "mode": mode, "pack_len": pack_len if cfg.packing else None,
            "examples": len(train), "world_size": ranks.world_size}
    plan_for = partial(plan_epoch, lengths, cfg.batch_size, seed=cfg.seed, mode=mode, pack_len=plan["pack_len"],
                       rank=ranks.rank, world_size=ranks.world_size)
    return plan, plan_for


def _resume(
    path: str,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    plan: dict[str, Any],
    device: torch.device,
    ranks: Ranks,
) -> LoopState:
    """Load the checkpoint at (or latest under) ``path`` into the model, optimizer, scheduler, scaler and this
    rank's RNG; return its loop state. Raises UserError when its data ``plan`` differs from this run's."""
    checkpoint = find_checkpoint(path)
    saved = load_checkpoint(checkpoint, model)
    saved_plan = saved.get("plan", {})
    changed = [f"{k} was {saved_plan.get(k)}, now {v}" for k, v in plan.items() if saved_plan.get(k) != v]
    if changed:
        raise UserError(
            f"--resume {checkpoint}: its data position holds only for the data order it was saved with, but "
            f"{'; '.join(changed)}. Resume with the same --seed, --batch-size, packing, --pack-len, data and "
            "number of processes"
        )
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    scaler.load_state_dict(saved["scaler"])
    set_rng_state(saved["rng"][ranks.rank], device)
    state = LoopState(**saved["counters"])
    if ranks.is_main:
        _note(f"resumed from {checkpoint} at step {state.step}")
    return state


def _finish_run(
    model: torch.nn.Module,
    state: LoopState,
    stopped: str,
    cfg: TrainConfig,
    *,
    run_dir: Path,
    run_config: dict[str, Any],
    log: MetricsLog,
    memory: PeakMemory,
    checkpoint_now: Callable[[], Path],
    validate_now: Callable[..., float] | None,
    ranks: Ranks,
) -> FitResult:
    """The end of :func:`fit`: the final validation, the last checkpoint, the adapter and the loss curve, and
    ``summary.json`` (files on rank 0). ``fit`` calls it under its signal handler.

    Args:
        model: the trained model.
        state: the loop's state at its end.
        stopped: why the loop ended (:attr:`FitResult.stopped`).
        cfg: the loop's configuration.
        run_dir, run_config: as in :func:`fit`.
        log: the metrics log (gets the final validation loss; rank 0 reads it back for the loss curve).
        memory: the loop's peak memory (read into the result).
        checkpoint_now: saves this step's checkpoint (a collective: every rank calls it); returns its folder.
        validate_now: the keep-best validation, called with ``final=True``; None: no final validation.
        ranks: the process group.

    Returns:
        The :class:`FitResult`.

    Raises:
        UserError: the run stopped after ``cfg.max_bad_steps`` non-finite steps in a row (its checkpoint saved).
    """
    if validate_now is not None:
        log.write({"step": state.step, "val_loss": validate_now(final=True)})
    folder = checkpoint_now()
    if stopped == "non_finite":
        raise UserError(
            f"{cfg.max_bad_steps} optimizer steps in a row had a non-finite loss or gradient, so the run stopped "
            f"at step {state.step}; the last good weights are saved in {folder}. Try a lower --lr, "
            "--max-grad-norm or --precision fp32, then --resume"
        )
    history: list[dict[str, Any]] = []
    if ranks.is_main:
        save_adapter(model, run_dir / "adapter", run_config)
        history = log.read()
        plot_loss_curve(history, run_dir / "loss_curve.png")
    result = FitResult(steps=state.step, tokens=state.tokens, loss_tokens=state.loss_tokens, seconds=state.seconds,
                       final_loss=state.last_loss, best_val_loss=state.best_val, peak_memory=memory.read(),
                       skipped_steps=state.skipped, stopped=stopped, run_dir=str(run_dir), history=history)
    if ranks.is_main:
        summary = {k: v for k, v in result.__dict__.items() if k != "history"}
        summary["loss_tokens_per_s"] = result.loss_tokens_per_s
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        if stopped == "signal":
            _note(f"stopped by signal at step {state.step}; checkpoint saved in {folder} "
                  f"(continue with --resume {run_dir})")
    return result


def fit(
    model: torch.nn.Module,
    train: list[Example],
    val: list[Example],
    cfg: TrainConfig,
    *,
    run_dir: str | Path,
    collate_fn: CollateFn,
    run_config: dict[str, Any] | None = None,
    loss_fn: LossFn | None = None,
    show_progress: bool = True,
) -> FitResult:
    """Train the model's trainable (LoRA) parameters on ``train``; validate on ``val``.

    Runs data parallel when started by ``torchrun`` (it joins the process group if the caller has not): each rank
    trains on its shard of every epoch, rank 0 alone writes; call it on every rank with the same arguments.

    Args:
        model: a causal LM whose trainable parameters are the adapter (e.g. from ``model.add_lora``).
        train: training examples ``{"input_ids": [...], "labels": [...]}``, labels -100 off the answer.
        val: validation examples (may be empty).
        cfg: the loop's configuration.
        run_dir: where checkpoints, the adapter, the metrics log, the loss curve and the summary go.
        collate_fn: turns rows of examples into a batch with ``num_loss_tokens`` and ``num_tokens``; for SFT
            :func:`~gemma_lowmem.data.collate.collate_for` ``(model, pad_id=..., packed=cfg.packing)``.
        run_config: the full resolved config, saved with every checkpoint.
        loss_fn: ``loss_fn(model, batch) -> summed loss``; default: chunked SFT cross-entropy.
        show_progress: draw the tqdm bar (rank 0).

    Returns:
        A :class:`FitResult` (also written to ``run_dir/summary.json``).

    Raises:
        UserError: no examples; a checkpoint that does not fit; ``max_bad_steps`` non-finite steps in a row
            (after saving a checkpoint); a disk that cannot take a checkpoint.
    """
    # ---- setup -------------------------------------------------------------------------------------------------
    run_dir = Path(run_dir)
    run_config = run_config or {"train": cfg.__dict__}
    ranks = init_distributed()  # joins torchrun's process group (a no-op when torchrun did not start this process)
    device = next(p.device for p in model.parameters() if p.requires_grad)
    precision = resolve_precision(device, cfg.precision)
    loss_fn = loss_fn or partial(sft_loss, chunked=cfg.chunked_loss, chunk_size=cfg.loss_chunk_size)
    plan, plan_for = _data_order(train, cfg, ranks)
    micro_per_epoch = len(plan_for(epoch=0))  # per rank: every rank gets the same count
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * micro_per_epoch / cfg.grad_accum))
    warmup = int(cfg.warmup_ratio * total_steps)

    val_lengths = [len(e["input_ids"]) for e in val]
    val_plan = plan_epoch(val_lengths, cfg.batch_size, seed=0, epoch=0, mode="bucket") if val else []
    val_plan = val_plan[ranks.rank :: ranks.world_size]  # data parallel: each rank validates its share
    val_batches = [collate_fn([[val[i] for i in row] for row in rows]) for rows in val_plan]

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(lr_factor, total=total_steps, warmup=warmup, kind=cfg.scheduler)
    )
    scaler = torch.amp.GradScaler(device.type, enabled=precision.use_scaler)
    memory = PeakMemory(device)
    log = MetricsLog(run_dir / "metrics.jsonl", enabled=ranks.is_main)
    if ranks.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed + ranks.rank)  # dropout: reproducible from the config, different on each rank
    state = LoopState()
    if cfg.resume:
        state = _resume(cfg.resume, model, optimizer, scheduler, scaler, plan, device, ranks)
    log.truncate_after(state.step)  # steps past the checkpoint are trained again; a fresh run starts empty
    ddp = wrap_ddp(model, loss_fn, device) if ranks.parallel else None
    validate_now = partial(validate, model, val_batches, loss_fn, precision, device, state,
                           best_dir=run_dir / "adapter_best", run_config=run_config, ranks=ranks)

    def checkpoint_now() -> Path:
        folder = run_dir / "checkpoints" / f"step-{state.step:06d}"
        rngs = ranks.gather(rng_state(device))  # every rank's dropout RNG (a collective: all ranks come here)
        if ranks.is_main:
            trainer_state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                             "scaler": scaler.state_dict(), "counters": asdict(state), "plan": plan, "rng": rngs}
            save_checkpoint(folder, model, trainer_state, run_config, cfg.keep_checkpoints)
        return folder

    model.train()
    memory.reset()
    stream = _micro_batches(plan_for, state.epoch, state.index)
    stopped, bad_in_row, record, first_step = "max_steps", 0, {}, state.step
    splits = 1  # parts each planned micro-batch runs in (more after an out-of-memory error)
    t_last, tokens_last = time.perf_counter(), state.loss_tokens
    max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")

    # ---- loop --------------------------------------------------------------------------------------------------
    bar = tqdm(total=total_steps, initial=state.step, desc="train", unit="step",
               disable=not (show_progress and ranks.is_main))
    # The int8 linears' float copies (cfg.float_weights, planned against the budget with everything else): no cap.
    copies = float_weight_cache(model, max_bytes=sys.maxsize, training=True) if cfg.float_weights else nullcontext()
    with _StopSignal(announce=ranks.is_main) as stop, bar, copies:  # an error closes the bar: its message starts a line
        while state.step < total_steps:
            planned = [next(stream) for _ in range(cfg.grad_accum)]  # (epoch, index, rows) per micro-batch
            epoch, index = planned[-1][:2]
            window, splits = run_window(
                model, [rows for _, _, rows in planned], train, collate_fn, loss_fn, precision, scaler, optimizer,
                device, splits=splits, batch_size=cfg.batch_size, step=state.step + 1, log=log, ddp=ddp, ranks=ranks,
            )
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
            loss = window.loss.item() / max(window.loss_tokens, 1)  # host sync: once per optimizer step
            loss_ok, grad_ok = math.isfinite(loss), bool(torch.isfinite(grad_norm))
            if loss_ok and grad_ok:
                scaler.step(optimizer)
                bad_in_row, state.last_loss = 0, loss
            else:  # skip the update: the weights and the optimizer state stay the last good ones
                state.skipped += 1
                # fp16: GradScaler lowers its scale after an overflow; while the scale is >= 1 that is routine
                routine = precision.use_scaler and loss_ok and scaler.get_scale() >= 1.0
                bad_in_row += 0 if routine else 1
                if ranks.is_main:
                    _note(f"step {state.step + 1}: non-finite {'gradient' if loss_ok else 'loss'}; "
                          f"optimizer step skipped ({bad_in_row} in a row, {state.skipped} in all)")
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()

            state.step += 1
            state.epoch, state.index = epoch, index + 1
            state.tokens += window.tokens
            state.loss_tokens += window.loss_tokens
            record = {"step": state.step, "epoch": epoch, "loss": loss if loss_ok else None,  # strict JSON: no NaN
                      "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm) if grad_ok else None}
            if not (loss_ok and grad_ok):
                record["skipped"] = state.skipped
            if cfg.eval_every and state.step % cfg.eval_every == 0 and val_batches:
                record["val_loss"] = validate_now()

            if state.step % cfg.log_every == 0 or "val_loss" in record or "skipped" in record:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)  # host sync: honest timings at log steps only
                now = time.perf_counter()
                state.seconds += now - t_last
                record["loss_tokens_per_s"] = (state.loss_tokens - tokens_last) / max(now - t_last, 1e-9)
                t_last, tokens_last = now, state.loss_tokens
                record.update(memory.read())
                if precision.use_scaler:
                    record["loss_scale"] = scaler.get_scale()  # host sync: fp16 only, at log steps only
                # host sync: extra metrics (e.g. DPO reward accuracy) per loss unit, at log steps only
                record.update({k: v.item() / max(window.loss_tokens, 1) for k, v in window.extras.items()})
                log.write(record)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{record['lr']:.2e}",
                                tok_s=f"{record['loss_tokens_per_s']:.1f}", mem=format_size(memory.peak()))
            bar.update(1)

            if bad_in_row >= cfg.max_bad_steps:
                stopped = "non_finite"
                break
            if cfg.early_stopping_patience and state.bad_evals >= cfg.early_stopping_patience:
                stopped = "early_stopping"
                break
            if ranks.any(stop.requested, device):  # all ranks stop at the same step, whichever got the signal
                stopped = "signal"
                break
            if cfg.save_every and state.step % cfg.save_every == 0 and state.step < total_steps:
                checkpoint_now()
        bar.close()

        # ---- report (still under the signal handler: one signal now does not cut the final save short) -------
        state.seconds += time.perf_counter() - t_last
        # Validate at the end unless the last step did, or nothing was trained (resumed at the end: done before
        # that checkpoint), or the run was stopped (then it would change best_val and early stopping after --resume).
        trained = state.step > first_step
        validate_last = (stopped in ("max_steps", "early_stopping") and trained and bool(val_batches)
                         and "val_loss" not in record)
        return _finish_run(model, state, stopped, cfg, run_dir=run_dir, run_config=run_config, log=log, memory=memory,
                           checkpoint_now=checkpoint_now, validate_now=validate_now if validate_last else None,
                           ranks=ranks)
