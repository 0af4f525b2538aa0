"""Plan an epoch: which examples form each row, and which rows each micro-batch, on each data-parallel rank.

A plan is ``list[micro_batch]``, a micro-batch ``list[row]``, a row ``list[example index]`` (one index per row
unless packed). :func:`plan_epoch` is a pure function of its arguments, so a run resumes at (epoch, micro-batch
index) by planning the epoch again.

Modes:
- ``random``: a fresh permutation each epoch, ``batch_size`` examples per micro-batch.
- ``bucket``: each epoch the shuffled examples are cut into buckets of ``batch_size * BUCKET_BATCHES`` examples;
  each bucket is sorted by length and cut into micro-batches, so a micro-batch holds neighbours in length (little
  padding); then all micro-batches are shuffled. Which examples share a bucket changes every epoch.
- ``pack``: rows are the :func:`~gemma_lowmem.data.packing.fill_bins` bins of ``pack_len`` tokens (the same bins
  every epoch); the bins are shuffled each epoch and grouped ``batch_size`` rows per micro-batch.

Data-parallel sharding: every rank plans the same global list of micro-batches and takes every ``world_size``-th
one (rank r takes r, r + W, ...), so all ranks get the same count. When the count does not divide by W, the rows
of the leftover micro-batches (and of the last full round, when fewer rows than ranks are left over) are sorted by
length and re-split into W (or 2W) smaller micro-batches, one (or two) per rank, so every example is still seen
exactly once per epoch. This is impossible only when the rows cannot be shared evenly at all (``batch_size`` 1 with a
row count not divisible by W, or fewer rows than ranks); then fewer than W leftover rows are seen twice.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from gemma_lowmem.data.packing import fill_bins

MODES = ("random", "bucket", "pack")
BUCKET_BATCHES = 50  # micro-batches per length bucket: enough neighbours to pad little, few enough to stay random


def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _shard(
    batches: list[list[list[int]]], lengths: np.ndarray, batch_size: int, rank: int, world_size: int
) -> list[list[list[int]]]:
    """This rank's share of the global micro-batches (see the module docstring for the remainder)."""
    rounds = len(batches) // world_size
    if rounds * world_size == len(batches):
        return batches[rank::world_size]
    tail = [row for mb in batches[rounds * world_size :] for row in mb]
    if len(tail) < world_size and rounds > 0:  # too few leftover rows for one each: re-split the last round too
        rounds -= 1
        tail = [row for mb in batches[rounds * world_size :] for row in mb]
    # The leftover rows become world_size * per_rank micro-batches of at most batch_size rows: contiguous runs of
    # the rows sorted by length, sizes differing by at most one. Fewer rows than runs (batch_size 1, or a data set
    # smaller than world_size) cannot be split evenly: then rows are reused from the start of the tail.
    tail.sort(key=lambda row: int(lengths[row].sum()))
    per_rank = -(-len(tail) // (world_size * batch_size))
    parts = world_size * per_rank
    if len(tail) < parts:
        tail += [tail[i % len(tail)] for i in range(parts - len(tail))]
    base, extra = divmod(len(tail), parts)
    bounds = [p * base + min(p, extra) for p in range(parts + 1)]
    mine = [tail[bounds[p] : bounds[p + 1]] for p in range(rank * per_rank, (rank + 1) * per_rank)]
    return [*batches[rank : rounds * world_size : world_size], *mine]


def plan_epoch(
    lengths: Sequence[int],
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    mode: str,
    pack_len: int | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> list[list[list[int]]]:
    """This rank's micro-batches for one epoch.

    Args:
        lengths: token count of each example.
        batch_size: rows per micro-batch.
        seed: run seed; with ``epoch`` it fixes the order.
        epoch: epoch number; each epoch gets a different order.
        mode: "random", "bucket" or "pack".
        pack_len: tokens per packed row (mode "pack" only); every example must fit.
        rank: this process's data-parallel rank.
        world_size: number of data-parallel ranks.

    Returns:
        Micro-batches, each a list of rows, each row a list of example indices.
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not one of {MODES}")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
    if (mode == "pack") != (pack_len is not None):
        raise ValueError(f"pack_len={pack_len} must be given for mode 'pack' and only then")
    lens = np.asarray(lengths, dtype=np.int64)
    # SeedSequence wants non-negative entropy; the modulo keeps any Python int valid and distinct in practice.
    rng = np.random.default_rng([seed % 2**64, epoch % 2**64])
    if mode == "random":
        rows = [[i] for i in rng.permutation(len(lens)).tolist()]
        batches = _chunks(rows, batch_size)
    elif mode == "bucket":
        perm = rng.permutation(len(lens))
        batches = []
        for bucket in _chunks(perm.tolist(), batch_size * BUCKET_BATCHES):
            bucket = np.asarray(bucket)
            by_len = bucket[np.argsort(lens[bucket], kind="stable")].tolist()  # ties stay in shuffled order
            batches += _chunks([[i] for i in by_len], batch_size)
        batches = [batches[j] for j in rng.permutation(len(batches)).tolist()]
    else:
        bins = fill_bins(lens.tolist(), pack_len)
        rows = [bins[j] for j in rng.permutation(len(bins)).tolist()]
        batches = _chunks(rows, batch_size)
    return _shard(batches, lens, batch_size, rank, world_size)


def _row_lengths(micro_batch: list[list[int]], lengths: Sequence[int]) -> list[int]:
    return [sum(lengths[i] for i in row) for row in micro_batch]


def padding_fraction(plan: Sequence[Sequence[Sequence[int]]], lengths: Sequence[int]) -> float:
    """Share of token slots that are padding when each micro-batch pads to its longest row.

    Args:
        plan: micro-batches from :func:`plan_epoch`.
        lengths: token count of each example.

    Returns:
        pad slots / all slots (0.0 for an empty plan).
    """
    real = slots = 0
    for mb in plan:
        row_lens = _row_lengths(mb, lengths)
        real += sum(row_lens)
        slots += len(row_lens) * max(row_lens)
    return 1.0 - real / slots if slots else 0.0


def packing_efficiency(plan: Sequence[Sequence[Sequence[int]]], lengths: Sequence[int], pack_len: int) -> float:
    """Share of a packed plan's ``rows * pack_len`` slots that hold real tokens.

    Args:
        plan: micro-batches from :func:`plan_epoch` in mode "pack".
        lengths: token count of each example.
        pack_len: tokens per packed row.

    Returns:
        real tokens / (rows * pack_len) (0.0 for an empty plan).
    """
    rows = [row for mb in plan for row in mb]
    real = sum(lengths[i] for row in rows for i in row)
    return real / (len(rows) * pack_len) if rows else 0.0
