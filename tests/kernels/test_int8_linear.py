"""Frozen int8 linear against its reference and bitsandbytes: values, gradients, blocks, autocast, what is saved."""

from __future__ import annotations

import gc
import importlib
import weakref

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from gemma_lowmem_kernels.int8_embedding import quantize_rows
from gemma_lowmem_kernels.int8_linear import int8_linear, int8_linear_ref

# `import kernels.int8_linear as ...` would bind the function that kernels/__init__.py exports under that name
int8_linear_module = importlib.import_module("gemma_lowmem_kernels.int8_linear")

IN, OUT, LEAD = 67, 1003, (3, 5)  # odd on purpose: no dimension is a power of two or a multiple of a block


def make_weight(seed: int = 0, out_features: int = OUT, in_features: int = IN):
    """Row-wise quantized (out, in) int8 weight, (out,) fp32 scales and a (out,) fp32 bias."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=g) * in_features**-0.5
    weight[3] = 0  # an all-zero row (scale 0)
    q, scale = quantize_rows(weight)
    return q, scale, torch.randn(out_features, generator=g) * 0.1


def make_input(seed: int = 1, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*LEAD, IN, generator=torch.Generator().manual_seed(seed)).to(dtype)


def run(fn, x, q, scale, bias, upstream, **kw):
    """Output and the (x, bias) gradients of ``fn`` on fresh leaves; bias is None, frozen or trainable."""
    x = x.clone().requires_grad_()
    out = fn(x, q, scale, bias, **kw)
    out.backward(upstream.to(out.dtype))
    return out.detach(), x.grad, None if bias is None else bias.grad


def gold_run(x, q, scale, bias, upstream, dtype):
    """fp64 output and gradients from the bits both implementations see: x, W, bias and upstream in ``dtype``."""
    w = (q.float() * scale[:, None]).to(dtype).double()  # (out, in), rounded as the kernel and reference round it
    x = x.to(dtype).double()
    g = upstream.to(dtype).double()
    out = x @ w.t() + (0 if bias is None else bias.to(dtype).double())
    return out, g @ w, g.reshape(-1, OUT).sum(0)


def assert_no_worse(name: str, ours: torch.Tensor, ref: torch.Tensor, gold: torch.Tensor, factor: float = 2.0):
    """Ours is within ``factor`` x the reference's own error against the fp64 gold (floor: fp32 summation noise)."""
    assert ours.dtype == ref.dtype and ours.shape == ref.shape, name
    ours_err = (ours.double() - gold).abs().max().item()
    ref_err = (ref.double() - gold).abs().max().item()
    floor = 1e-5 * gold.abs().max().item()
    assert ours_err <= factor * ref_err + floor, f"{name}: error {ours_err:.3g}, reference's {ref_err:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_rows", [1, 7, None])
@pytest.mark.parametrize("bias_mode", ["none", "frozen", "trainable"])
def test_matches_reference(dtype, block_rows, bias_mode):
    q, scale, bias = make_weight()
    bias = None if bias_mode == "none" else bias.to(dtype)
    x = make_input(dtype=dtype)
    upstream = torch.randn(*LEAD, OUT, generator=torch.Generator().manual_seed(2))

    def fresh_bias():
        return None if bias is None else bias.clone().requires_grad_(bias_mode == "trainable")

    ours = run(int8_linear, x, q, scale, fresh_bias(), upstream, block_rows=block_rows)
    ref = run(int8_linear_ref, x, q, scale, fresh_bias(), upstream)
    gold = gold_run(x, q, scale, bias, upstream, dtype)
    assert ours[0].dtype == dtype and ours[0].shape == (*LEAD, OUT)
    assert ours[1].dtype == dtype and ours[1].shape == x.shape
    assert_no_worse("output", ours[0], ref[0], gold[0])
    assert_no_worse("grad x", ours[1], ref[1], gold[1])
    if bias_mode == "trainable":
        assert ours[2].dtype == dtype
        assert_no_worse("grad bias", ours[2], ref[2], gold[2])
    else:
        assert ours[2] is None  # a frozen bias gets no gradient


