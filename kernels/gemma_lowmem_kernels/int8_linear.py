"""Frozen row-wise int8 linear layer whose backward needs only the weight, so it keeps no input alive.

bitsandbytes' CPU training path (``MatMul8bitFp``) stores its input as a plain attribute of the autograd node,
which gradient checkpointing cannot drop (checkpointing only intercepts ``save_for_backward``). Every int8
layer's input then lives through the whole step: +3.89 GiB on Gemma 3n E2B at 2048 tokens, as measured in this
project. A frozen weight needs no weight gradient, and the input gradient ``grad_out @ W`` needs no input, so
this function saves only the int8 weight and its row scales (both alive in the module anyway).

The weight is dequantized a block of output rows at a time (``W[rows] = q[rows] * scale[rows, None]`` in the
compute dtype), in both passes, so that its float copy never exists whole: a Gemma 3n 8192 x 2048 projection is
one block, a 262,144 x 2048 LM head is 32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gemma_lowmem_kernels.int8_embedding import DEFAULT_CHUNK_ELEMENTS


def matmul_dtype(x: torch.Tensor) -> torch.dtype:
    """The matmul dtype: autocast's when it is on for x's device and would cast x (as for F.linear), else x's."""
    device_type = x.device.type
    autocast_on = torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)
    # autocast casts floating inputs other than fp64
    if autocast_on and x.dtype != torch.float64:
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, *, transposed: bool = False) -> torch.Tensor:
    """(R, in) int8 rows and their (R,) scales -> the (R, in) weight rows in ``dtype``, or with ``transposed``
    their contiguous (in, R) transpose.

    int8 values are exact in every float dtype; the product is computed in the wider of ``dtype`` and the scale's
    dtype and then cast to ``dtype``, in place, so no fp32 copy of the block is made for a bf16 compute dtype.
    """
    if transposed:
        # transpose the 1-byte values, not the dequantized ones
        return q.t().contiguous().to(dtype).mul_(scale[None, :])  # (in, R)
    return q.to(dtype).mul_(scale[:, None])  # (R, in)


def _check_args(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                block_rows: int | None) -> None:
    if q.dtype != torch.int8 or q.dim() != 2:
        raise ValueError(f"q {tuple(q.shape)} {q.dtype}: must be the (out, in) int8 weight")
    out_features, in_features = q.shape
    if not x.is_floating_point() or x.shape[-1] != in_features:
        raise ValueError(f"x {tuple(x.shape)} {x.dtype}: must be a float tensor whose last dim is q's in_features "
                         f"{in_features}")
    if scale.shape != (out_features,) or not scale.is_floating_point():
        raise ValueError(f"scale {tuple(scale.shape)} {scale.dtype}: must be ({out_features},) float, one per row "
                         "of q (bitsandbytes' SCB is the row absmax: pass SCB / 127)")
    if scale.requires_grad:
        raise ValueError("scale requires grad: the int8 weight is frozen; pass scale.detach()")
    if bias is not None and bias.shape != (out_features,):
        raise ValueError(f"bias {tuple(bias.shape)}: must be ({out_features},) or None")
    if block_rows is not None and block_rows < 1:
        raise ValueError(f"block_rows={block_rows}: must be >= 1, or None for the default")


