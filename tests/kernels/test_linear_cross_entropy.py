"""Chunked linear cross-entropy against its full-logits reference: values, every gradient, dtypes, odd shapes."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kernels.linear_cross_entropy import (
    DEFAULT_CHUNK_BYTES,
    _default_chunk_size,
    linear_cross_entropy,
    linear_cross_entropy_ref,
)

N, H, V = 255, 67, 1003  # odd on purpose: no dimension is a power of two or a multiple of a chunk


def make_inputs(seed: int = 0, n: int = N, ignored: float = 0.3, shape: tuple[int, ...] | None = None):
    """fp32 hidden (n, H), weight (V, H), labels (n,) with a fraction ``ignored`` set to -100."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, H, generator=g) * 2  # logits of std ~5: a softcap of 5 is well inside its bend
    weight = torch.randn(V, H, generator=g) * 0.3
    labels = torch.randint(0, V, (n,), generator=g)
    labels[torch.rand(n, generator=g) < ignored] = -100
    if shape is not None:
        hidden, labels = hidden.view(*shape, H), labels.view(shape)
    return hidden, weight, labels


def run(fn, hidden, weight, labels, dtype, upstream=None, **kw):
    """Loss and the (hidden, weight) gradients of ``fn`` on copies of the inputs cast to ``dtype``."""
    h = hidden.to(dtype).clone().requires_grad_()
    w = weight.to(dtype).clone().requires_grad_()
    loss = fn(h, w, labels, **kw)
    (loss if upstream is None else (loss * upstream).sum()).backward()
    return loss.detach(), h.grad, w.grad


def assert_no_worse(ours, ref, gold, factor: float = 2.0):
    """Each of ours is within ``factor`` x the reference's own error against the fp64 gold.

    The floor of 1e-5 x max|gold| absorbs fp32 summation-order noise, where the reference can be exact by luck.
    """
    for name, o, r, g in zip(("loss", "grad hidden", "grad weight"), ours, ref, gold, strict=True):
        assert o.dtype == r.dtype and o.shape == r.shape, name
        g = g.double()
        ours_err = (o.double() - g).abs().max().item()
        ref_err = (r.double() - g).abs().max().item()
        floor = 1e-5 * g.abs().max().item()
        assert ours_err <= factor * ref_err + floor, f"{name}: error {ours_err:.3g}, reference's {ref_err:.3g}"


def gold_bits(hidden, weight, dtype):
    """The inputs rounded to ``dtype`` (what both implementations see), for the fp64 gold run."""
    return hidden.to(dtype).double(), weight.to(dtype).double()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("chunk_size", [1, 7, 64, 1000])
def test_matches_reference(dtype, softcap, chunk_size):
    hidden, weight, labels = make_inputs()
    kw = dict(softcap=softcap, chunk_size=chunk_size)
    ours = run(linear_cross_entropy, hidden, weight, labels, dtype, **kw)
    ref = run(linear_cross_entropy_ref, hidden, weight, labels, dtype, **kw)
    gold = run(linear_cross_entropy_ref, *gold_bits(hidden, weight, dtype), labels, torch.float64, **kw)
    assert ours[0].dtype == torch.float32  # the loss is fp32 whatever the input dtype
    assert ours[1].dtype == dtype and ours[2].dtype == dtype
    assert_no_worse(ours, ref, gold)


