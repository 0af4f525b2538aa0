"""Chunked LM-head cross-entropy: the loss of ``hidden @ W.T`` without the whole (N, V) logits.

With Gemma's 262,144-token vocabulary the logits of 2 x 1024 tokens take 2 GiB in fp32, and autograd keeps
them (and their softmax) alive through backward. Here only the tokens that carry a label are projected, and
backward recomputes logits from ``hidden`` and the head instead of saving them. Two loops, one per kind of head:

- **Float head** (``weight`` (V, H), which may need a gradient): a chunk of labelled tokens at a time, each
  chunk's logits spanning the whole vocabulary; the weight gradient is summed across chunks in fp32 and cast
  to ``weight.dtype`` once at the end. Backward holds two (chunk, V) fp32 buffers: the upcast logits and their
  gradient. Measured on CPU, fp32, 512 tokens, vocab 262,144, hidden 640, frozen weight: 535 MiB peak RSS
  above the inputs against 2,065 MiB for the full-logits reference.
- **Frozen row-wise int8 head** (``weight`` (V, H) int8 and ``weight_scale`` (V,), W = weight * weight_scale[:, None],
  the format of ``gemma_lowmem_kernels.int8_embedding``): a block of vocabulary rows at a time for all labelled
  tokens at once, with an online log-sum-exp across blocks. The token loop would re-read the whole head per chunk, and
  here each read is a dequantization (~0.5 s for 262k x 2048 on a 2-core CPU); the vocabulary loop dequantizes
  each block once per pass (forward, backward), so no float copy of the whole head ever exists. The blocks
  are dequantized on ``hidden``'s device, so the int8 table may stay on the CPU. Backward sums the hidden
  gradient across blocks in fp32. There is no weight gradient: the head is frozen. Measured on CPU, fp32,
  1 thread, 2048 labelled tokens, vocab 262,144, hidden 2048, softcap 30: 446 MiB peak RSS above the inputs
  (0.5 GiB int8 head) against 556 MiB above the inputs for the float path with the fp32 head (2 GiB).

Precision: the matmuls run in the compute dtype (the autocast dtype when autocast is on for ``hidden``'s device,
as ``F.linear`` would use; else ``weight.dtype`` for a float head and ``hidden.dtype`` for an int8 head); the
softcap, log-softmax and loss run in fp32 (fp64 stays fp64) on upcast logits; the running log-sum-exp across
vocabulary blocks, an (M,) vector, is kept in fp64. An int8 block is dequantized in fp32 (fp64 scales stay fp64)
and rounded to the compute dtype once, exactly as the reference does it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

REDUCTIONS = ("sum", "mean", "none")
# When chunk_size is None: one chunk's fp32 logits, or one int8 block's fp32 logits and dequantized weights
# together, are at most this large.
DEFAULT_CHUNK_BYTES = 256 * 2**20


def _default_chunk_size(vocab_size: int) -> int:
    """Labelled tokens per chunk of the float-head loop: (chunk, V) fp32 logits under DEFAULT_CHUNK_BYTES."""
    return max(1, DEFAULT_CHUNK_BYTES // (vocab_size * 4))


def _default_block_rows(vocab_size: int, num_rows: int, hidden_size: int) -> int:
    """Vocabulary rows per block of the int8-head loop.

    The block's fp32 logits (M, rows) and its fp32 dequantized weights (rows, H) together stay under
    DEFAULT_CHUNK_BYTES (so a few labelled tokens never dequantize the whole head at once), and the blocks are of
    equal size so that the last one is not a sliver (262,400 rows in blocks of 16,384 would end in one of 256).
    """
    cap = max(1, DEFAULT_CHUNK_BYTES // (4 * (num_rows + hidden_size)))
    num_blocks = -(-vocab_size // cap)
    return -(-vocab_size // num_blocks)


def _compute_dtype(hidden: torch.Tensor, default: torch.dtype) -> torch.dtype:
    """The matmul dtype: autocast's when it is on for hidden's device (what F.linear would use), else ``default``."""
    device_type = hidden.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return default


def _check_args(hidden: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor | None, labels: torch.Tensor,
                softcap: float | None, chunk_size: int | None, reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r}: use one of {REDUCTIONS}")
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)}: weight must be "
                         "(vocab, hidden) with the same hidden size as the last dim of hidden")
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"labels {tuple(labels.shape)} must have the leading shape of hidden "
                         f"{tuple(hidden.shape)}; shift the labels before calling (label i is the target of hidden i)")
    if softcap is not None and softcap <= 0:
        raise ValueError(f"softcap={softcap}: must be positive, or None for no softcap")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size}: must be >= 1, or None for the default")
    if weight_scale is None:
        if not weight.is_floating_point():
            raise ValueError(f"weight is {weight.dtype}: pass weight_scale (its (V,) row scales) for an int8 "
                             "head, or a float weight")
        return
    if weight.dtype != torch.int8:
        raise ValueError(f"weight_scale is given but weight is {weight.dtype}: the scaled head must be int8 "
                         "(gemma_lowmem_kernels.int8_embedding.quantize_rows); pass weight_scale=None for a float head")
    if weight_scale.shape != weight.shape[:1] or not weight_scale.is_floating_point():
        raise ValueError(f"weight_scale {tuple(weight_scale.shape)} {weight_scale.dtype}: must be a float tensor "
                         f"of shape ({weight.shape[0]},), one scale per row of weight")
    if weight_scale.requires_grad:
        raise ValueError("weight_scale requires grad, but the int8 head is frozen and gets no gradient; "
                         "pass weight_scale.detach(), or a float weight to train the head")


def _dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(B, H) int8 rows and their (B,) scales -> (B, H) ``q * scale`` in ``dtype`` on ``device``.

    Only the int8 block travels between devices (1 byte per element); the product is taken in fp32 (fp64 scales
    stay fp64) and rounded to ``dtype`` once.
    """
    q, scale = q.to(device), scale.to(device)
    w = q.to(torch.promote_types(scale.dtype, torch.float32)).mul_(scale[:, None])  # (B, H)
    return w.to(dtype)


