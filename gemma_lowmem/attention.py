"""Attention for packed rows that computes each document on its own: no dense (T, T) mask, no masked-out work.

A packed batch (several documents end to end in one row) carries, instead of block-diagonal (B, 1, T, T) masks, the
per-slot document ids ``seg`` (B, T) long from :func:`gemma_lowmem.data.packing.doc_ids`: 0, 1, ... per document,
-1 on the pad tail. Gemma 3 / 3n decoders hand a dict mask ``{"full_attention": seg, "sliding_attention": seg}``
to every layer unchanged, and the layer calls the attention function registered under its config's
``_attn_implementation``. Under :data:`PACKED_SDPA` that function runs SDPA once per document (causal; a document
longer than a sliding layer's window gets a small (n, n) band mask), so the work is sum(n_d^2) instead of T^2.
Any other mask (4D, None: unpacked batches, validation, generation) goes to transformers' own sdpa unchanged,
and the matching mask-interface entry makes the model build the standard sdpa masks for those calls.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

PACKED_SDPA = "gemma_lowmem_sdpa"


def _band(n: int, window: int, device: torch.device) -> torch.Tensor:
    """(n, n) bool: key k visible to query q iff q - window < k <= q (transformers' sliding_window_overlay)."""
    q = torch.arange(n, device=device)[:, None]
    k = torch.arange(n, device=device)[None, :]
    return (k <= q) & (k > q - window)


def _row_runs(seg_row: torch.Tensor) -> list[tuple[int, int]]:
    """Runs of one row's document ids as (id, length), in order; a -1 run (the pad tail) may only come last."""
    values, counts = torch.unique_consecutive(seg_row, return_counts=True)
    # Host sync: one small (runs, 2) copy per row and layer, needed to slice the documents.
    runs = [tuple(r) for r in torch.stack([values, counts], dim=1).tolist()]
    assert all(v >= 0 for v, _ in runs[:-1]), "document ids: -1 (pad) must only mark the row's tail"
    return runs


def packed_sdpa(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    seg: torch.Tensor,
    *,
    scaling: float | None = None,
    sliding_window: int | None = None,
    dropout: float = 0.0,
    runs: Sequence[Sequence[tuple[int, int]]] | None = None,
) -> torch.Tensor:
    """Causal attention within each document of packed rows, SDPA per document.

    A pad-tail query attends causally to the whole row before it (as with ordinary right padding): a pad that saw
    only pads would keep a zero hidden state through Gemma 3n and turn its gradients NaN. No real token sees a pad.

    Args:
        query: (B, Hq, T, D).
        key: (B, Hkv, T, D); Hq must be a multiple of Hkv (grouped-query heads).
        value: (B, Hkv, T, D).
        seg: (B, T) long document ids: 0, 1, ... in contiguous runs, -1 on the pad tail.
        scaling: softmax scale (None: 1 / sqrt(D)).
        sliding_window: a key k is visible to query q only if q - sliding_window < k (None: no window).
        dropout: attention dropout probability.
        runs: per row the ``(document id, length)`` runs of ``seg``, known on the host (``collate`` passes them as
            ``document_runs``); None reads them off ``seg``, a host sync per row.

    Returns:
        (B, Hq, T, D), the attention output.
    """
    gqa = query.shape[1] != key.shape[1]
    rows = []
    for b in range(query.shape[0]):
        pieces, start = [], 0
        for doc, n in runs[b] if runs is not None else _row_runs(seg[b]):
            end = start + n
            q, k, v = query[b : b + 1, :, start:end], key[b : b + 1, :, start:end], value[b : b + 1, :, start:end]
            mask = None  # (n, n) or (n, end) bool when a plain causal mask is not the rule
            if doc < 0:  # the pad tail: pad i sees slots 0 .. start + i of the whole row
                k, v = key[b : b + 1, :, :end], value[b : b + 1, :, :end]
                slots = torch.arange(end, device=seg.device)
                mask = slots[None, :] <= slots[start:, None]
            elif sliding_window is not None and n > sliding_window:
                mask = _band(n, sliding_window, seg.device)
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout, scale=scaling, is_causal=mask is None, enable_gqa=gqa
            )
            pieces.append(out)  # (1, Hq, n, D)
            start = end
        rows.append(torch.cat(pieces, dim=2))  # (1, Hq, T, D)
    return torch.cat(rows, dim=0)


def packed_sdpa_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The attention function transformers calls from each layer under :data:`PACKED_SDPA`.

    Args:
        module: the attention layer (unused by the packed path).
        query: (B, Hq, T, D).
        key: (B, Hkv, S, D).
        value: (B, Hkv, S, D).
        attention_mask: (B, T) long document ids (a packed batch, S == T), else a 4D mask or None.
        dropout: attention dropout probability.
        scaling: softmax scale.
        sliding_window: the layer's window (None on full-attention layers).
        **kwargs: ``document_runs`` (see :func:`packed_sdpa`'s ``runs``); the rest goes on to transformers' sdpa for
            unpacked calls.

    Returns:
        ((B, T, Hq, D) output, None): the layout of ``sdpa_attention_forward``.
    """
    runs = kwargs.pop("document_runs", None)  # from collate, through the model's forward kwargs
    # The model turns a 2D padding mask into 4D (or None) before any layer, so a 2D long mask here is document ids.
    is_doc_ids = (
        isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 2 and attention_mask.dtype == torch.long
    )
    if not is_doc_ids:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      sliding_window=sliding_window, **kwargs)
    out = packed_sdpa(query, key, value, attention_mask, scaling=scaling, sliding_window=sliding_window,
                      dropout=dropout, runs=runs)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register :data:`PACKED_SDPA` with transformers (attention function and sdpa masks); safe to call again.

    ``model.load_base_model`` calls it; code that builds a model with ``attn_implementation=PACKED_SDPA`` itself
    calls it first.
    """
    AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention_forward)
    AttentionMaskInterface.register(PACKED_SDPA, sdpa_mask)
