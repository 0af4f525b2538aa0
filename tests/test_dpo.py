"""Preference tuning: the DPO/IPO loss against its reference, pair collation, packed-pair log-probabilities, the
reference with the adapter off, the on-disk cache, and a tiny model that learns a separable preference with ``fit``."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import pytest
import torch

from gemma_lowmem.config import LoraConfig, TrainConfig
from gemma_lowmem.data.collate import IGNORE_INDEX, collate, to_device
from gemma_lowmem.dpo import (
    METRICS,
    cached_reference_logps,
    collate_pairs,
    dpo_loss,
    dpo_loss_ref,
    make_dpo_loss,
    pair_collate_fn,
    pair_example,
    reference_logps,
    sequence_logps,
    with_reference,
)
from gemma_lowmem.loss import token_losses
from gemma_lowmem.model import add_lora
from gemma_lowmem.train import fit
from tests.tiny import VOCAB, tiny_gemma3, tiny_gemma3n
from tests.tolerance import assert_as_accurate, fp64_copy

MODELS = {"gemma3": tiny_gemma3, "gemma3n": tiny_gemma3n}
LOSS_CASES = [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0)]



@torch.no_grad()
def evaluate_pairs(
    model: torch.nn.Module,
    examples: Sequence[dict[str, Any]],
    collate_fn: Callable[[Sequence[Sequence[dict]]], dict[str, Any]],
    loss_fn: Callable[[torch.nn.Module, dict[str, Any]], tuple[torch.Tensor, dict[str, torch.Tensor]]],
    *,
    batch_size: int = 4,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
) -> dict[str, float]:
    """Mean pair loss and metrics of the policy over examples that carry ``ref_logps`` (dropout off).

    Args:
        model: the policy.
        examples: pair examples with ``ref_logps``.
        collate_fn: e.g. :func:`pair_collate_fn`.
        loss_fn: e.g. from :func:`make_dpo_loss`.
        batch_size: pairs per forward.
        autocast: the run's autocast.

    Returns:
        ``{"loss", "reward_accuracy", "margin", "chosen_logp", "rejected_logp", "kl", "pairs"}``, means per pair.
    """
    if not examples:
        raise ValueError("no pairs to evaluate")
    device = next(model.parameters()).device
    totals: dict[str, torch.Tensor] = {}
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(examples), batch_size):
            batch = to_device(collate_fn([[ex] for ex in examples[start:start + batch_size]]), device)
            with autocast():
                loss, metrics = loss_fn(model, batch)
            for name, value in {"loss": loss, **metrics}.items():
                totals[name] = totals.get(name, 0) + value.detach().float()
    finally:
        model.train(was_training)
    means = {name: value.item() / len(examples) for name, value in totals.items()}  # host sync: once per metric
    means["pairs"] = len(examples)
    return means

def random_logps(p: int, dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    """Four (P,) sequence log-probabilities of plausible size (tens of nats, chosen and rejected apart)."""
    g = torch.Generator().manual_seed(seed)
    return [(-30 * torch.rand(p, generator=g, dtype=torch.float64) - 1).to(dtype).requires_grad_(i < 2)
            for i in range(4)]


def lora_model(name: str = "gemma3", seed: int = 0, b_scale: float = 0.1) -> torch.nn.Module:
    """A tiny model with LoRA whose B is non-zero, so the adapter changes the outputs."""
    model = add_lora(MODELS[name](seed=seed), LoraConfig(r=4, alpha=8, dropout=0.0), False)
    g = torch.Generator().manual_seed(seed + 1)
    for pname, p in model.named_parameters():
        if "lora_B" in pname:
            p.data = torch.randn(p.shape, generator=g) * b_scale
    return model


def sequence(prompt: int, answer: int, gen: torch.Generator) -> dict[str, list[int]]:
    ids = torch.randint(3, VOCAB, (prompt + answer,), generator=gen).tolist()
    return {"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]}


def random_pairs(seed: int = 0) -> list[dict]:
    """Three pairs with unequal lengths, all longer than the tiny models' sliding window of 8."""
    g = torch.Generator().manual_seed(seed)
    shapes = [((10, 7), (10, 12)), ((5, 9), (5, 4)), ((14, 3), (14, 11))]
    return [pair_example(sequence(*c, g), sequence(*r, g)) for c, r in shapes]