def test_bf16_weight_grad_sums_chunks_in_fp32():
    """255 one-token chunks all hitting 5 target rows: summing them in bf16 would be ~3x worse than the reference."""
    hidden, weight, labels = make_inputs(seed=13, ignored=0.0)
    labels = torch.randint(0, 5, labels.shape, generator=torch.Generator().manual_seed(14))
    ours = run(linear_cross_entropy, hidden, weight, labels, torch.bfloat16, chunk_size=1)
    ref = run(linear_cross_entropy_ref, hidden, weight, labels, torch.bfloat16)
    gold = run(linear_cross_entropy_ref, *gold_bits(hidden, weight, torch.bfloat16), labels, torch.float64)
    assert_no_worse(ours, ref, gold)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_reductions_3d(dtype, reduction):
    hidden, weight, labels = make_inputs(seed=1, shape=(3, 85))  # (B, T, H) with B * T = 255
    # "none" is checked through a random weighting of the per-token losses, as a DPO loss would use them
    upstream = torch.randn(3, 85, generator=torch.Generator().manual_seed(2)) if reduction == "none" else None
    kw = dict(softcap=5.0, chunk_size=16, reduction=reduction, upstream=upstream)
    ours = run(linear_cross_entropy, hidden, weight, labels, dtype, **kw)
    ref = run(linear_cross_entropy_ref, hidden, weight, labels, dtype, **kw)
    gold = run(linear_cross_entropy_ref, *gold_bits(hidden, weight, dtype), labels, torch.float64, **kw)
    assert_no_worse(ours, ref, gold)
    if reduction == "none":
        assert ours[0].shape == labels.shape
        assert torch.all(ours[0][labels == -100] == 0)
        assert torch.all(ours[0][labels != -100] > 0)


def test_mean_is_sum_over_labelled_tokens():
    hidden, weight, labels = make_inputs(seed=3)
    total = linear_cross_entropy(hidden, weight, labels, chunk_size=50)
    mean = linear_cross_entropy(hidden, weight, labels, chunk_size=50, reduction="mean")
    per_token = linear_cross_entropy(hidden, weight, labels, chunk_size=50, reduction="none")
    count = (labels != -100).sum()
    torch.testing.assert_close(mean, total / count)
    torch.testing.assert_close(per_token.sum(), total)


def test_ignored_rows_get_exactly_zero_grad():
    hidden, weight, labels = make_inputs(seed=4, ignored=0.5)
    _, grad_hidden, _ = run(linear_cross_entropy, hidden, weight, labels, torch.float32, chunk_size=9)
    ignored = labels == -100
    assert torch.all(grad_hidden[ignored] == 0)
    assert torch.all(grad_hidden[~ignored].abs().sum(1) > 0)


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_all_ignored(reduction):
    hidden, weight, labels = make_inputs(seed=5, n=10, ignored=1.0)
    loss, grad_hidden, grad_weight = run(linear_cross_entropy, hidden, weight, labels, torch.float32,
                                         reduction=reduction, upstream=torch.ones(10) if reduction == "none" else None)
    assert torch.all(loss == 0) and not torch.isnan(loss).any()
    assert grad_hidden is not None and torch.all(grad_hidden == 0)
    assert grad_weight is not None and torch.all(grad_weight == 0)


def test_custom_ignore_index():
    hidden, weight, labels = make_inputs(seed=6, n=40, ignored=0.0)
    labels[::3] = 7  # a real token id used as the ignore marker
    ours = run(linear_cross_entropy, hidden, weight, labels, torch.float64, ignore_index=7, chunk_size=5)
    ref = run(linear_cross_entropy_ref, hidden, weight, labels, torch.float64, ignore_index=7)
    for o, r in zip(ours, ref, strict=True):
        torch.testing.assert_close(o, r)


def test_frozen_weight_gets_no_grad():
    hidden, weight, labels = make_inputs(seed=7, n=30)
    h = hidden.clone().requires_grad_()
    linear_cross_entropy(h, weight, labels, chunk_size=4).backward()
    h_ref = hidden.clone().requires_grad_()
    linear_cross_entropy_ref(h_ref, weight, labels).backward()
    assert weight.grad is None
    torch.testing.assert_close(h.grad, h_ref.grad)


@pytest.mark.parametrize("softcap", [None, 2.0])
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_gradcheck_fp64(softcap, reduction):
    g = torch.Generator().manual_seed(8)
    hidden = torch.randn(9, 5, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 5, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 11, (9,), generator=g)
    labels[[1, 4]] = -100

    def fn(h, w):
        return linear_cross_entropy(h, w, labels, softcap=softcap, chunk_size=4, reduction=reduction)

    assert torch.autograd.gradcheck(fn, (hidden, weight))


