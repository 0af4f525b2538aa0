"""Chunked linear cross-entropy against its full-logits reference: values, every gradient, dtypes, odd shapes.

Float heads (token-chunk loop) first, then frozen row-wise int8 heads (vocabulary-block loop).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from gemma_lowmem_kernels.int8_embedding import quantize_rows
from gemma_lowmem_kernels.linear_cross_entropy import (
    DEFAULT_CHUNK_BYTES,
    _default_block_rows,
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

    ``ours``, ``ref`` and ``gold`` are (loss, grad hidden[, grad weight]). The floor of 1e-5 x max|gold| absorbs
    fp32 summation-order noise, where the reference can be exact by luck.
    """
    names = ("loss", "grad hidden", "grad weight")[:len(gold)]
    for name, o, r, g in zip(names, ours, ref, gold, strict=True):
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
    """Records the largest number of elements of any tensor an op returns (forward and backward).

    Also counts ``dequantized``: the int8 elements read by ops that return a float tensor (the int8 -> float
    conversions of a quantized head), and ``max_float_numel``, the largest float tensor returned.
    """

    def __init__(self):
        super().__init__()
        self.max_numel = 0
        self.max_float_numel = 0
        self.dequantized = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = [t for t in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(t, torch.Tensor)]
        for t in outs:
            self.max_numel = max(self.max_numel, t.numel())
            if t.is_floating_point():
                self.max_float_numel = max(self.max_float_numel, t.numel())
        if any(t.is_floating_point() for t in outs):
            inputs = [*args, *(kwargs or {}).values()]
            self.dequantized += sum(t.numel() for t in inputs if isinstance(t, torch.Tensor) and t.dtype == torch.int8)
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


# ---------------------------------------------------------------- frozen row-wise int8 head (vocabulary blocks)


def make_int8_inputs(seed: int = 0, n: int = N, ignored: float = 0.3, shape: tuple[int, ...] | None = None):
    """fp32 hidden, the int8 head ``q`` (V, H) and its fp32 ``scale`` (V,) from ``quantize_rows``, labels."""
    hidden, weight, labels = make_inputs(seed, n, ignored, shape)
    return hidden, *quantize_rows(weight), labels


def run_int8(fn, hidden, q, scale, labels, dtype, upstream=None, **kw):
    """Loss and the hidden gradient of ``fn`` with the int8 head, hidden cast to ``dtype``."""
    h = hidden.to(dtype).clone().requires_grad_()
    loss = fn(h, q, labels, weight_scale=scale, **kw)
    (loss if upstream is None else (loss * upstream).sum()).backward()
    return loss.detach(), h.grad