def separate_logps(model: torch.nn.Module, examples: list[dict]) -> torch.Tensor:
    """Each chosen and rejected sequence run alone (unpacked, no padding): the specification of the packed pass."""
    out = []
    for ex in examples:
        s = ex["split"]
        for ids, labels in ((ex["input_ids"][:s], ex["labels"][:s]), (ex["input_ids"][s:], ex["labels"][s:])):
            batch = collate([[{"input_ids": ids, "labels": labels}]], pad_id=0, packed=False)
            out.append(-token_losses(model, batch).sum())
    return torch.stack(out)


# ---- the loss ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,smoothing", LOSS_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_loss_and_gradients_match_reference(kind, smoothing, dtype, reduction):
    values, grads = [], []
    for fn in (dpo_loss, dpo_loss_ref):
        inputs = random_logps(7, dtype)
        loss = fn(*inputs, beta=0.1, kind=kind, label_smoothing=smoothing, reduction=reduction)
        (loss if reduction != "none" else loss.sum()).backward()
        values.append(loss.detach().double())
        grads.append([t.grad.double() for t in inputs[:2]])
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-12}
    torch.testing.assert_close(values[0], values[1], **tol)
    for a, b in zip(grads[0], grads[1]):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("kind,smoothing", LOSS_CASES)
def test_gradcheck_in_fp64(kind, smoothing):
    inputs = [t.detach().requires_grad_() for t in random_logps(5, torch.float64, seed=3)]
    assert torch.autograd.gradcheck(lambda *x: dpo_loss(*x, beta=0.3, kind=kind, label_smoothing=smoothing), inputs)


def test_known_values():
    zero = torch.zeros(3)
    # Policy equal to the reference: DPO's loss is log 2 per pair, IPO's (1 / (2 beta))^2.
    assert dpo_loss(zero, zero, zero, zero, beta=0.1).item() == pytest.approx(3 * math.log(2))
    assert dpo_loss(zero, zero, zero, zero, beta=0.5, kind="ipo", reduction="mean").item() == pytest.approx(1.0)
    # A large margin: DPO's loss goes to 0 (no overflow), conservative DPO's grows with eps * beta * h.
    big = torch.tensor([400.0])
    assert dpo_loss(big, -big, big * 0, big * 0, beta=1.0).item() == pytest.approx(0.0, abs=1e-6)
    assert dpo_loss(big, -big, big * 0, big * 0, beta=1.0, label_smoothing=0.1).item() == pytest.approx(80.0, rel=1e-4)


@pytest.mark.parametrize("kwargs,match", [
    ({"beta": 0.0}, "beta"), ({"beta": 0.1, "kind": "hinge"}, "kind"),
    ({"beta": 0.1, "label_smoothing": 0.5}, "label_smoothing"),
    ({"beta": 0.1, "kind": "ipo", "label_smoothing": 0.1}, "sigmoid"), ({"beta": 0.1, "reduction": "max"}, "reduction"),
])
def test_bad_settings_are_refused(kwargs, match):
    zero = torch.zeros(2)
    with pytest.raises(ValueError, match=match):
        dpo_loss(zero, zero, zero, zero, **kwargs)
    with pytest.raises(ValueError, match=match):
        dpo_loss_ref(zero, zero, zero, zero, **kwargs)


# ---- pair collation -----------------------------------------------------------------------------------------------


