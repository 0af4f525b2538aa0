"""Tolerances for two float paths of one computation, set from the reference path's own error on this machine.

Why not a fixed atol: a packed row and the documents run one by one (or chunked and full logits, a padded batch
and single rows) give the same sums in another order and in other matrix shapes, so their fp32 results differ by
whatever blocking the CPU's kernels choose. An atol read off one machine's results fails on another: a LoRA
gradient that matched to 1e-5 on an AMD AVX2 CPU missed by 2e-5 on an Intel AMX one. Instead the test runs the same
tiny model in fp64 (the gold), measures the reference path's own error against it on the machine that runs the
test, and lets the path under test be at most ``factor`` times worse. Real bugs stay far above that: one key of
the neighbouring document leaked to one query of a packed row, a loss normaliser off by one token, or a gradient
1e-4 too large (relative) each fail these tests by 10x to 10^5x.

The gold is not exact: Hugging Face computes a few steps in fp32 whatever the model's dtype (RMSNorm, rotary angles,
the eager softmax, Gemma 3n's AltUp router). Its packed and one-by-one runs still agree to ~1e-7 relative (Gemma 3n;
1e-14 for Gemma 3), far below the 1e-6 to 1e-5 by which the fp32 runs miss it.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch

Tensors = torch.Tensor | Mapping[str, torch.Tensor]


def fp64_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The same model (weights, adapter, mode) in fp64, for the gold run; the original is left as it is."""
    return copy.deepcopy(model).double()


def assert_as_accurate(
    ours: Tensors,
    ref: Tensors,
    gold: Tensors,
    *,
    factor: float = 4.0,
    floor: float = 8.0,
    per_tensor: bool = True,
    name: str = "value",
) -> None:
    """Ours is within ``factor`` x the reference's own error against the fp64 gold (max abs error per tensor).

    Args:
        ours: the path under test (e.g. packed), a tensor or a mapping of them (e.g. gradients by parameter name).
        ref: the reference path (e.g. one document at a time) in the same dtype, same shapes and keys.
        gold: the reference path run in fp64 on the same inputs and weights.
        factor: how much worse than the reference ours may be: it sums in another order, not in lower precision.
        floor: an absolute allowance of ``floor`` x eps(ours' dtype) x max|gold|, for a reference that is exact
            by luck on a tensor (a few ulps of summation noise); far below the errors of a real bug.
        per_tensor: for a mapping, compare each tensor on its own; False compares the largest error over all of
            them. Trained weights need False: Adam divides each gradient by its own running size, so a last-bit
            difference grows most where gradients are smallest, and which tensor that lands in is chance.
        name: what is compared, for the failure message.
    """
    if isinstance(gold, Mapping):
        assert ours.keys() == ref.keys() == gold.keys() and len(gold) > 0, name
        if not per_tensor:
            ours, ref, gold = (torch.cat([t[key].flatten() for key in gold]) for t in (ours, ref, gold))
            assert_as_accurate(ours, ref, gold, factor=factor, floor=floor, name=f"{name} (all)")
            return
        for key in gold:
            assert_as_accurate(ours[key], ref[key], gold[key], factor=factor, floor=floor, name=f"{name} {key}")
        return
    assert ours.dtype == ref.dtype and ours.shape == ref.shape == gold.shape, name
    assert gold.dtype == torch.float64, f"{name}: the gold must be fp64, got {gold.dtype}"
    ours, ref, gold = ours.detach(), ref.detach(), gold.detach()
    ours_err = (ours.double() - gold).abs().max().item()
    ref_err = (ref.double() - gold).abs().max().item()
    allowed = factor * ref_err + floor * torch.finfo(ours.dtype).eps * gold.abs().max().item()
    assert ours_err <= allowed, (
        f"{name}: error {ours_err:.3g} against the fp64 gold, over the {allowed:.3g} allowed "
        f"({factor:g} x the reference's own error {ref_err:.3g}, plus the floor)"
    )
