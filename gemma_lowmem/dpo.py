"""Pairwise preference tuning (DPO, conservative DPO, IPO) in the memory of SFT: one model, one packed row per pair.

The objective compares how much more likely the policy (base + LoRA) makes the chosen answer than the rejected one,
relative to a frozen reference. Three choices keep it inside the SFT budget:

- **No second model.** The reference is the same base with the adapter switched off (``model.disable_adapter()``).
  Its sequence log-probabilities are computed once per pair, without gradients, before training
  (:func:`reference_logps`), and cached on disk (:func:`cached_reference_logps`); a training step runs the policy
  only. :func:`dpo_objective` does it all for a run: the pairs with their reference, the loss and the collation.
- **One forward per pair.** An example is one row holding ``[prompt + chosen]`` and ``[prompt + rejected]`` as two
  documents (:func:`pair_example`); :func:`collate_pairs` gives them block-diagonal masks and restarting positions
  (the packed collation), so neither sees the other, and several pairs may share a row when packing.
- **No full logits.** Sequence log-probabilities are sums of ``-CE`` over answer tokens from the chunked loss kernel
  (:func:`sequence_logps`).

A batch's ``num_loss_tokens`` is its number of pairs, so the loop's normalisation gives the mean pair loss; the extra
metrics are sums over pairs too (the loop divides them by the pairs of the window). With ``h = (log pi(y_c) -
log ref(y_c)) - (log pi(y_r) - log ref(y_r))``, summed over answer tokens:

- ``sigmoid`` (DPO): ``-(1 - eps) * log sigmoid(beta * h) - eps * log sigmoid(-beta * h)``; ``eps`` > 0 is
  conservative DPO (labels flipped with probability ``eps``).
- ``ipo``: ``(h - 1 / (2 * beta)) ** 2``. The margin is on summed log ratios, so long answers need a smaller beta.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from gemma_lowmem.config import RunConfig
from gemma_lowmem.data.collate import IGNORE_INDEX, attention_settings, collate, to_device
from gemma_lowmem.device import resolve_precision
from gemma_lowmem.errors import UserError
from gemma_lowmem.loss import lm_parts, token_losses
from gemma_lowmem.model import CACHE

LOSS_KINDS = ("sigmoid", "ipo")
REDUCTIONS = ("sum", "mean", "none")
METRICS = ("reward_accuracy", "margin", "chosen_logp", "rejected_logp", "kl")


# ------------------------------------------------------------------------------------------------------------ loss


def _check_loss_args(beta: float, kind: str, label_smoothing: float, reduction: str) -> None:
    if not beta > 0:
        raise ValueError(f"beta={beta!r} must be > 0")
    if kind not in LOSS_KINDS:
        raise ValueError(f"kind={kind!r} is not one of {', '.join(LOSS_KINDS)}")
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing={label_smoothing!r} must be in [0, 0.5)")
    if kind == "ipo" and label_smoothing:
        raise ValueError("label_smoothing applies to the sigmoid (DPO) loss only, not to ipo")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} is not one of {', '.join(REDUCTIONS)}")


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    *,
    beta: float,
    kind: str = "sigmoid",
    label_smoothing: float = 0.0,
    reduction: str = "sum",
) -> torch.Tensor:
    """The preference loss of P pairs from their sequence log-probabilities (formulas in the module docstring).

    Args:
        policy_chosen: (P,) log pi(chosen answer | prompt), summed over answer tokens.
        policy_rejected: (P,) the same for the rejected answer.
        ref_chosen: (P,) the reference's log-probability of the chosen answer (no gradient needed).
        ref_rejected: (P,) the same for the rejected answer.
        beta: strength of the pull towards the reference (DPO's temperature); > 0.
        kind: "sigmoid" (DPO) or "ipo".
        label_smoothing: conservative DPO's label-flip probability in [0, 0.5); sigmoid only.
        reduction: "sum" over pairs (the loop divides by the window's pairs), "mean", or "none" (P,).

    Returns:
        The loss in the inputs' dtype: a 0-dim tensor, or (P,) for reduction "none".
    """
    _check_loss_args(beta, kind, label_smoothing, reduction)
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)  # (P,) difference of log ratios
    if kind == "sigmoid":
        # logsigmoid is stable for large |beta * h|, where log(sigmoid(.)) would give -inf.
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    else:
        losses = (h - 1 / (2 * beta)) ** 2
    if reduction == "sum":
        return losses.sum()
    if reduction == "mean":
        return losses.mean()
    return losses


def dpo_loss_ref(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    *,
    beta: float,
    kind: str = "sigmoid",
    label_smoothing: float = 0.0,
    reduction: str = "sum",
) -> torch.Tensor:
    """Specification of :func:`dpo_loss`, written from the papers' formulas in fp64 (for tests; not stable for
    large margins).

    DPO (Rafailov et al. 2023, eq. 7) with the conservative-DPO mixture of both labels; IPO (Azar et al. 2023, eq. 17)
    as the squared distance of the chosen-minus-rejected log ratio from ``1 / (2 beta)``.

    Args:
        policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, kind, label_smoothing, reduction: as in
            :func:`dpo_loss`.

    Returns:
        The same loss as :func:`dpo_loss`, in fp64.
    """
    _check_loss_args(beta, kind, label_smoothing, reduction)
    pc, pr, rc, rr = (t.double() for t in (policy_chosen, policy_rejected, ref_chosen, ref_rejected))
    if kind == "sigmoid":
        reward_chosen = beta * (pc - rc)  # DPO's implicit rewards
        reward_rejected = beta * (pr - rr)
        p_chosen_wins = 1 / (1 + torch.exp(reward_rejected - reward_chosen))  # Bradley-Terry
        losses = -((1 - label_smoothing) * torch.log(p_chosen_wins) + label_smoothing * torch.log(1 - p_chosen_wins))
    else:
        log_ratio_policy = pc - pr
        log_ratio_ref = rc - rr
        losses = (log_ratio_policy - log_ratio_ref - 0.5 / beta) ** 2
    return {"sum": losses.sum, "mean": losses.mean, "none": lambda: losses}[reduction]()


# ----------------------------------------------------------------------------------------------------- pair examples


def pair_example(chosen: dict[str, list[int]], rejected: dict[str, list[int]]) -> dict[str, Any]:
    """One preference pair as one example: the chosen and the rejected sequence end to end.

    Args:
        chosen: ``{"input_ids", "labels"}`` of prompt + chosen answer, labels -100 off the answer.
        rejected: the same for prompt + rejected answer.

    Returns:
        ``{"input_ids", "labels", "split"}``: both sequences concatenated (``input_ids`` length plans batches and
        packing) and ``split``, the length of the chosen sequence.
    """
    for name, seq in (("chosen", chosen), ("rejected", rejected)):
        if len(seq["input_ids"]) != len(seq["labels"]) or len(seq["input_ids"]) < 2:
            raise ValueError(f"{name}: input_ids and labels must have the same length of at least 2 tokens")
        if all(t == IGNORE_INDEX for t in seq["labels"][1:]):
            raise ValueError(f"{name}: no answer token carries a label")
    return {
        "input_ids": chosen["input_ids"] + rejected["input_ids"],
        "labels": chosen["labels"] + rejected["labels"],
        "split": len(chosen["input_ids"]),
    }


def collate_pairs(
    rows: Sequence[Sequence[dict[str, Any]]],
    *,
    pad_id: int,
    sliding_window: int | None = None,
    attn_implementation: str = "sdpa",
    mask_dtype: torch.dtype = torch.float32,
) -> dict[str, Any]:
    """Rows of pair examples -> one packed batch where each sequence is a document of its own.

    Args:
        rows: B rows, each a list of pair examples from :func:`pair_example` (one per row unless packing).
        pad_id: the tokenizer's pad id.
        sliding_window: the model's ``config.sliding_window`` (None: no sliding layers).
        attn_implementation: "sdpa" or "eager" (boolean or additive masks).
        mask_dtype: dtype of eager additive masks.

    Returns:
        The packed batch of :func:`~gemma_lowmem.data.collate.collate` plus ``sequence_index`` (B, T-1) long: the
        answer sequence of each label of ``labels[:, 1:]`` (pair p's chosen is 2p, its rejected 2p + 1; -1 off the
        answers); ``reference_logps`` (P, 2) float32 (chosen, rejected) when the examples carry ``ref_logps``;
        ``num_loss_tokens`` = P, the number of pairs (the loop's normaliser); ``num_answer_tokens``.
    """
    docs_per_row: list[list[dict[str, list[int]]]] = []
    pairs = [ex for row in rows for ex in row]
    for row in rows:
        docs = []
        for ex in row:
            s = ex["split"]
            docs.append({"input_ids": ex["input_ids"][:s], "labels": ex["labels"][:s]})
            docs.append({"input_ids": ex["input_ids"][s:], "labels": ex["labels"][s:]})
        docs_per_row.append(docs)
    batch = collate(docs_per_row, pad_id=pad_id, packed=True, sliding_window=sliding_window,
                    attn_implementation=attn_implementation, mask_dtype=mask_dtype)

    # Global sequence number of every slot (B, T): documents are numbered in row order, which is pair order.
    total = batch["input_ids"].shape[1]
    seq_of_slot = torch.full((len(rows), total), -1, dtype=torch.long)
    number = 0
    for b, docs in enumerate(docs_per_row):
        start = 0
        for doc in docs:
            seq_of_slot[b, start:start + len(doc["input_ids"])] = number
            start += len(doc["input_ids"])
            number += 1
    answer = batch["labels"][:, 1:] != IGNORE_INDEX  # (B, T-1); collate already dropped each document's first label
    batch["sequence_index"] = torch.where(answer, seq_of_slot[:, 1:], -1)
    batch["num_answer_tokens"] = batch["num_loss_tokens"]
    batch["num_loss_tokens"] = torch.tensor(len(pairs), dtype=torch.long)
    if all("ref_logps" in ex for ex in pairs):
        batch["reference_logps"] = torch.tensor([ex["ref_logps"] for ex in pairs], dtype=torch.float32)  # (P, 2)
    return batch


def pair_collate_fn(model: torch.nn.Module, pad_id: int) -> Callable[[Sequence[Sequence[dict]]], dict[str, Any]]:
    """:func:`collate_pairs` with the model's sliding window and attention implementation filled in (as
    :func:`~gemma_lowmem.data.collate.collate_for` reads them)."""
    return partial(collate_pairs, pad_id=pad_id, **attention_settings(model))


# ----------------------------------------------------------------------------------------------- log-probabilities


def sequence_logps(
    model: torch.nn.Module,
    batch: dict[str, Any],
    num_sequences: int,
    *,
    chunked: bool = True,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Log-probability of each answer sequence of a :func:`collate_pairs` batch, summed over its answer tokens.

    Args:
        model: the causal LM (a PeftModel or a plain one).
        batch: from :func:`collate_pairs`, on the model's device.
        num_sequences: 2 * pairs in the batch (a Python int: no device sync to find it).
        chunked: per-token losses through the chunked kernel (no full-vocabulary logits).
        chunk_size: tokens per loss chunk (None: the kernel's default).

    Returns:
        (num_sequences,) fp32: chosen0, rejected0, chosen1, ...
    """
    ce = token_losses(model, batch, chunked=chunked, chunk_size=chunk_size)  # (B, T-1), 0 off the answers
    index = batch["sequence_index"]  # (B, T-1)
    # Off-answer slots go to an extra bin that is dropped: a boolean-mask gather would sync with the device.
    index = torch.where(index >= 0, index, num_sequences)
    sums = torch.zeros(num_sequences + 1, dtype=ce.dtype, device=ce.device)
    return sums.index_add(0, index.flatten(), -ce.flatten())[:num_sequences]


def _reference_mode(model: torch.nn.Module) -> AbstractContextManager:
    # The reference is the base without the adapter; a model without an adapter is its own reference.
    return model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext()


@torch.no_grad()
def reference_logps(
    model: torch.nn.Module,
    examples: Sequence[dict[str, Any]],
    collate_fn: Callable[[Sequence[Sequence[dict]]], dict[str, Any]],
    *,
    batch_size: int = 4,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
    chunked: bool = True,
    chunk_size: int | None = None,
    show_progress: bool = True,
) -> torch.Tensor:
    """The reference's sequence log-probabilities of every pair: the adapter off, no gradients, dropout off.

    Args:
        model: the policy; with ``disable_adapter`` (PEFT) it is switched off for this pass.
        examples: pair examples from :func:`pair_example`.
        collate_fn: e.g. :func:`pair_collate_fn`.
        batch_size: pairs per forward (one pair per row; pairs of similar length go together).
        autocast: the training run's autocast (the same precision keeps policy == reference before training).
        chunked: per-token losses through the chunked kernel.
        chunk_size: tokens per loss chunk.
        show_progress: draw a tqdm bar.

    Returns:
        (N, 2) fp32 on the CPU: (chosen, rejected) log-probability of each example.
    """
    device = next(model.parameters()).device
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))  # less padding
    out = torch.zeros(len(examples), 2)
    was_training = model.training
    model.eval()
    try:
        with _reference_mode(model):
            bar = tqdm(total=len(examples), desc="reference log-probs", unit="pair", disable=not show_progress)
            for start in range(0, len(order), batch_size):
                chunk = order[start:start + batch_size]
                batch = to_device(collate_fn([[examples[i]] for i in chunk]), device)
                with autocast():
                    logps = sequence_logps(model, batch, 2 * len(chunk), chunked=chunked, chunk_size=chunk_size)
                out[chunk] = logps.float().view(-1, 2).cpu()  # host sync: once per reference batch, before training
                bar.update(len(chunk))
            bar.close()
    finally:
        model.train(was_training)
    return out