def test_collate_pairs_marks_each_answer():
    a = pair_example({"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [5, 8], "labels": [-100, 8]})
    b = pair_example({"input_ids": [4, 9], "labels": [-100, 9]}, {"input_ids": [4, 3, 2], "labels": [-100, 3, 2]})
    a["ref_logps"], b["ref_logps"] = [-1.0, -2.0], [-3.0, -4.0]
    batch = collate_pairs([[a, b], [b]], pad_id=0, sliding_window=2)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 5, 8, 4, 9, 4, 3, 2], [4, 9, 4, 3, 2, 0, 0, 0, 0, 0]]
    # labels[:, 1:] -> sequence: a.chosen 0, a.rejected 1, b.chosen 2, b.rejected 3 (row 0); b again 4, 5 (row 1)
    assert batch["sequence_index"].tolist() == [[0, 0, -1, 1, -1, 2, -1, 3, 3], [4, -1, 5, 5, -1, -1, -1, -1, -1]]
    assert batch["num_loss_tokens"].item() == 3  # pairs: the loop's normaliser gives the mean pair loss
    assert batch["num_answer_tokens"].item() == 9
    assert batch["reference_logps"].tolist() == [[-1.0, -2.0], [-3.0, -4.0], [-3.0, -4.0]]
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 0, 1, 0, 1, 0, 1, 2]
    full = batch["attention_mask"]["full_attention"][0, 0]
    assert not full[3, :3].any() and full[3, 3]  # the rejected answer never sees the chosen one


def test_pair_example_checks_its_parts():
    with pytest.raises(ValueError, match="no answer token"):
        pair_example({"input_ids": [1, 2], "labels": [-100, -100]}, {"input_ids": [1, 2], "labels": [-100, 2]})
    with pytest.raises(ValueError, match="same length"):
        pair_example({"input_ids": [1, 2], "labels": [-100]}, {"input_ids": [1, 2], "labels": [-100, 2]})


# ---- log-probabilities -------------------------------------------------------------------------------------------


def logps_and_grads(model: torch.nn.Module, logps_fn: Callable[[torch.nn.Module], torch.Tensor]):
    """The (2P,) log-probabilities ``logps_fn(model)`` and the LoRA gradients of their sum."""
    model.zero_grad()
    logps = logps_fn(model)
    logps.sum().backward()
    return logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("name", MODELS)
def test_packed_pairs_give_the_logps_of_separate_runs(name):
    model = lora_model(name)
    examples = random_pairs()
    collate_fn = pair_collate_fn(model, pad_id=0)
    # Two pairs packed in one row, one in another (padded): four documents must not see each other.
    packed = logps_and_grads(model, lambda m: sequence_logps(m, collate_fn([examples[:2], examples[2:]]), 6))
    alone = logps_and_grads(model, lambda m: separate_logps(m, examples))
    gold = logps_and_grads(fp64_copy(model), lambda m: separate_logps(m, examples))
    # fp32 summation order, not a fixed atol: see tests/tolerance.py
    assert_as_accurate(packed[0], alone[0], gold[0], name="logps")
    assert_as_accurate(packed[1], alone[1], gold[1], name="grad")


def test_reference_is_the_base_without_adapter():
    examples = random_pairs(seed=1)
    model = lora_model(b_scale=0.5)
    model.train()  # reference_logps switches dropout off and restores training mode
    ref = reference_logps(model, examples, pair_collate_fn(model, 0), batch_size=2, show_progress=False)
    assert model.training
    base = tiny_gemma3(seed=0)  # the same weights, never wrapped
    torch.testing.assert_close(ref, separate_logps(base, examples).detach().view(-1, 2), rtol=1e-5, atol=1e-4)
    with torch.no_grad():
        policy = separate_logps(model, examples).view(-1, 2)
    assert (policy - ref).abs().max() > 1e-2  # the adapter does change the outputs: the test can fail


def test_reference_cache_is_reused_and_keyed(tmp_path, monkeypatch):
    import gemma_lowmem.dpo as dpo

    examples = random_pairs(seed=2)
    model = lora_model()
    collate_fn = pair_collate_fn(model, 0)
    settings = {"model": "tiny", "precision": "fp32"}
    first, hit = cached_reference_logps(model, examples, collate_fn, cache_dir=tmp_path, settings=settings,
                                        show_progress=False)
    assert not hit and len(list(tmp_path.glob("ref-logps-*.pt"))) == 1
    calls = []
    monkeypatch.setattr(dpo, "reference_logps", lambda *a, **k: calls.append(1) or torch.zeros(len(examples), 2))
    again, hit = cached_reference_logps(model, examples, collate_fn, cache_dir=tmp_path, settings=settings)
    assert hit and not calls and torch.equal(first, again)
    # Other settings or other tokens: a new computation.
    cached_reference_logps(model, examples, collate_fn, cache_dir=tmp_path, settings={**settings, "model": "x"})
    cached_reference_logps(model, examples[:2], collate_fn, cache_dir=tmp_path, settings=settings)
    assert len(calls) == 2