def int8_gold(hidden, q, scale, labels, dtype, **kw):
    """The reference in fp64 on hidden rounded to ``dtype`` and the exact head q * scale."""
    return run_int8(linear_cross_entropy_ref, hidden.to(dtype).double(), q, scale.double(), labels, torch.float64, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("block", [1, 7, None])
def test_int8_matches_reference(dtype, softcap, block):
    """Block 1 sums 1003 per-block hidden gradients: in bf16 that sum would be far worse than the reference."""
    hidden, q, scale, labels = make_int8_inputs(seed=20)
    kw = dict(softcap=softcap, chunk_size=block)
    ours = run_int8(linear_cross_entropy, hidden, q, scale, labels, dtype, **kw)
    ref = run_int8(linear_cross_entropy_ref, hidden, q, scale, labels, dtype, **kw)
    assert ours[0].dtype == torch.float32 and ours[1].dtype == dtype
    assert_no_worse(ours, ref, int8_gold(hidden, q, scale, labels, dtype, **kw))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_int8_reductions_3d(dtype, reduction):
    hidden, q, scale, labels = make_int8_inputs(seed=21, shape=(3, 85))
    upstream = torch.randn(3, 85, generator=torch.Generator().manual_seed(22)) if reduction == "none" else None
    kw = dict(softcap=5.0, chunk_size=7, reduction=reduction, upstream=upstream)
    ours = run_int8(linear_cross_entropy, hidden, q, scale, labels, dtype, **kw)
    ref = run_int8(linear_cross_entropy_ref, hidden, q, scale, labels, dtype, **kw)
    assert_no_worse(ours, ref, int8_gold(hidden, q, scale, labels, dtype, **kw))
    if reduction == "none":
        assert ours[0].shape == labels.shape
        assert torch.all(ours[0][labels == -100] == 0) and torch.all(ours[0][labels != -100] > 0)
        assert torch.all(ours[1][labels == -100] == 0)


def test_int8_is_the_dequantized_float_head():
    """The same loss as the float head it was quantized from, up to quantization error: the scales are per row."""
    hidden, weight, labels = make_inputs(seed=23)
    q, scale = quantize_rows(weight)
    float_loss = linear_cross_entropy(hidden, weight, labels, softcap=5.0, reduction="none")
    int8_loss = linear_cross_entropy(hidden, q, labels, weight_scale=scale, softcap=5.0, reduction="none")
    torch.testing.assert_close(int8_loss, float_loss, rtol=0.02, atol=0.02)


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_int8_all_ignored(reduction):
    hidden, q, scale, labels = make_int8_inputs(seed=24, n=10, ignored=1.0)
    with LargestTensor() as probe:
        loss, grad_hidden = run_int8(linear_cross_entropy, hidden, q, scale, labels, torch.float32,
                                     reduction=reduction, upstream=torch.ones(10) if reduction == "none" else None)
    assert torch.all(loss == 0) and not torch.isnan(loss).any()
    assert grad_hidden is not None and torch.all(grad_hidden == 0)
    assert probe.dequantized == 0  # no labelled token: the head is never read


@pytest.mark.parametrize("softcap", [None, 2.0])
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_int8_gradcheck_fp64(softcap, reduction):
    g = torch.Generator().manual_seed(25)
    hidden = torch.randn(9, 5, generator=g, dtype=torch.float64, requires_grad=True)
    q, scale = quantize_rows(torch.randn(11, 5, generator=g))
    labels = torch.randint(0, 11, (9,), generator=g)
    labels[[1, 4]] = -100

    def fn(h):
        return linear_cross_entropy(h, q, labels, weight_scale=scale.double(), softcap=softcap, chunk_size=4,
                                    reduction=reduction)

    assert torch.autograd.gradcheck(fn, (hidden,))


def test_int8_under_cpu_bf16_autocast():
    """fp32 hidden under autocast: the blocks are dequantized to bf16 and the matmuls run in bf16."""
    hidden, q, scale, labels = make_int8_inputs(seed=26)
    kw = dict(softcap=5.0, chunk_size=100)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = run_int8(linear_cross_entropy, hidden, q, scale, labels, torch.float32, **kw)
        ref = run_int8(linear_cross_entropy_ref, hidden, q, scale, labels, torch.float32, **kw)
    assert ours[0].dtype == torch.float32 and ours[1].dtype == torch.float32
    assert_no_worse(ours, ref, int8_gold(hidden, q, scale, labels, torch.bfloat16, **kw))
    # autocast really changed the arithmetic: the fp32 gradient differs by bf16-sized amounts
    fp32 = run_int8(linear_cross_entropy, hidden, q, scale, labels, torch.float32, **kw)
    assert not torch.allclose(fp32[1], ours[1], rtol=1e-3, atol=0)


def test_int8_memory_and_dequantization_count():
    """One block of logits at most, never a float head, and each int8 element converted once per pass."""
    g = torch.Generator().manual_seed(27)
    n, h, v, block = 255, 8, 1003, 16  # V x H = 8,024 floats: more than one block of logits (255 x 16)
    hidden = torch.randn(n, h, generator=g, requires_grad=True)
    q, scale = quantize_rows(torch.randn(v, h, generator=g))
    labels = torch.randint(0, v, (n,), generator=g)
    for fn, bounded in ((linear_cross_entropy, True), (linear_cross_entropy_ref, False)):
        with LargestTensor() as forward:
            loss = fn(hidden, q, labels, weight_scale=scale, softcap=5.0, chunk_size=block)
        with LargestTensor() as backward:
            loss.backward()
        largest = max(forward.max_float_numel, backward.max_float_numel)
        assert (largest <= n * block) == bounded, (fn.__name__, largest)
        assert (largest < v * h) == bounded, (fn.__name__, largest)
    # ours: exactly one dequantization of the whole head in each pass (the reference's is in forward only)
    assert forward.dequantized == v * h and backward.dequantized == 0
    with LargestTensor() as forward:
        loss = linear_cross_entropy(hidden, q, labels, weight_scale=scale, softcap=5.0, chunk_size=block)
    with LargestTensor() as backward:
        loss.backward()
    assert forward.dequantized == v * h and backward.dequantized == v * h


def test_default_block_rows():
    rows = _default_block_rows(262_400, 2048, 2048)  # Gemma 3n E2B: 17 equal blocks, not 16 and a sliver
    assert rows == 15_436 and rows * (2048 + 2048) * 4 <= DEFAULT_CHUNK_BYTES
    assert _default_block_rows(262_144, 10, 2048) == 29_128  # few tokens: the dequantized block sets the size
    assert _default_block_rows(1003, 255, 67) == 1003
    assert _default_block_rows(10, 10**12, 8) == 1


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda q, s: (q, s.clone().requires_grad_()), "frozen"),
        (lambda q, s: (q.float(), s), "int8"),
        (lambda q, s: (q, s[:-1]), "weight_scale"),
        (lambda q, s: (q, None), "weight_scale"),
    ],
)
def test_int8_bad_arguments(change, message):
    hidden, q, scale, labels = make_int8_inputs(n=4)
    weight, weight_scale = change(q, scale)
    for fn in (linear_cross_entropy, linear_cross_entropy_ref):
        with pytest.raises(ValueError, match=message):
            fn(hidden, weight, labels, weight_scale=weight_scale)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_hidden_with_int8_table_on_cpu():
    """The table may stay on the CPU (as Int8Embedding allows): blocks travel as int8 to hidden's device."""
    hidden, q, scale, labels = make_int8_inputs(seed=28)
    kw = dict(softcap=5.0, chunk_size=100)
    ours = run_int8(linear_cross_entropy, hidden.cuda(), q, scale, labels.cuda(), torch.float32, **kw)
    cpu = run_int8(linear_cross_entropy, hidden, q, scale, labels, torch.float32, **kw)
    for o, c in zip(ours, cpu, strict=True):
        torch.testing.assert_close(o.cpu(), c, rtol=1e-4, atol=1e-4)