def reference_cache_key(examples: Sequence[dict[str, Any]], settings: dict[str, Any]) -> str:
    """A key for cached reference log-probabilities: the model settings and every pair's tokens.

    Args:
        examples: pair examples (their token ids stand for data, tokenizer and prompt template together).
        settings: JSON-able facts that change the reference's numbers (model name, quantization, dtype,
            precision, adapter state).

    Returns:
        20 hex digits.
    """
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    digest.update(b"pair-v1")  # versions this file's example layout
    for ex in examples:
        digest.update(json.dumps([ex["input_ids"], ex["labels"], ex["split"]]).encode())
    return digest.hexdigest()[:20]


def cached_reference_logps(
    model: torch.nn.Module,
    examples: Sequence[dict[str, Any]],
    collate_fn: Callable[[Sequence[Sequence[dict]]], dict[str, Any]],
    *,
    cache_dir: str | Path | None,
    settings: dict[str, Any],
    **kwargs: Any,
) -> tuple[torch.Tensor, bool]:
    """:func:`reference_logps`, read from or written to ``cache_dir`` under :func:`reference_cache_key`.

    Args:
        model, examples, collate_fn: as in :func:`reference_logps`.
        cache_dir: folder of the cache (None: no cache).
        settings: what, besides the tokens, changes the numbers (see :func:`reference_cache_key`).
        **kwargs: passed to :func:`reference_logps`.

    Returns:
        ((N, 2) log-probabilities, whether they came from the cache).
    """
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"ref-logps-{reference_cache_key(examples, settings)}.pt"
        if path.is_file():
            cached = torch.load(path, map_location="cpu")  # a cache written on a GPU loads anywhere
            if cached.shape == (len(examples), 2):
                return cached, True
    logps = reference_logps(model, examples, collate_fn, **kwargs)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(logps, tmp)
        tmp.replace(path)  # atomic: an interrupted run leaves no half-written cache
    return logps, False