def test_step_metrics_at_start_and_shapes():
    model = lora_model()
    examples = random_pairs(seed=4)
    collate_fn = pair_collate_fn(model, 0)
    ref = reference_logps(model, examples, collate_fn, show_progress=False)
    batch = collate_fn([[ex] for ex in with_reference(examples, ref)])
    loss, metrics = make_dpo_loss(beta=0.1)(model, batch)
    assert set(metrics) == set(METRICS) and all(v.dim() == 0 for v in metrics.values())
    policy = separate_logps(model, examples).detach().view(-1, 2)
    # Sums over the 3 pairs, by hand from the same log-probabilities.
    h = (policy[:, 0] - ref[:, 0]) - (policy[:, 1] - ref[:, 1])
    torch.testing.assert_close(loss.detach(), -torch.nn.functional.logsigmoid(0.1 * h).sum(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(metrics["margin"], (0.1 * h).sum(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(metrics["chosen_logp"], policy[:, 0].sum(), rtol=1e-5, atol=1e-4)
    assert metrics["reward_accuracy"].item() == (h > 0).sum().item()
    kl = 0.5 * ((policy - ref) ** 2).mean(dim=1).sum()
    torch.testing.assert_close(metrics["kl"], kl, rtol=1e-4, atol=1e-4)


# ---- learning a preference with the loop ----------------------------------------------------------------------------


def toy_pairs(n: int, seed: int) -> list[dict]:
    """Random prompts; the chosen answer is always pattern A, the rejected one pattern B (separable)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        prompt = torch.randint(20, VOCAB, (int(torch.randint(4, 12, (1,), generator=g)),), generator=g).tolist()
        good, bad = [7, 8, 9, 10, 11, 12], [13, 14, 15, 16, 17, 18]
        out.append(pair_example({"input_ids": prompt + good, "labels": [IGNORE_INDEX] * len(prompt) + good},
                                {"input_ids": prompt + bad, "labels": [IGNORE_INDEX] * len(prompt) + bad}))
    return out


def test_fit_learns_a_separable_preference(tmp_path):
    model = add_lora(tiny_gemma3(), LoraConfig(r=8, alpha=16, dropout=0.0), gradient_checkpointing=True)
    collate_fn = pair_collate_fn(model, 0)
    train, held = toy_pairs(32, seed=0), toy_pairs(8, seed=1)
    refs = reference_logps(model, train + held, collate_fn, show_progress=False)
    train, held = with_reference(train, refs[:32]), with_reference(held, refs[32:])
    loss_fn = make_dpo_loss(beta=0.5)
    before = evaluate_pairs(model, held, collate_fn, loss_fn)
    cfg = TrainConfig(max_steps=8, lr=1e-2, batch_size=2, grad_accum=1, eval_every=0, save_every=0,
                      packing=True, pack_len=48, warmup_ratio=0.0, precision="fp32")
    result = fit(model, train, [], cfg, run_dir=tmp_path, loss_fn=loss_fn, collate_fn=collate_fn,
                 show_progress=False)
    after = evaluate_pairs(model, held, collate_fn, loss_fn)
    history = [r for r in result.history if "reward_accuracy" in r]
    # Before training the adapter is the identity (B = 0): policy == reference up to float noise, loss log 2.
    # (Reward accuracy is then decided by that noise, so it is not asserted.)
    assert history[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert before["loss"] == pytest.approx(math.log(2), abs=1e-4) and abs(before["margin"]) < 1e-3
    assert after["reward_accuracy"] == 1.0 and after["margin"] > 1.0, after
    assert after["loss"] < 0.3 and history[-1]["reward_accuracy"] == 1.0
    assert after["chosen_logp"] - after["rejected_logp"] > before["chosen_logp"] - before["rejected_logp"] + 2