def _chunk_logits(h: torch.Tensor, w: torch.Tensor, softcap: float | None, acc_dtype: torch.dtype) -> torch.Tensor:
    """(C, H) x (B, H) -> (C, B) softcapped logits in ``acc_dtype``; the matmul runs in the operands' dtype."""
    logits = torch.mm(h, w.t()).to(acc_dtype)  # (C, B)
    if softcap is not None:
        # Gemma's final-logit softcap: softcap * tanh(logits / softcap), in place on the fresh chunk
        logits = logits.div_(softcap).tanh_().mul_(softcap)
    return logits


def _logits_grad(h: torch.Tensor, w: torch.Tensor, lse: torch.Tensor, cols: torch.Tensor, hit: torch.Tensor,
                 row_scale: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """Recompute (C, B) logits and return d loss / d (uncapped) logits in the compute dtype ``h.dtype``.

    Args:
        h, w: (C, H) rows and (B, H) head rows (the whole head, or one vocabulary block), compute dtype.
        lse: (C,) log-sum-exp of each row's capped logits over the whole vocabulary, fp32 or fp64.
        cols: (C,) column of each row's target within ``w`` (any valid column where ``hit`` is False).
        hit: (C,) bool, whether the row's target is one of ``w``'s rows.
        row_scale: (C,) incoming gradient of each row's loss, in ``lse``'s dtype.
        softcap: as in :func:`linear_cross_entropy`.

    Returns:
        (C, B) ``(softmax - onehot) * row_scale * d capped / d logits``, in ``h.dtype``.
    """
    logits = torch.mm(h, w.t()).to(lse.dtype)  # (C, B), recomputed instead of saved
    if softcap is None:
        grad = logits.sub_(lse[:, None]).exp_()  # softmax, in place
    else:
        tanh = logits.div_(softcap).tanh_()
        grad = torch.mul(tanh, softcap).sub_(lse[:, None]).exp_()  # softmax of the capped logits
    grad.scatter_add_(1, cols[:, None], hit[:, None].to(grad.dtype).neg_())  # - onehot(target)
    grad.mul_(row_scale[:, None])
    if softcap is not None:
        grad.mul_(tanh.square_().neg_().add_(1))  # d softcap*tanh(x/softcap) / dx = 1 - tanh^2
    return grad.to(h.dtype)


def _block_targets(targets: torch.Tensor, start: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(M,) vocabulary ids -> their (M,) columns in the block [start, start + size) (clamped) and (M,) in-block mask."""
    hit = (targets >= start) & (targets < start + size)
    return (targets - start).clamp_(0, size - 1), hit


def _token_chunks_forward(hidden: torch.Tensor, weight: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor,
                          softcap: float | None, chunk_size: int, compute_dtype: torch.dtype,
                          acc_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Float head: (M,) log-sum-exp and target logits, a chunk of labelled tokens (all V columns) at a time."""
    num_rows = rows.numel()
    w = weight.to(compute_dtype)  # a no-op unless autocast picked another dtype
    lse = torch.empty(num_rows, dtype=acc_dtype, device=hidden.device)  # (M,)
    target_logits = torch.empty(num_rows, dtype=acc_dtype, device=hidden.device)  # (M,)
    for start in range(0, num_rows, chunk_size):
        end = min(start + chunk_size, num_rows)
        h = hidden.index_select(0, rows[start:end]).to(compute_dtype)  # (C, H)
        logits = _chunk_logits(h, w, softcap, acc_dtype)  # (C, V)
        lse[start:end] = torch.logsumexp(logits, dim=-1)
        target_logits[start:end] = logits.gather(1, targets[start:end, None]).squeeze(1)
        del logits  # the next chunk's logits must not coexist with this one's
    return lse, target_logits


def _token_chunks_backward(weight: torch.Tensor, hidden: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor,
                           lse: torch.Tensor, row_scale: torch.Tensor, softcap: float | None, chunk_size: int,
                           compute_dtype: torch.dtype, need_hidden: bool,
                           need_weight: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Float head: gradients of hidden (N, H) and weight (V, H), recomputing one chunk's logits at a time."""
    num_rows = rows.numel()
    w = weight.to(compute_dtype)
    grad_hidden = torch.zeros_like(hidden) if need_hidden else None  # ignored rows keep 0
    # fp32 accumulator so that the per-chunk sums do not round to bf16 one after another
    grad_weight = torch.zeros(weight.shape, dtype=lse.dtype, device=weight.device) if need_weight else None
    for start in range(0, num_rows, chunk_size):
        end = min(start + chunk_size, num_rows)
        h = hidden.index_select(0, rows[start:end]).to(compute_dtype)  # (C, H)
        hit = torch.ones(end - start, dtype=torch.bool, device=h.device)  # every target is among the V columns
        grad = _logits_grad(h, w, lse[start:end], targets[start:end], hit, row_scale[start:end], softcap)  # (C, V)
        if need_hidden:
            grad_hidden.index_copy_(0, rows[start:end], torch.mm(grad, w).to(hidden.dtype))
        if need_weight:
            if grad.dtype == grad_weight.dtype:
                grad_weight.addmm_(grad.t(), h)  # no (V, H) temporary when the dtypes agree
            else:
                grad_weight += torch.mm(grad.t(), h)  # (V, H) in the compute dtype
        del grad  # the next chunk's gradient must not coexist with this one's
    return grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype)


def _vocab_blocks_forward(hidden: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, rows: torch.Tensor,
                          targets: torch.Tensor, softcap: float | None, block_rows: int, compute_dtype: torch.dtype,
                          acc_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Int8 head: (M,) log-sum-exp and target logits, a block of vocabulary rows (all M tokens) at a time."""
    num_rows = rows.numel()
    # (M,) running log-sum-exp in fp64: in fp32, the rounding of one logaddexp per block (~1e-7 x |lse|) would
    # add up over many small blocks to more than the reference's own error
    lse = torch.full((num_rows,), float("-inf"), dtype=torch.float64, device=hidden.device)
    target_logits = torch.zeros(num_rows, dtype=acc_dtype, device=hidden.device)  # (M,)
    if num_rows == 0:
        return lse.to(acc_dtype), target_logits  # nothing to dequantize
    h = hidden.index_select(0, rows).to(compute_dtype)  # (M, H)
    for start in range(0, weight.shape[0], block_rows):
        w = _dequantize(weight[start:start + block_rows], weight_scale[start:start + block_rows], compute_dtype,
                        hidden.device)  # (B, H)
        logits = _chunk_logits(h, w, softcap, acc_dtype)  # (M, B)
        # online log-sum-exp: log(sum over earlier blocks + sum over this one)
        torch.logaddexp(lse, torch.logsumexp(logits, dim=-1).double(), out=lse)
        cols, hit = _block_targets(targets, start, w.shape[0])
        target_logits += torch.where(hit, logits.gather(1, cols[:, None]).squeeze(1), 0)
        del w, logits  # the next block must not coexist with this one
    return lse.to(acc_dtype), target_logits


def _vocab_blocks_backward(weight: torch.Tensor, weight_scale: torch.Tensor, hidden: torch.Tensor, rows: torch.Tensor,
                           targets: torch.Tensor, lse: torch.Tensor, row_scale: torch.Tensor, softcap: float | None,
                           block_rows: int, compute_dtype: torch.dtype) -> torch.Tensor:
    """Int8 head: gradient of hidden (N, H), recomputing one block's logits (and dequantizing it) at a time."""
    grad_hidden = torch.zeros_like(hidden)  # ignored rows keep 0
    if rows.numel() == 0:
        return grad_hidden
    h = hidden.index_select(0, rows).to(compute_dtype)  # (M, H)
    # fp32 accumulator so that the per-block sums do not round to bf16 one after another
    grad_h = torch.zeros(h.shape, dtype=lse.dtype, device=h.device)  # (M, H)
    for start in range(0, weight.shape[0], block_rows):
        w = _dequantize(weight[start:start + block_rows], weight_scale[start:start + block_rows], compute_dtype,
                        hidden.device)  # (B, H)
        cols, hit = _block_targets(targets, start, w.shape[0])
        grad = _logits_grad(h, w, lse, cols, hit, row_scale, softcap)  # (M, B)
        if grad.dtype == grad_h.dtype:
            grad_h.addmm_(grad, w)
        else:
            grad_h += torch.mm(grad, w)  # (M, H) in the compute dtype
        del w, grad  # the next block must not coexist with this one
    return grad_hidden.index_copy_(0, rows, grad_h.to(hidden.dtype))


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Chunked ``cross_entropy(hidden @ W.T)`` over the labelled rows; see :func:`linear_cross_entropy`."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor | None,
                labels: torch.Tensor, ignore_index: int, softcap: float | None, chunk_size: int | None,
                reduction: str, compute_dtype: torch.dtype) -> torch.Tensor:
        # hidden (N, H), weight (V, H), weight_scale (V,) or None, labels (N,)
        acc_dtype = torch.promote_types(compute_dtype, torch.float32)
        with torch.autocast(hidden.device.type, enabled=False):
            # host sync: both loops need the number of labelled rows M
            rows = (labels != ignore_index).nonzero().squeeze(1)  # (M,)
            targets = labels.index_select(0, rows)  # (M,)
            num_rows = rows.numel()
            if weight_scale is None:
                chunk_size = chunk_size or _default_chunk_size(weight.shape[0])
                lse, target_logits = _token_chunks_forward(hidden, weight, rows, targets, softcap, chunk_size,
                                                           compute_dtype, acc_dtype)
            else:
                chunk_size = chunk_size or _default_block_rows(weight.shape[0], num_rows, weight.shape[1])
                lse, target_logits = _vocab_blocks_forward(hidden, weight, weight_scale, rows, targets, softcap,
                                                           chunk_size, compute_dtype, acc_dtype)
            losses = lse - target_logits  # (M,)
        ctx.save_for_backward(hidden, weight, weight_scale, rows, targets, lse)
        ctx.softcap, ctx.chunk_size, ctx.reduction, ctx.compute_dtype = softcap, chunk_size, reduction, compute_dtype
        if reduction == "none":
            return losses.new_zeros(labels.shape).index_copy_(0, rows, losses)  # (N,), 0 where ignored
        total = losses.sum()
        return total / max(num_rows, 1) if reduction == "mean" else total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        hidden, weight, weight_scale, rows, targets, lse = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        num_rows = rows.numel()
        with torch.autocast(hidden.device.type, enabled=False):
            # dloss_i/dlogits_i is scaled by g_i: the incoming grad of token i's loss, (M,)
            if ctx.reduction == "none":
                row_scale = grad_out.index_select(0, rows).to(lse.dtype)
            else:
                row_scale = grad_out.to(lse.dtype) / (max(num_rows, 1) if ctx.reduction == "mean" else 1)
                row_scale = row_scale.expand(num_rows)
            args = (hidden, rows, targets, lse, row_scale, ctx.softcap, ctx.chunk_size, ctx.compute_dtype)
            if weight_scale is None:
                grad_hidden, grad_weight = _token_chunks_backward(weight, *args, need_hidden, need_weight)
            else:
                grad_hidden, grad_weight = _vocab_blocks_backward(weight, weight_scale, *args), None
        return grad_hidden, grad_weight, None, None, None, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                         weight_scale: torch.Tensor | None = None, ignore_index: int = -100,
                         softcap: float | None = None, chunk_size: int | None = None,
                         reduction: str = "sum") -> torch.Tensor:
    """Cross-entropy of ``hidden @ W.T`` against ``labels`` without materialising the (N, V) logits.

    Args:
        hidden: (N, H) or (B, T, H) final hidden states (after the final norm).
        weight: (V, H) LM head or tied embedding: float (W = weight; it gets a gradient only if it requires
            one), or int8 with ``weight_scale`` (frozen).
        labels: (N,) or (B, T) targets already aligned with ``hidden`` (the caller shifts: label i is the
            target of hidden i); ``ignore_index`` marks tokens without a loss.
        weight_scale: (V,) float row scales of an int8 ``weight`` (W = weight * weight_scale[:, None], as
            ``gemma_lowmem_kernels.int8_embedding.quantize_rows`` and ``Int8Embedding``'s ``q`` and ``scale`` store
            it); it must not require grad. None for a float head.
        ignore_index: label value that contributes no loss and no gradient.
        softcap: Gemma's final-logit softcap (``softcap * tanh(logits / softcap)``); None for none.
        chunk_size: float head: labelled tokens per chunk, None keeping one chunk's fp32 logits under 256 MiB.
            Int8 head: vocabulary rows per block, None keeping one block's fp32 logits and dequantized
            weights together under 256 MiB.
        reduction: "sum" over labelled tokens (divide by the accumulation window's token count yourself),
            "mean" over labelled tokens (0 when there are none), or "none" for per-token losses of the
            labels' shape (0 where ignored; sum them per sequence for sequence log-probabilities).

    Returns:
        The loss in fp32 (fp64 for fp64 inputs): a scalar, or the labels' shape for reduction "none".
    """
    _check_args(hidden, weight, weight_scale, labels, softcap, chunk_size, reduction)
    compute_dtype = _compute_dtype(hidden, weight.dtype if weight_scale is None else hidden.dtype)
    loss = LinearCrossEntropyFunction.apply(
        hidden.reshape(-1, hidden.shape[-1]), weight, weight_scale, labels.reshape(-1), ignore_index, softcap,
        chunk_size, reduction, compute_dtype,
    )
    return loss.view(labels.shape) if reduction == "none" else loss


def linear_cross_entropy_ref(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                             weight_scale: torch.Tensor | None = None, ignore_index: int = -100,
                             softcap: float | None = None, chunk_size: int | None = None,
                             reduction: str = "sum") -> torch.Tensor:
    """Specification of :func:`linear_cross_entropy`: full logits and ``F.cross_entropy``, autograd for gradients.

    An int8 head is dequantized whole (to ``hidden``'s dtype, as :func:`linear_cross_entropy` does a block at a time).

    Args:
        hidden, weight, labels, weight_scale, ignore_index, softcap, reduction: as in :func:`linear_cross_entropy`.
        chunk_size: accepted for signature parity and ignored.

    Returns:
        The same loss as :func:`linear_cross_entropy`.
    """
    _check_args(hidden, weight, weight_scale, labels, softcap, chunk_size, reduction)
    if weight_scale is not None:
        weight = _dequantize(weight, weight_scale, hidden.dtype, hidden.device)  # (V, H)
    logits = hidden.reshape(-1, hidden.shape[-1]).to(weight.dtype) @ weight.t()  # (N, V)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    losses = F.cross_entropy(logits, labels.reshape(-1), ignore_index=ignore_index, reduction="none")  # (N,)
    if reduction == "none":
        return losses.view(labels.shape)
    if reduction == "mean":
        return losses.sum() / (labels != ignore_index).sum().clamp_min(1)
    return losses.sum()
