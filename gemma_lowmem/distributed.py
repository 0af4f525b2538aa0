"""Data-parallel training through PyTorch's own engine: one process per device, started by ``torchrun``.

``torchrun --nproc-per-node N scripts/train.py ...`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the
rendezvous address; :func:`init_distributed` joins that process group (NCCL on GPUs, gloo on the CPU). The loop
(``gemma_lowmem.train.fit``) calls it too, so the same code runs alone or on N ranks: each rank trains on its shard
of every epoch (``plan_epoch(rank=, world_size=)``), and rank 0 alone writes logs, checkpoints and adapters.

Why :class:`LossModule`: DistributedDataParallel prepares its gradient reducer in its own ``forward``, but the
chunked SFT loss calls the decoder directly, not ``model.forward``. So the whole loss becomes the ``forward`` of a
small module, and that module is what DDP wraps; ``no_sync`` then skips the all-reduce on every micro-step of an
accumulation window but the last. Only the LoRA parameters are trainable (a few MB), so that is all DDP syncs; the
frozen (int8) base is loaded by every rank from the same files and is kept out of DDP's broadcast.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as tdist
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class Ranks:
    """This process's place in the data-parallel group: rank 0 of 1 without torchrun.

    Every method is a collective under data parallelism (all ranks must call it) and a no-op otherwise.
    """

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes logs, checkpoints and adapters."""
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.world_size > 1

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over ranks, in place; returns the tensor."""
        if self.parallel:
            tdist.all_reduce(tensor)
        return tensor

    def any(self, flag: bool, device: torch.device) -> bool:
        """Whether ``flag`` is true on any rank (so that all ranks take the same branch)."""
        if not self.parallel:
            return flag
        value = torch.tensor(float(flag), device=device)
        tdist.all_reduce(value, op=tdist.ReduceOp.MAX)
        return bool(value.item())  # host sync: once per optimizer step, under data parallelism only

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order."""
        if not self.parallel:
            return [obj]
        out: list[Any] = [None] * self.world_size
        tdist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (e.g. a run folder named after the clock)."""
        if not self.parallel:
            return obj
        box = [obj]
        tdist.broadcast_object_list(box, src=0)
        return box[0]

    @contextmanager
    def main_first(self) -> Iterator[None]:
        """Run the block on rank 0 first, then on the others: for work that fills a shared cache."""
        if self.parallel and not self.is_main:
            tdist.barrier()
        yield
        if self.parallel and self.is_main:
            tdist.barrier()


def current_ranks() -> Ranks:
    """The data-parallel group this process belongs to (rank 0 of 1 when no process group is initialized)."""
    if tdist.is_available() and tdist.is_initialized():
        return Ranks(tdist.get_rank(), tdist.get_world_size())
    return Ranks()


def init_distributed() -> Ranks:
    """Join the process group that torchrun describes in the environment; without torchrun, do nothing.

    Returns:
        This process's :class:`Ranks`.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or tdist.is_initialized():
        return current_ranks()
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)  # NCCL collectives and all_gather_object run on this rank's GPU
        tdist.init_process_group("nccl", device_id=device)
    else:
        tdist.init_process_group("gloo")
    return current_ranks()


def close_distributed() -> None:
    """Leave the process group (at the end of a run; a no-op without one)."""
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()


class LossModule(torch.nn.Module):
    """``forward(batch) = loss_fn(model, batch)``: the whole loss in one module call, for DDP to wrap."""

    def __init__(self, model: torch.nn.Module, loss_fn: Callable[[torch.nn.Module, dict[str, Any]], Any]) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: dict[str, Any]) -> Any:
        return self.loss_fn(self.model, batch)


def wrap_ddp(
    model: torch.nn.Module, loss_fn: Callable[[torch.nn.Module, dict[str, Any]], Any], device: torch.device
) -> DistributedDataParallel:
    """DDP over ``loss_fn(model, batch)`` that syncs only the trainable (LoRA) parameters.

    Args:
        model: the PEFT model; its trainable parameters are rank 0's after this call (DDP broadcasts them).
        loss_fn: ``loss_fn(model, batch) -> summed loss`` or ``(summed loss, metrics)``.
        device: this rank's device.

    Returns:
        The DDP module: call it on a batch for the loss; ``.no_sync()`` for the micro-steps before the last.
    """
    module = LossModule(model, loss_fn)
    # Frozen weights (int8 included) and buffers are identical on every rank: no broadcast, no reducer buckets.
    frozen = [name for name, p in module.named_parameters() if not p.requires_grad]
    frozen += [name for name, _ in module.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, frozen)
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
