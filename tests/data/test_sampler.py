"""Epoch plans: deterministic, complete, reshuffled per epoch, low padding when bucketed, sharded without overlap."""

from __future__ import annotations

import random

import numpy as np
import pytest

from gemma_lowmem.data.packing import fill_bins
from gemma_lowmem.data.sampler import BUCKET_BATCHES, packing_efficiency, padding_fraction, plan_epoch


def random_lengths(n: int, seed: int = 0, low: int = 20, high: int = 1000) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(low, high) for _ in range(n)]


def flat(plan: list[list[list[int]]]) -> list[int]:
    return [i for mb in plan for row in mb for i in row]


MODE_ARGS = {"random": {}, "bucket": {}, "pack": {"pack_len": 2048}}


@pytest.mark.parametrize("mode", list(MODE_ARGS))
def test_deterministic_complete_and_reshuffled(mode: str) -> None:
    lengths = random_lengths(1003)
    plan = plan_epoch(lengths, 4, seed=7, epoch=0, mode=mode, **MODE_ARGS[mode])
    assert plan == plan_epoch(lengths, 4, seed=7, epoch=0, mode=mode, **MODE_ARGS[mode])
    assert sorted(flat(plan)) == list(range(len(lengths)))
    assert all(1 <= len(mb) <= 4 for mb in plan) and sum(len(mb) < 4 for mb in plan) <= 1
    assert all(isinstance(i, int) for i in flat(plan))  # plain ints: plans go into JSON checkpoints
    assert flat(plan) != flat(plan_epoch(lengths, 4, seed=7, epoch=1, mode=mode, **MODE_ARGS[mode]))
    assert flat(plan) != flat(plan_epoch(lengths, 4, seed=8, epoch=0, mode=mode, **MODE_ARGS[mode]))


def test_random_mode_rows_hold_one_example() -> None:
    plan = plan_epoch(random_lengths(50), 3, seed=0, epoch=0, mode="random")
    assert all(len(row) == 1 for mb in plan for row in mb)
    assert [len(mb) for mb in plan] == [3] * 16 + [2]


def test_bucket_mode_pads_less_than_random() -> None:
    lengths = random_lengths(4000)
    random_pad = padding_fraction(plan_epoch(lengths, 4, seed=0, epoch=0, mode="random"), lengths)
    bucket_pad = padding_fraction(plan_epoch(lengths, 4, seed=0, epoch=0, mode="bucket"), lengths)
    assert random_pad > 0.25  # uniform lengths in [20, 1000], 4 per batch: about a third of the slots are pads
    assert bucket_pad < random_pad / 5


def test_bucket_mode_mixes_buckets_across_epochs() -> None:
    """Buckets are drawn afresh each epoch: a micro-batch's partners change, not only the batch order."""
    lengths = random_lengths(BUCKET_BATCHES * 2 * 10)
    pairs = [{frozenset(i for row in mb for i in row) for mb in plan_epoch(lengths, 2, seed=0, epoch=e, mode="bucket")}
             for e in (0, 1)]
    assert len(pairs[0] & pairs[1]) < len(pairs[0]) // 2


def test_pack_mode_rows_fit_and_are_efficient() -> None:
    lengths = random_lengths(2000, low=50, high=800)
    plan = plan_epoch(lengths, 2, seed=0, epoch=0, mode="pack", pack_len=2048)
    assert max(sum(lengths[i] for i in row) for mb in plan for row in mb) <= 2048
    assert any(len(row) > 1 for mb in plan for row in mb)
    assert packing_efficiency(plan, lengths, 2048) > 0.98
    assert padding_fraction(plan, lengths) < 0.05



def test_pack_mode_rows_are_the_max_fill_bins() -> None:
    """CNN/DailyMail-like conversations (600-1250 tokens) in rows of 8192: the rows are fill_bins' bins, >= 99% full."""
    lengths = np.random.default_rng(0).integers(600, 1251, size=900).tolist()
    plan = plan_epoch(lengths, 2, seed=0, epoch=0, mode="pack", pack_len=8192)
    assert sorted(row for mb in plan for row in mb) == sorted(fill_bins(lengths, 8192))
    assert packing_efficiency(plan, lengths, 8192) >= 0.99

def test_padding_and_packing_measures() -> None:
    lengths = [10, 4, 6, 2]
    assert padding_fraction([[[0], [1]], [[2], [3]]], lengths) == pytest.approx((6 + 4) / (20 + 12))
    assert padding_fraction([[[0, 3], [1, 2]]], lengths) == pytest.approx(2 / 24)
    assert packing_efficiency([[[0, 3], [1, 2]]], lengths, 16) == pytest.approx(22 / 32)
    assert padding_fraction([], lengths) == 0.0 and packing_efficiency([], lengths, 16) == 0.0


@pytest.mark.parametrize("mode", list(MODE_ARGS))
@pytest.mark.parametrize(("n", "world_size", "batch_size"), [(1200, 4, 4), (1003, 3, 4), (997, 8, 2), (61, 8, 4)])
def test_sharding_disjoint_complete_and_even(mode: str, n: int, world_size: int, batch_size: int) -> None:
    lengths = random_lengths(n, seed=n)
    kw = dict(seed=3, epoch=2, mode=mode, **MODE_ARGS[mode])
    shards = [plan_epoch(lengths, batch_size, rank=r, world_size=world_size, **kw) for r in range(world_size)]
    assert len({len(s) for s in shards}) == 1  # every rank runs the same number of micro-batches
    assert all(1 <= len(mb) <= batch_size for s in shards for mb in s)
    # Together the ranks hold exactly the single-process plan's rows, each once (leftovers re-split, not repeated).
    single = plan_epoch(lengths, batch_size, **kw)
    assert sorted(row for s in shards for mb in s for row in mb) == sorted(row for mb in single for row in mb)
    assert sorted(i for s in shards for i in flat(s)) == list(range(n))


@pytest.mark.parametrize(("n", "world_size", "batch_size"), [(3, 8, 4), (10, 4, 1)])
def test_sharding_repeats_only_when_rows_cannot_be_shared(n: int, world_size: int, batch_size: int) -> None:
    """Fewer rows than ranks, or one row per micro-batch and a row count that W does not divide."""
    shards = [plan_epoch(list(range(1, n + 1)), batch_size, seed=0, epoch=0, mode="random", rank=r,
                         world_size=world_size) for r in range(world_size)]
    assert len({len(s) for s in shards}) == 1
    seen = [i for s in shards for i in flat(s)]
    assert set(seen) == set(range(n)) and 0 < len(seen) - n < world_size


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="mode='sorted'"):
        plan_epoch([5], 1, seed=0, epoch=0, mode="sorted")
    with pytest.raises(ValueError, match="pack_len"):
        plan_epoch([5], 1, seed=0, epoch=0, mode="pack")
    with pytest.raises(ValueError, match="rank=2"):
        plan_epoch([5], 1, seed=0, epoch=0, mode="random", rank=2, world_size=2)
    with pytest.raises(ValueError, match="example 1 has 9 tokens"):
        plan_epoch([5, 9], 1, seed=0, epoch=0, mode="pack", pack_len=8)
    assert plan_epoch([], 2, seed=0, epoch=0, mode="bucket") == []
