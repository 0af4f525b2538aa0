"""The SFT objective: summed next-token cross-entropy over answer tokens, without full-vocabulary logits.

The loop divides the sum by the loss tokens of the whole accumulation window, so padding, packing and
accumulation never change the objective.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from gemma_lowmem.data.tokenize import IGNORE_INDEX
from gemma_lowmem_kernels import linear_cross_entropy


@dataclass(frozen=True)
class LMParts:
    """What the chunked loss needs from any Hugging Face causal LM.

    Attributes:
        decoder: the body that returns hidden states (``model.get_decoder()``).
        head: the output projection (often tied to the input embedding).
        softcap: Gemma's final-logit softcap (``config.final_logit_softcapping``; 30 for Gemma 3n, None for Gemma 3).
    """

    decoder: torch.nn.Module
    head: torch.nn.Module
    softcap: float | None


def lm_parts(model: torch.nn.Module) -> LMParts:
    """Find decoder, head and softcap under PEFT / DDP wrappers."""
    base = getattr(model, "module", model)  # DistributedDataParallel
    base = base.get_base_model() if hasattr(base, "get_base_model") else base  # PeftModel
    softcap = getattr(base.config, "final_logit_softcapping", None)
    return LMParts(base.get_decoder(), base.get_output_embeddings(), softcap)


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """The keys of a collated batch that the model's forward takes."""
    return {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids", "document_runs") if k in batch}


def token_losses(
    model: torch.nn.Module, batch: dict[str, Any], *, chunked: bool = True, chunk_size: int | None = None
) -> torch.Tensor:
    """Per-token next-token losses (B, T-1), zero where the label is ignored.

    With ``chunked`` the LM head and cross-entropy run in chunks over the answer tokens only (``kernels``;
    ``chunk_size`` tokens per chunk, or for an int8 head vocabulary blocks holding as many logits);
    without it the model's full logits are built (the usual recipe; for models whose head is not a plain linear).
    """
    labels = batch["labels"][:, 1:]  # (B, T-1): token t+1 is the target of position t
    if chunked:
        parts = lm_parts(model)
        weight_scale = getattr(parts.head, "weight_scale", None)  # an int8 tied head (model.Int8TiedHead)
        if weight_scale is not None and chunk_size is not None:
            # The int8 head is walked in vocabulary blocks: one with the logits of a chunk_size-token chunk.
            labelled = int((labels != IGNORE_INDEX).sum())  # host sync (the loss makes the same one)
            chunk_size = max(1, chunk_size * weight_scale.shape[0] // max(labelled, 1))
        hidden = parts.decoder(**model_inputs(batch), use_cache=False).last_hidden_state[:, :-1]  # (B, T-1, H)
        return linear_cross_entropy(
            hidden,
            parts.head.weight,
            labels,
            weight_scale=weight_scale,
            ignore_index=IGNORE_INDEX,
            softcap=parts.softcap,
            chunk_size=chunk_size,
            reduction="none",
        )
    logits = model(**model_inputs(batch), use_cache=False).logits[:, :-1]  # (B, T-1, V): the memory hog
    losses = F.cross_entropy(
        logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
    )
    return losses.view_as(labels)


def sft_loss(
    model: torch.nn.Module, batch: dict[str, Any], *, chunked: bool = True, chunk_size: int | None = None
) -> torch.Tensor:
    """Summed cross-entropy over the batch's loss tokens (a 0-dim tensor; no host sync), each token's loss taken
    ``loss_weights`` times when the batch has them (the loop divides by their sum, ``num_loss_tokens``)."""
    losses = token_losses(model, batch, chunked=chunked, chunk_size=chunk_size)  # (B, T-1)
    if "loss_weights" in batch:
        losses = losses * batch["loss_weights"][:, 1:]  # position t predicts token t+1: the weight of t+1
    return losses.sum()
