"""Per-document packed attention against SDPA with the dense block-diagonal masks it replaces (values and all
gradients; odd lengths, documents longer than the window, pad tails, grouped-query heads), and its registration."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from gemma_lowmem.attention import (
    PACKED_SDPA,
    packed_sdpa,
    packed_sdpa_attention_forward,
    register,
)
from gemma_lowmem.data.packing import doc_ids, packed_attention_masks
from tests.tiny import tiny_gemma3
from tests.tolerance import assert_as_accurate

ROWS = [[13, 1, 22, 5], [31, 7]]  # row 1 has a 7-slot pad tail at T = 45; 1-token and longer-than-window documents
TOTAL = 45


def dense_reference(q, k, v, rows, window, scaling=None):
    """SDPA over the whole row with the (B, 1, T, T) boolean masks of packing.py; GQA by repeating key/value heads."""
    masks = packed_attention_masks(rows, q.shape[2], sliding_window=window, implementation="sdpa")
    mask = masks["sliding_attention" if window is not None else "full_attention"]
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling)


def qkv(heads: int, kv_heads: int, dim: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(len(ROWS), heads, TOTAL, dim), (len(ROWS), kv_heads, TOTAL, dim), (len(ROWS), kv_heads, TOTAL, dim)]
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype).requires_grad_() for s in shapes]


@pytest.mark.parametrize("window", [None, 6, 16, 64])  # 6 and 16 cut the longer documents; 64 cuts none
@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (6, 2)])
def test_matches_dense_masks_fp32(window: int | None, heads: int, kv_heads: int) -> None:
    q, k, v = qkv(heads, kv_heads, 24, torch.float32)
    seg = doc_ids(ROWS, TOTAL)
    ours = packed_sdpa(q, k, v, seg, sliding_window=window, scaling=0.3)
    ref = dense_reference(q, k, v, ROWS, window, scaling=0.3)
    gold_inputs = [t.detach().double().requires_grad_() for t in (q, k, v)]  # the same fp32 values
    gold = dense_reference(*gold_inputs, ROWS, window, scaling=0.3)
    # SDPA's CPU kernels block and sum differently per CPU: allow a small factor of the dense path's own fp32 error
    assert_as_accurate(ours, ref, gold, name="out")
    grad_out = torch.randn_like(ref)
    ours_grads = torch.autograd.grad(ours, (q, k, v), grad_out)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad_out)
    gold_grads = torch.autograd.grad(gold, gold_inputs, grad_out.double())
    for name, g_ours, g_ref, g_gold in zip("qkv", ours_grads, ref_grads, gold_grads):
        assert g_ref.abs().max() > 0, name
        assert_as_accurate(g_ours, g_ref, g_gold, name=f"grad {name}")


def test_bf16_error_within_dense_bf16_error() -> None:
    """In bf16 both are compared to an fp64 reference: ours may not be much worse than the dense path."""
    q, k, v = qkv(6, 2, 16, torch.float64, seed=1)
    truth = dense_reference(q, k, v, ROWS, 6)
    low = [t.detach().bfloat16() for t in (q, k, v)]
    ours = packed_sdpa(*low, doc_ids(ROWS, TOTAL), sliding_window=6).double()
    dense = dense_reference(*low, ROWS, 6).double()
    dense_err = (dense - truth).abs().max()
    assert dense_err > 0
    assert (ours - truth).abs().max() <= 2 * dense_err + 1e-3


def test_gradcheck_fp64() -> None:
    rows, total = [[3, 5], [4]], 9  # row 1 has a 5-slot pad tail; window 2 cuts every document but the first
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(2, 4, total, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, 2, total, 3, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    seg = doc_ids(rows, total)
    assert torch.autograd.gradcheck(lambda q, k, v: packed_sdpa(q, k, v, seg, sliding_window=2), (q, k, v))


def test_pad_tail_sees_the_row_and_no_real_token_sees_pads() -> None:
    q, k, v = (t.detach() for t in qkv(4, 4, 8, torch.float32))
    seg = doc_ids(ROWS, TOTAL)
    out = packed_sdpa(q, k, v, seg)
    changed_v = v.clone()
    changed_v[1, :, 38:] += 100.0  # the pad tail's values
    changed = packed_sdpa(q, k, changed_v, seg)
    torch.testing.assert_close(changed[:, :, :38], out[:, :, :38], atol=0, rtol=0)  # real tokens: unchanged
    changed_v = v.clone()
    changed_v[1, :, :38] += 100.0  # the real tokens' values change what every pad sees
    assert (packed_sdpa(q, k, changed_v, seg)[1, :, 38:] - out[1, :, 38:]).abs().min() > 1.0


def test_dispatch_packed_and_unpacked() -> None:
    """Document ids take the per-document path ((B, T, Hq, D) out); a 4D mask or None goes to transformers' sdpa."""
    model = tiny_gemma3()
    layer = model.model.layers[0].self_attn  # 4 query heads over 2 key/value heads
    q, k, v = (t.detach() for t in qkv(4, 2, 16, torch.float32))
    seg = doc_ids(ROWS, TOTAL)
    out, weights = packed_sdpa_attention_forward(layer, q, k, v, seg, scaling=0.25, sliding_window=8)
    assert weights is None and out.shape == (len(ROWS), TOTAL, 4, 16)
    torch.testing.assert_close(out, dense_reference(q, k, v, ROWS, 8, scaling=0.25).transpose(1, 2))
    dense = packed_attention_masks(ROWS, TOTAL, sliding_window=8, implementation="sdpa")["sliding_attention"]
    for mask in (dense, None):
        ours, _ = packed_sdpa_attention_forward(layer, q, k, v, mask, scaling=0.25, sliding_window=8)
        theirs, _ = sdpa_attention_forward(layer, q, k, v, mask, scaling=0.25, sliding_window=8)
        torch.testing.assert_close(ours, theirs, atol=0, rtol=0)