def test_under_cpu_bf16_autocast():
    """fp32 master weights under autocast: the matmuls run in bf16 like F.linear would, grads stay fp32."""
    hidden, weight, labels = make_inputs(seed=9)
    kw = dict(softcap=5.0, chunk_size=32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = run(linear_cross_entropy, hidden, weight, labels, torch.float32, **kw)
        ref = run(linear_cross_entropy_ref, hidden, weight, labels, torch.float32, **kw)
    gold = run(linear_cross_entropy_ref, *gold_bits(hidden, weight, torch.bfloat16), labels, torch.float64, **kw)
    assert ours[0].dtype == torch.float32 and ours[1].dtype == torch.float32 and ours[2].dtype == torch.float32
    assert_no_worse(ours, ref, gold)
    # autocast really changed the arithmetic: the fp32 result differs by bf16-sized amounts
    fp32 = run(linear_cross_entropy, hidden, weight, labels, torch.float32, **kw)
    assert not torch.allclose(fp32[0], ours[0], rtol=1e-5, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_under_bf16_autocast():
    hidden, weight, labels = make_inputs(seed=15)
    kw = dict(softcap=5.0, chunk_size=32)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ours = run(linear_cross_entropy, hidden.cuda(), weight.cuda(), labels.cuda(), torch.float32, **kw)
        ref = run(linear_cross_entropy_ref, hidden.cuda(), weight.cuda(), labels.cuda(), torch.float32, **kw)
    gold = run(linear_cross_entropy_ref, *gold_bits(hidden, weight, torch.bfloat16), labels, torch.float64, **kw)
    assert_no_worse([t.cpu() for t in ours], [t.cpu() for t in ref], gold)


def test_mixed_dtypes_compute_in_weight_dtype():
    hidden, weight, labels = make_inputs(seed=10, n=50)
    h = hidden.bfloat16().requires_grad_()
    w = weight.clone().requires_grad_()
    loss = linear_cross_entropy(h, w, labels, chunk_size=8)
    loss.backward()
    h_ref = hidden.bfloat16().requires_grad_()
    w_ref = weight.clone().requires_grad_()
    loss_ref = linear_cross_entropy_ref(h_ref, w_ref, labels)
    loss_ref.backward()
    torch.testing.assert_close(loss, loss_ref)
    assert h.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32
    torch.testing.assert_close(h.grad, h_ref.grad)
    torch.testing.assert_close(w.grad, w_ref.grad)


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op returns (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.max_numel = max(self.max_numel, t.numel())
        return out


def test_never_materialises_full_logits():
    g = torch.Generator().manual_seed(11)
    n, h, v, chunk = 255, 8, 1003, 16  # H small so weight (V, H) and its grad are smaller than one chunk's logits
    hidden = torch.randn(n, h, generator=g, requires_grad=True)
    weight = torch.randn(v, h, generator=g, requires_grad=True)
    labels = torch.randint(0, v, (n,), generator=g)
    for fn, bounded in ((linear_cross_entropy, True), (linear_cross_entropy_ref, False)):
        with LargestTensor() as probe:
            fn(hidden, weight, labels, softcap=5.0, chunk_size=chunk).backward()
        # the reference builds (N, V) logits, so the probe does see logits; ours stays at one chunk
        assert (probe.max_numel <= chunk * v) == bounded, (fn.__name__, probe.max_numel)


def test_saves_no_logits_for_backward():
    hidden, weight, labels = make_inputs(seed=12)
    hidden.requires_grad_()
    weight.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        linear_cross_entropy(hidden, weight, labels, chunk_size=32)
    assert max(saved) <= V * H  # inputs and per-token vectors only: no (chunk, V) logits


def test_default_chunk_size():
    assert _default_chunk_size(262_144) == DEFAULT_CHUNK_BYTES // (262_144 * 4) == 256
    assert _default_chunk_size(10**12) == 1


@pytest.mark.parametrize(
    "kwargs, message",
    [(dict(reduction="avg"), "reduction"), (dict(softcap=0.0), "softcap"), (dict(chunk_size=0), "chunk_size")],
)
def test_bad_arguments(kwargs, message):
    hidden, weight, labels = make_inputs(n=4)
    with pytest.raises(ValueError, match=message):
        linear_cross_entropy(hidden, weight, labels, **kwargs)
    with pytest.raises(ValueError, match="shift"):
        linear_cross_entropy(hidden, weight, labels[:3])