class Int8LinearFunction(torch.autograd.Function):
    """``x @ (q * scale[:, None]).T + bias`` with a frozen int8 weight; see :func:`int8_linear`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                block_rows: int, compute_dtype: torch.dtype) -> torch.Tensor:
        # x (N, in), q (out, in), scale (out,), bias (out,) or None
        out_features = q.shape[0]
        with torch.autocast(x.device.type, enabled=False):
            x_c = x.to(compute_dtype)  # a no-op unless autocast picked another dtype; not saved
            b = None if bias is None else bias.to(compute_dtype)
            if block_rows >= out_features:
                w = dequantize(q, scale, compute_dtype)  # (out, in)
                out = F.linear(x_c, w, b)  # (N, out)
            else:
                out = x_c.new_empty(x_c.shape[0], out_features)  # (N, out)
                for start in range(0, out_features, block_rows):
                    end = min(start + block_rows, out_features)
                    w = dequantize(q[start:end], scale[start:end], compute_dtype)  # (R, in)
                    out[:, start:end] = F.linear(x_c, w, None if b is None else b[start:end])  # (N, R)
                    del w  # the next block's weight must not coexist with this one's
        # only the frozen weight: x (or its cast copy) is what checkpointing must be able to drop
        ctx.save_for_backward(q, scale)
        ctx.block_rows, ctx.x_dtype = block_rows, x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        q, scale = ctx.saved_tensors
        need_x, need_bias = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
        out_features = q.shape[0]
        block_rows = ctx.block_rows
        grad_x = grad_bias = None
        # fp32 accumulation for 16-bit compute dtypes, so that the per-block sums do not round one after another
        acc_dtype = torch.promote_types(grad_out.dtype, torch.float32)
        with torch.autocast(grad_out.device.type, enabled=False):
            # grad_x = grad_out @ W is computed as F.linear(grad_out, W^T) with W^T contiguous: in bf16 on this
            # project's CPU a matmul whose right operand is the row-major (out, in) W measured 5-9x slower
            # ((512, 2560) @ (2560, 640)); the int8 transpose costs little next to it
            if need_x and block_rows >= out_features:
                grad_x = F.linear(grad_out, dequantize(q, scale, grad_out.dtype, transposed=True))  # (N, in)
            elif need_x:
                grad_x = grad_out.new_zeros(grad_out.shape[0], q.shape[1], dtype=acc_dtype)  # (N, in)
                for start in range(0, out_features, block_rows):
                    end = min(start + block_rows, out_features)
                    w_t = dequantize(q[start:end], scale[start:end], grad_out.dtype, transposed=True)  # (in, R)
                    if grad_out.dtype == acc_dtype:
                        grad_x.addmm_(grad_out[:, start:end], w_t.t())  # no (N, in) temporary when dtypes agree
                    else:
                        grad_x += F.linear(grad_out[:, start:end], w_t)  # (N, in) in the compute dtype
                    del w_t
            if need_x:
                grad_x = grad_x.to(ctx.x_dtype)
            if need_bias:
                grad_bias = grad_out.sum(0, dtype=acc_dtype).to(ctx.bias_dtype)  # (out,)
        return grad_x, None, None, grad_bias, None, None


def int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None, *,
                block_rows: int | None = None) -> torch.Tensor:
    """``F.linear(x, q * scale[:, None], bias)`` for a frozen int8 weight, saving no input for backward.

    Backward returns the input gradient (``grad_out @ W``, block-wise) and a bias gradient if ``bias`` requires
    one; ``q`` and ``scale`` get none.

    Args:
        x: (..., in) float input, any leading shape.
        q: (out, in) int8 row-wise quantized weight.
        scale: (out,) float row scales, ``W = q * scale[:, None]``. bitsandbytes' ``SCB`` is the row absmax,
            so for a ``Linear8bitLt`` pass ``q=module.weight.data`` (or ``state.CB``) and ``scale=SCB / 127``.
        bias: optional (out,) bias; cast to the compute dtype.
        block_rows: output rows dequantized at a time; None keeps each block's weight at most
            ``DEFAULT_CHUNK_ELEMENTS`` (2^24) elements, 64 MiB in fp32 (backward also holds its int8 transpose).

    Returns:
        (..., out) in the compute dtype: the autocast dtype when autocast is on for ``x``'s device (as
        ``F.linear`` would use; fp64 stays fp64), else ``x.dtype``.
    """
    _check_args(x, q, scale, bias, block_rows)
    block_rows = block_rows or max(1, DEFAULT_CHUNK_ELEMENTS // q.shape[1])
    out = Int8LinearFunction.apply(x.reshape(-1, x.shape[-1]), q, scale, bias, block_rows, matmul_dtype(x))
    return out.view(*x.shape[:-1], q.shape[0])


def int8_linear_ref(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """Specification of :func:`int8_linear`: dequantize the whole weight, then ``F.linear`` (autograd for gradients).

    Args:
        x, q, scale, bias: as in :func:`int8_linear`.

    Returns:
        The same (..., out) output as :func:`int8_linear`, in the same dtype.
    """
    w = q.to(torch.promote_types(scale.dtype, torch.float32)) * scale[:, None]  # (out, in)
    return F.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))