def test_register_is_idempotent_and_switches_peft_models() -> None:
    register()
    register()
    model = get_peft_model(tiny_gemma3(attn_implementation="sdpa"), LoraConfig(r=2, target_modules=["q_proj"]))
    model.get_base_model().set_attn_implementation(PACKED_SDPA)
    assert model.get_base_model().config._attn_implementation == PACKED_SDPA


class _HostSyncs(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the ops that copy a tensor's value to the host (``.item()``, ``.tolist()``, ``bool(t)``) and
    the run-length op the fallback reads document boundaries with."""

    SYNCS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.unique_consecutive.default}

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in self.SYNCS
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("checkpointing", [False, True])
def test_collate_hands_document_runs_down_so_packed_layers_make_no_host_sync(checkpointing, monkeypatch):
    from gemma_lowmem import attention
    from gemma_lowmem.data.collate import collate
    from gemma_lowmem.loss import sft_loss

    register()
    model = tiny_gemma3(layers=4, attn_implementation=PACKED_SDPA).train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    gen = torch.Generator().manual_seed(0)
    rows = [[{"input_ids": ids, "labels": ids} for ids in (torch.randint(6, 900, (n,), generator=gen).tolist()
                                                           for n in row)] for row in ROWS]
    batch = collate(rows, pad_id=0, packed=True, sliding_window=8, attn_implementation=PACKED_SDPA)
    width = batch["input_ids"].shape[1]
    assert batch["document_runs"] == (((0, 13), (1, 1), (2, 22), (3, 5)), ((0, 31), (1, 7), (-1, width - 38)))
    with_runs = sft_loss(model, batch)
    syncs = _HostSyncs()
    with syncs:
        sft_loss(model, batch).backward()
    slow = sft_loss(model, {k: v for k, v in batch.items() if k != "document_runs"})  # reads the runs off the ids
    torch.testing.assert_close(with_runs, slow, rtol=0, atol=0)
    assert syncs.count == 0
    monkeypatch.setattr(attention, "_row_runs", lambda seg: pytest.fail("read document runs off the device"))
    sft_loss(model, batch)
