"""Turn rows of token examples into one micro-batch of tensors.

An example is ``{"input_ids": list[int], "labels": list[int]}`` of equal length, labels -100 where no loss is
taken. The loop feeds ``input_ids``, ``attention_mask`` and (packed) ``position_ids`` to the decoder and takes the
loss of ``hidden[:, :-1]`` against ``labels[:, 1:]``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch

from gemma_lowmem.attention import PACKED_SDPA
from gemma_lowmem.data.packing import document_runs, packed_attention_masks, packed_position_ids
from gemma_lowmem.data.tokenize import IGNORE_INDEX


def collate(
    rows: Sequence[Sequence[dict]],
    *,
    pad_id: int,
    packed: bool,
    sliding_window: int | None = None,
    attn_implementation: str = "sdpa",
    mask_dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor | dict[str, torch.Tensor]]:
    """Right-pad rows into a batch; packed rows also get per-document positions and block-diagonal masks.

    Each document's first label becomes -100: in a packed row it is what the previous document's last token
    would be trained to predict across the boundary; in an unpacked row the shifted loss never reads it anyway.
    So the summed loss of a packed row equals the sum over its documents run one by one.

    Args:
        rows: B rows, each a list of examples (exactly one per row when not packed).
        pad_id: token id written into pad slots (they carry no loss and, packed, attend only to themselves).
        packed: rows hold several documents that must not see each other.
        sliding_window: the model's ``config.sliding_window`` (packed only; None if it has no sliding layers: then
            the mask is one (B, 1, T, T) tensor, as models without per-layer-type masks take it).
        attn_implementation: the model's ``config._attn_implementation`` (packed only): "sdpa" or "eager" select
            boolean or additive (T, T) masks, :data:`~gemma_lowmem.attention.PACKED_SDPA` the (B, T) document ids.
        mask_dtype: dtype of eager additive masks (the attention scores' dtype).

    Returns:
        ``input_ids`` (B, T) long; ``labels`` (B, T) long with -100 on pads and document starts;
        ``attention_mask``: unpacked a (B, T) long 1/0 padding mask (the model builds its causal and sliding masks),
        packed the dict ``{"full_attention", "sliding_attention"}`` of (B, 1, T, T) masks (PACKED_SDPA: (B, T)
        document ids) from :func:`packed_attention_masks`; ``position_ids`` (B, T) long, packed only; under
        PACKED_SDPA also ``document_runs``, per row the ``(document id, length)`` runs as a tuple on the host
        (:func:`~gemma_lowmem.data.packing.document_runs`);
        ``num_loss_tokens``: count of ``labels[:, 1:] != -100`` and ``num_tokens``: count of non-pad tokens, both 0-dim
        long tensors. When an example has ``loss_weights`` the batch has them too, (B, T) long (1 where an example
        has none), and ``num_loss_tokens`` is their sum over the loss tokens: the loop's mean is then weighted.
    """
    if not rows:
        raise ValueError("collate needs at least one row")
    doc_lengths: list[list[int]] = []
    for b, row in enumerate(rows):
        if not row:
            raise ValueError(f"row {b} holds no example")
        if not packed and len(row) != 1:
            raise ValueError(f"row {b} holds {len(row)} examples but packed=False allows one per row")
        for d, ex in enumerate(row):
            if len(ex["input_ids"]) != len(ex["labels"]) or not ex["input_ids"]:
                raise ValueError(
                    f"row {b}, example {d}: input_ids ({len(ex['input_ids'])}) and labels ({len(ex['labels'])}) "
                    "must have the same non-zero length"
                )
        doc_lengths.append([len(ex["input_ids"]) for ex in row])
    row_lengths = [sum(docs) for docs in doc_lengths]
    total = max(row_lengths)

    input_ids = torch.full((len(rows), total), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(rows), total), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    weighted = any("loss_weights" in ex for row in rows for ex in row)
    weights = torch.ones((len(rows), total), dtype=torch.long) if weighted else None  # (B, T)
    for b, row in enumerate(rows):
        ids = [t for ex in row for t in ex["input_ids"]]
        labs = [t for ex in row for t in [IGNORE_INDEX, *ex["labels"][1:]]]  # no loss across a document boundary
        input_ids[b, : row_lengths[b]] = torch.tensor(ids, dtype=torch.long)
        labels[b, : row_lengths[b]] = torch.tensor(labs, dtype=torch.long)
        if weights is not None:
            row_weights = [w for ex in row for w in ex.get("loss_weights", [1] * len(ex["input_ids"]))]
            weights[b, : row_lengths[b]] = torch.tensor(row_weights, dtype=torch.long)

    batch: dict[str, torch.Tensor | dict[str, torch.Tensor]] = {"input_ids": input_ids, "labels": labels}
    if packed and sliding_window is None:
        # A model without sliding layers (Llama, Qwen2) takes one 4D mask, not Gemma's dict of per-layer-type masks;
        # under PACKED_SDPA it reaches transformers' sdpa, which the packed attention falls back to.
        implementation = "sdpa" if attn_implementation == PACKED_SDPA else attn_implementation
        batch["position_ids"] = packed_position_ids(doc_lengths, total)
        batch["attention_mask"] = packed_attention_masks(
            doc_lengths, total, sliding_window=None, implementation=implementation, dtype=mask_dtype)["full_attention"]
    elif packed:
        batch["position_ids"] = packed_position_ids(doc_lengths, total)
        batch["attention_mask"] = packed_attention_masks(
            doc_lengths, total, sliding_window=sliding_window, implementation=attn_implementation, dtype=mask_dtype
        )
        if attn_implementation == PACKED_SDPA:  # host-side runs: the packed attention slices documents by them
            batch["document_runs"] = document_runs(doc_lengths, total)
    else:
        batch["attention_mask"] = (torch.arange(total)[None, :] < torch.tensor(row_lengths)[:, None]).long()
    counted = (labels[:, 1:] != IGNORE_INDEX).long()  # (B, T-1)
    if weights is not None:
        batch["loss_weights"] = weights
        counted = counted * weights[:, 1:]  # a token of weight w counts as w loss tokens
    batch["num_loss_tokens"] = counted.sum()
    batch["num_tokens"] = torch.tensor(sum(row_lengths), dtype=torch.long)
    return batch


def attention_settings(model: torch.nn.Module) -> dict[str, Any]:
    """The ``sliding_window`` and ``attn_implementation`` keywords of :func:`collate` that match ``model``.

    Read from the model's config, or its nested ``text_config`` (multimodal Gemma 3 / 3n): the sliding window
    (None unless the layer layout ``layer_types`` has a sliding layer, so a model of full-attention layers gets its
    one 4D mask even when its config names a window) and ``_attn_implementation`` ("sdpa" when unset). A module
    without a config gets the defaults.

    Returns:
        ``{"sliding_window": int | None, "attn_implementation": str}``.
    """
    config = getattr(model, "config", None)
    text = getattr(config, "text_config", None) or config
    window = getattr(text, "sliding_window", None)
    layer_types = getattr(text, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        window = None
    implementation = getattr(text, "_attn_implementation", None) or getattr(config, "_attn_implementation", None)
    return {"sliding_window": window, "attn_implementation": implementation or "sdpa"}


def collate_for(model: torch.nn.Module, *, pad_id: int, packed: bool) -> Callable[[Sequence[Sequence[dict]]], dict]:
    """:func:`collate` for ``model``: the SFT collate to give ``fit``.

    The model config's sliding window, layer layout (``layer_types``) and attention implementation, a nested
    ``text_config``'s when there is one, fill in ``collate``'s mask keywords (see :func:`attention_settings`).

    Args:
        model: the causal LM the batches are for (a PeftModel or a plain one).
        pad_id: the tokenizer's pad token id.
        packed: rows hold several documents (``TrainConfig.packing``).

    Returns:
        ``collate_fn(rows) -> batch``, as :func:`collate` returns it.
    """
    return partial(collate, pad_id=pad_id, packed=packed, **attention_settings(model))


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """A collated batch with its tensors (the packed mask dict's too) on ``device``; host values stay as they are."""
    moved = {}
    for key, value in batch.items():
        if isinstance(value, dict):  # packed attention masks: {"full_attention": ..., "sliding_attention": ...}
            moved[key] = {k: v.to(device, non_blocking=True) for k, v in value.items()}
        elif isinstance(value, torch.Tensor):
            moved[key] = value.to(device, non_blocking=True)
        else:
            moved[key] = value
    return moved