def with_reference(examples: Sequence[dict[str, Any]], logps: torch.Tensor) -> list[dict[str, Any]]:
    """Copies of the examples carrying their reference log-probabilities as ``ref_logps`` [chosen, rejected]."""
    assert logps.shape == (len(examples), 2), (logps.shape, len(examples))
    return [{**ex, "ref_logps": pair} for ex, pair in zip(examples, logps.tolist())]


# ----------------------------------------------------------------------------------------------------- loss_fn


def dpo_step(
    model: torch.nn.Module,
    batch: dict[str, Any],
    *,
    beta: float,
    kind: str = "sigmoid",
    label_smoothing: float = 0.0,
    chunked: bool = True,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loop's ``loss_fn`` for preference pairs: summed pair loss and summed metrics (no host sync).

    Metrics, each summed over the batch's P pairs (the loop divides by the window's pairs):

    - ``reward_accuracy``: 1 where the chosen answer's implicit reward ``beta * (log pi - log ref)`` exceeds the
      rejected one's (0 at the start, when policy and reference agree).
    - ``margin``: chosen reward minus rejected reward.
    - ``chosen_logp``, ``rejected_logp``: the policy's sequence log-probabilities.
    - ``kl``: ``0.5 * (log pi(y) - log ref(y)) ** 2`` averaged over the pair's two answers: the "k2" estimator of
      KL(pi || ref) at the sequence level (Schulman, "Approximating KL divergence", 2020). It is >= 0 and grows
      as the policy drifts, but the answers are the data's, not samples of the policy, so it is a drift measure
      that equals the KL only to second order and only for on-policy answers.

    Args:
        model: the policy (base + LoRA).
        batch: from :func:`collate_pairs` with ``reference_logps``.
        beta, kind, label_smoothing: as in :func:`dpo_loss`.
        chunked, chunk_size: as in :func:`sequence_logps`.

    Returns:
        (summed loss over pairs, {metric: summed 0-dim tensor}).
    """
    ref = batch["reference_logps"].float()  # (P, 2)
    logps = sequence_logps(model, batch, 2 * ref.shape[0], chunked=chunked, chunk_size=chunk_size).view(-1, 2)
    loss = dpo_loss(logps[:, 0], logps[:, 1], ref[:, 0], ref[:, 1], beta=beta, kind=kind,
                    label_smoothing=label_smoothing, reduction="sum")
    with torch.no_grad():
        log_ratio = logps.detach() - ref  # (P, 2)
        rewards = beta * log_ratio
        metrics = {
            "reward_accuracy": (rewards[:, 0] > rewards[:, 1]).float().sum(),
            "margin": (rewards[:, 0] - rewards[:, 1]).sum(),
            "chosen_logp": logps[:, 0].detach().sum(),
            "rejected_logp": logps[:, 1].detach().sum(),
            "kl": (0.5 * log_ratio.pow(2)).mean(dim=1).sum(),
        }
    return loss, metrics


def make_dpo_loss(
    beta: float = 0.1,
    kind: str = "sigmoid",
    label_smoothing: float = 0.0,
    *,
    chunked: bool = True,
    chunk_size: int | None = None,
) -> Callable[[torch.nn.Module, dict[str, Any]], tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """:func:`dpo_step` with its settings bound, checked now rather than at the first step."""
    _check_loss_args(beta, kind, label_smoothing, "sum")
    return partial(dpo_step, beta=beta, kind=kind, label_smoothing=label_smoothing, chunked=chunked,
                   chunk_size=chunk_size)


# --------------------------------------------------------------------------------------------------- for a run


def dpo_objective(
    cfg: RunConfig, model: torch.nn.Module, pad_id: int, train: list[dict[str, Any]], val: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], Callable[..., dict[str, Any]], Callable[..., Any]]:
    """What ``fit`` needs to train pair examples with the preference objective of ``cfg.preference``.

    The reference log-probabilities (the base, adapter off) are computed once under the run's precision and
    cached under ``cfg.data.cache_dir/reference`` (default ``~/.cache/gemma_lowmem/reference``), keyed by the
    pairs' tokens and what else changes the numbers: model, storage, precision, and a sample of the head's
    weights (a model re-converted under the same name must not reuse the cache).

    Args:
        cfg: the run's config (``preference``, ``train.precision``, the chunked-loss settings, the cache folder).
        model: the policy (base + LoRA).
        pad_id: the tokenizer's pad token id.
        train, val: pair examples (:func:`pair_example`).

    Returns:
        (training examples, validation examples) carrying ``ref_logps``, the collation and the loss.

    Raises:
        UserError: a preference setting the loss refuses (e.g. label smoothing with ``ipo``).
    """
    pref, train_cfg = cfg.preference, cfg.train
    try:
        loss_fn = make_dpo_loss(pref.beta, pref.loss, pref.label_smoothing, chunked=train_cfg.chunked_loss,
                                chunk_size=train_cfg.loss_chunk_size)
    except ValueError as err:
        raise UserError(f"preference settings (--dpo-beta, --dpo-loss, --dpo-label-smoothing): {err}") from None
    collate_fn = pair_collate_fn(model, pad_id)
    precision = resolve_precision(next(model.parameters()).device, train_cfg.precision)
    settings = {
        "model": cfg.model.model, "quant": cfg.model.quant, "dtype": cfg.model.dtype,
        "attn": cfg.model.attn_implementation, "precision": str(precision.dtype), "adapter": "disabled",
        "chunked": train_cfg.chunked_loss, "head_sample": float(lm_parts(model).head.weight[:8].float().sum()),
    }
    cache = Path(cfg.data.cache_dir) / "reference" if cfg.data.cache_dir else CACHE / "reference"
    logps, cached = cached_reference_logps(
        model, train + val, collate_fn, cache_dir=cache, settings=settings, batch_size=train_cfg.batch_size,
        autocast=precision.autocast, chunked=train_cfg.chunked_loss, chunk_size=train_cfg.loss_chunk_size,
    )
    print(f"reference log-probs of {len(train) + len(val)} pairs " + ("read from the cache" if cached else "computed"))
    n = len(train)
    return with_reference(train, logps[:n]), with_reference(val, logps[n:]), collate_fn, loss_fn