@pytest.mark.parametrize("block_rows", [3, None])
def test_gradcheck_fp64(block_rows):
    q, scale, bias = make_weight(seed=3, out_features=11, in_features=5)
    x = torch.randn(2, 3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(4), requires_grad=True)
    bias = bias.double().requires_grad_()

    def fn(x, bias):
        return int8_linear(x, q, scale.double(), bias, block_rows=block_rows)

    assert torch.autograd.gradcheck(fn, (x, bias))


@pytest.mark.parametrize("block_rows", [None, 100])
def test_dequantizes_in_blocks_of_rows(monkeypatch, block_rows):
    """block_rows=None sizes blocks from DEFAULT_CHUNK_ELEMENTS; both passes walk every row once, block by block."""
    monkeypatch.setattr(int8_linear_module, "DEFAULT_CHUNK_ELEMENTS", 100 * IN)  # default blocks of 100 rows
    seen = []
    dequantize = int8_linear_module.dequantize

    def recording_dequantize(q, scale, dtype, *, transposed=False):
        seen.append((*q.shape, transposed))
        return dequantize(q, scale, dtype, transposed=transposed)

    monkeypatch.setattr(int8_linear_module, "dequantize", recording_dequantize)
    q, scale, bias = make_weight(seed=5)
    x = make_input(seed=6).requires_grad_()
    int8_linear(x, q, scale, bias, block_rows=block_rows).sum().backward()
    blocks = [(100, IN)] * (OUT // 100) + [(OUT % 100, IN)]
    assert seen == [(*b, False) for b in blocks] + [(*b, True) for b in blocks]  # forward, then backward


@pytest.mark.parametrize("bias_mode", ["none", "trainable"])
def test_autocast_bf16(bias_mode):
    """Under CPU autocast an fp32 input computes in bf16 (as F.linear does) and gets an fp32 gradient."""
    q, scale, bias = make_weight(seed=7)
    x = make_input(seed=8)
    upstream = torch.randn(*LEAD, OUT, generator=torch.Generator().manual_seed(9))

    def fresh_bias():
        return None if bias_mode == "none" else bias.clone().requires_grad_()

    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = run(int8_linear, x, q, scale, fresh_bias(), upstream, block_rows=7)
        ref = run(int8_linear_ref, x, q, scale, fresh_bias(), upstream)
    gold = gold_run(x, q, scale, None if bias_mode == "none" else bias, upstream, torch.bfloat16)
    assert ours[0].dtype == ref[0].dtype == torch.bfloat16
    assert ours[1].dtype == ref[1].dtype == torch.float32
    assert_no_worse("output", ours[0], ref[0], gold[0])
    assert_no_worse("grad x", ours[1], ref[1], gold[1])
    if bias_mode == "trainable":
        assert ours[2].dtype == ref[2].dtype == torch.float32
        assert_no_worse("grad bias", ours[2], ref[2], gold[2])


def test_autocast_leaves_fp64_alone():
    q, scale, _ = make_weight(seed=10)
    x = make_input(seed=11, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, ref = int8_linear(x, q, scale), int8_linear_ref(x, q, scale)
    assert ours.dtype == ref.dtype == torch.float64
    torch.testing.assert_close(ours, ref)


@pytest.mark.parametrize("autocast", [False, True])
def test_saves_only_the_weight(autocast):
    """What autograd packs is exactly q and scale: neither x nor its autocast copy."""
    q, scale, bias = make_weight(seed=12)
    x = make_input(seed=13).requires_grad_()
    packed = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        packed.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = int8_linear(x, q, scale, bias.requires_grad_())
    x_ptr = x.untyped_storage().data_ptr()
    assert all(t.untyped_storage().data_ptr() != x_ptr for t in packed)
    assert all(t.shape != (LEAD[0] * LEAD[1], IN) for t in packed)  # no (N, in) copy of x either
    assert sorted(t.data_ptr() for t in packed) == sorted([q.data_ptr(), scale.data_ptr()])
    out.sum().backward()
    assert x.grad is not None and bias.grad is not None


class StashInput(torch.autograd.Function):
    """Control: an identity that keeps its input as a ctx attribute, as bitsandbytes' MatMul8bitFp does."""

    @staticmethod
    def forward(ctx, x):
        ctx.x = x
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad


def input_outlives_forward(layer, use_checkpoint: bool) -> bool:
    """Whether the layer's input (an intermediate, not the caller's leaf) is still alive after the forward."""
    refs = []

    def block(x: torch.Tensor) -> torch.Tensor:
        h = x * 2  # (N, in) intermediate; mul by a constant saves nothing itself
        refs.append(weakref.ref(h))
        return layer(h)

    x = make_input(seed=14).requires_grad_()
    out = checkpoint(block, x, use_reentrant=False) if use_checkpoint else block(x)
    gc.collect()
    alive = refs[0]() is not None
    out.sum().backward()  # the graph still works (under checkpointing: after recomputation)
    assert x.grad is not None
    return alive


@pytest.mark.parametrize("use_checkpoint", [False, True])
def test_input_is_not_kept_alive(use_checkpoint):
    q, scale, bias = make_weight(seed=15)
    assert not input_outlives_forward(lambda h: int8_linear(h, q, scale, bias), use_checkpoint)
    # the detector sees an input kept as a ctx attribute, which checkpointing cannot drop
    assert input_outlives_forward(lambda h: StashInput.apply(h), use_checkpoint)


def test_checkpointed_gradient_is_unchanged():
    q, scale, bias = make_weight(seed=16)
    x = make_input(seed=17)

    def block(x: torch.Tensor) -> torch.Tensor:
        return int8_linear(torch.tanh(x), q, scale, bias, block_rows=7)

    plain = x.clone().requires_grad_()
    block(plain).square().sum().backward()
    ckpt = x.clone().requires_grad_()
    checkpoint(block, ckpt, use_reentrant=False).square().sum().backward()
    assert torch.equal(plain.grad, ckpt.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_bitsandbytes_linear8bitlt(dtype):
    bnb = pytest.importorskip("bitsandbytes")
    g = torch.Generator().manual_seed(18)
    module = bnb.nn.Linear8bitLt(IN, OUT, bias=True, has_fp16_weights=False, threshold=6.0)
    with torch.no_grad():
        module.weight.data.copy_(torch.randn(OUT, IN, generator=g) * IN**-0.5)
        module.bias.copy_(torch.randn(OUT, generator=g) * 0.1)
    module = module.to("cpu")  # quantizes: weight becomes the int8 CB, weight.SCB the row absmax
    module.train()  # bitsandbytes' CPU training path: dequantize + matmul
    assert module.weight.dtype == torch.int8
    # read now: the first forward moves CB and SCB into module.state and clears weight.SCB
    q, scale = module.weight.data.clone(), module.weight.SCB / 127
    bias = module.bias.detach().clone().to(dtype)
    x = make_input(seed=19, dtype=dtype)
    upstream = torch.randn(*LEAD, OUT, generator=g).to(dtype)

    x_bnb = x.clone().requires_grad_()
    out_bnb = module(x_bnb)
    out_bnb.backward(upstream)
    x_ours = x.clone().requires_grad_()
    out_ours = int8_linear(x_ours, q, scale, bias)
    out_ours.backward(upstream)

    assert out_ours.dtype == out_bnb.dtype == dtype
    # bitsandbytes scales by SCB * (1/127), here SCB / 127: a last-bit difference in a few weights
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(out_ours, out_bnb, rtol=2 * eps, atol=4 * eps * out_bnb.abs().max().item())
    torch.testing.assert_close(x_ours.grad, x_bnb.grad, rtol=2 * eps, atol=4 * eps * x_bnb.grad.abs().max().item())


def test_rejects_bad_arguments():
    q, scale, bias = make_weight(seed=20)
    x = make_input(seed=21)
    with pytest.raises(ValueError, match="int8"):
        int8_linear(x, q.float(), scale)
    with pytest.raises(ValueError, match="in_features 67"):
        int8_linear(x[..., :-1], q, scale)
    with pytest.raises(ValueError, match="SCB / 127"):
        int8_linear(x, q, scale[:-1])
    with pytest.raises(ValueError, match="frozen"):
        int8_linear(x, q, scale.clone().requires_grad_())
    with pytest.raises(ValueError, match="bias"):
        int8_linear(x, q, scale, bias[:-1])
    with pytest.raises(ValueError, match="block_rows=0"):
        int8_linear(x, q, scale, block_rows=0)
