"""The loop on tiny random Gemma 3 / Gemma 3n models: convergence, recompute parity, accumulation, resume, adapter."""

from __future__ import annotations

import json
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel

from gemma_lowmem.config import LoraConfig, TrainConfig
from gemma_lowmem.data.collate import IGNORE_INDEX, collate, collate_for
from gemma_lowmem.device import resolve_precision
from gemma_lowmem.loss import model_inputs, sft_loss, token_losses
from gemma_lowmem.memory import BudgetTooSmall
from gemma_lowmem.model import add_lora
from gemma_lowmem.train import FitResult, backward_window, fit, lr_factor, more_splits, split_rows
from tests.tiny import tiny_gemma3, tiny_gemma3n
from tests.tolerance import assert_as_accurate, fp64_copy

MODELS = {"gemma3": tiny_gemma3, "gemma3n": tiny_gemma3n}


def examples(n: int, seed: int = 0, vocab: int = 40) -> list[dict[str, list[int]]]:
    """Unequal-length examples: random prompts, then a fixed answer pattern (learnable, so the loss can fall)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        prompt_len = int(torch.randint(6, 20, (1,), generator=g))
        prompt = torch.randint(6, vocab, (prompt_len,), generator=g).tolist()
        answer = [7, 8, 9, 10] * 3  # the same answer everywhere: an easy pattern
        answer = answer[: int(torch.randint(5, 12, (1,), generator=g))]
        out.append({"input_ids": prompt + answer, "labels": [-100] * prompt_len + answer})
    return out


def lora_model(name: str, checkpointing: bool = False, seed: int = 0) -> torch.nn.Module:
    model = add_lora(MODELS[name](seed=seed), LoraConfig(r=4, alpha=8, dropout=0.0), checkpointing)
    g = torch.Generator().manual_seed(seed + 1)
    for pname, p in model.named_parameters():
        if "lora_B" in pname:  # B = 0 at init would make every LoRA-A gradient zero: nothing to compare
            p.data = torch.randn(p.shape, generator=g) * 0.1
    return model


def fit_sft(model: torch.nn.Module, train: list, val: list, cfg: TrainConfig, **kwargs) -> FitResult:
    """``fit`` with the SFT collate that ``run.py`` gives it (pad id 0: the tiny tokenizer's)."""
    return fit(model, train, val, cfg, collate_fn=collate_for(model, pad_id=0, packed=cfg.packing), **kwargs)


def lora_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("name", MODELS)
def test_loss_falls(name, tmp_path):
    model = add_lora(MODELS[name](), LoraConfig(r=8, alpha=16, dropout=0.0), gradient_checkpointing=True)
    cfg = TrainConfig(max_steps=20, lr=1e-2, batch_size=2, grad_accum=2, eval_every=0, save_every=0,
                      packing=False, warmup_ratio=0.0)
    result = fit_sft(model, examples(24), [], cfg, run_dir=tmp_path, show_progress=False)
    losses = [r["loss"] for r in result.history if "loss" in r]
    assert len(losses) == 20
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5, losses


@pytest.mark.parametrize("name", MODELS)
def test_checkpointing_gives_same_loss_and_grads(name):
    batch = collate([[e] for e in examples(3, seed=1)], pad_id=0, packed=False)
    results = []
    for checkpointing in (False, True):
        model = lora_model(name, checkpointing)
        model.train()  # checkpointing is active in training mode only
        loss = sft_loss(model, batch)
        loss.backward()
        results.append((loss.detach(), lora_grads(model)))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 0
    for key in grads_a:
        torch.testing.assert_close(grads_a[key], grads_b[key], rtol=1e-5, atol=1e-6)


def full_logits_loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """``sft_loss(chunked=False)`` in the logits' own dtype (it rounds them to fp32): the fp64 gold's loss."""
    logits = model(**model_inputs(batch), use_cache=False).logits[:, :-1]  # (B, T-1, V)
    labels = batch["labels"][:, 1:]
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


@pytest.mark.parametrize("name", MODELS)
def test_chunked_loss_matches_full_logits(name):
    batch = collate([[e] for e in examples(3, seed=2)], pad_id=0, packed=False)

    def loss_and_grads(model: torch.nn.Module, loss_fn) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss = loss_fn(model, batch)
        loss.backward()
        return loss.detach(), lora_grads(model)

    chunked = loss_and_grads(lora_model(name), partial(sft_loss, chunked=True, chunk_size=5))
    full = loss_and_grads(lora_model(name), partial(sft_loss, chunked=False))
    gold = loss_and_grads(fp64_copy(lora_model(name)), full_logits_loss)
    # another summation order, not another precision: a small factor of the full-logits path's own fp32 error
    assert_as_accurate(chunked[0], full[0], gold[0], name="loss")
    assert_as_accurate(chunked[1], full[1], gold[1], name="grad")


def test_loss_weights_give_the_weighted_mean_objective():
    data = examples(3, seed=4)
    # The answer's 9s count three times (as a rubric's score tokens would with score_loss_weight=3).
    weighted = [{**e, "loss_weights": [3 if t == 9 else 1 for t in e["input_ids"]]} for e in data]
    batch = collate([[e] for e in weighted], pad_id=0, packed=False)
    plain = collate([[e] for e in data], pad_id=0, packed=False)
    model = lora_model("gemma3")
    with torch.no_grad():
        per_token = token_losses(model, plain)  # (B, T-1), unweighted, 0 where no label
        weights = batch["loss_weights"][:, 1:] * (batch["labels"][:, 1:] != -100)
        expected = (per_token * weights).sum() / weights.sum()
        torch.testing.assert_close(sft_loss(model, batch) / batch["num_loss_tokens"], expected)
        assert batch["num_loss_tokens"] > plain["num_loss_tokens"]  # the weights did count
        assert not torch.isclose(expected, sft_loss(model, plain) / plain["num_loss_tokens"])


def test_accumulation_split_does_not_change_gradients():
    data = examples(4, seed=3)  # unequal lengths: per-micro-batch means would weight them differently
    precision = resolve_precision(torch.device("cpu"), "fp32")
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    collate_fn = partial(collate, pad_id=0, packed=False)
    grads, losses = [], []
    whole, split = [collate_fn([[e] for e in data])], [collate_fn([[e]]) for e in data]
    for window, fp64 in ((whole, False), (split, False), (whole, True)):
        model = fp64_copy(lora_model("gemma3")) if fp64 else lora_model("gemma3")
        loss, tokens, _ = backward_window(model, window, sft_loss, precision, scaler, torch.device("cpu"))
        losses.append(loss / tokens)
        grads.append(lora_grads(model))
    # padded rows and single rows sum in other orders: a small factor of the whole window's own fp32 error
    # (the window's loss is summed in fp32 even for the fp64 gold: one rounding, within the floor)
    assert_as_accurate(losses[1], losses[0], losses[2].double(), name="loss")
    assert_as_accurate(grads[1], grads[0], grads[2], name="grad")


def test_resume_gives_the_same_losses(tmp_path):
    cfg = TrainConfig(max_steps=6, lr=5e-3, batch_size=2, grad_accum=2, eval_every=0, save_every=3,
                      keep_checkpoints=5, packing=True, pack_len=64)
    data = examples(20, seed=4)
    lora = LoraConfig(r=4, alpha=8, dropout=0.1)  # dropout: the RNG state must be restored too
    torch.manual_seed(0)
    full = fit_sft(add_lora(tiny_gemma3(), lora, True), data, [], cfg, run_dir=tmp_path / "a", show_progress=False)
    torch.manual_seed(123)  # a different adapter init and RNG: resume must restore both
    cfg_resume = TrainConfig(**{**cfg.__dict__, "resume": str(tmp_path / "a" / "checkpoints" / "step-000003")})
    resumed = fit_sft(add_lora(tiny_gemma3(), lora, True), data, [], cfg_resume, run_dir=tmp_path / "b",
                      show_progress=False)
    losses_full = [r["loss"] for r in full.history]
    losses_resumed = [r["loss"] for r in resumed.history]
    assert len(losses_full) == 6 and len(losses_resumed) == 3
    assert losses_resumed == pytest.approx(losses_full[3:], rel=1e-6)
    assert resumed.final_loss == pytest.approx(full.final_loss, rel=1e-6)
    # killed after the final checkpoint but before the summary: resuming there trains nothing, same summary
    cfg_end = TrainConfig(**{**cfg.__dict__, "resume": str(tmp_path / "a" / "checkpoints" / "step-000006")})
    at_end = fit_sft(add_lora(tiny_gemma3(), lora, True), data, [], cfg_end, run_dir=tmp_path / "c",
                     show_progress=False)
    assert (at_end.steps, at_end.final_loss) == (full.steps, full.final_loss)


def test_saved_adapter_loads_with_peft_and_gives_same_logits(tmp_path):
    model = add_lora(tiny_gemma3(), LoraConfig(r=4, alpha=8, dropout=0.0), False)
    cfg = TrainConfig(max_steps=3, lr=1e-2, eval_every=0, save_every=0, packing=False)
    fit_sft(model, examples(8), [], cfg, run_dir=tmp_path, show_progress=False)
    ids = torch.tensor([examples(1, seed=9)[0]["input_ids"]])
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        loaded = PeftModel.from_pretrained(tiny_gemma3(), str(tmp_path / "adapter"))
        got = loaded(input_ids=ids).logits
        untrained = tiny_gemma3()(input_ids=ids).logits
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(untrained, expected)  # training changed something, so the comparison means something
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 3 and (tmp_path / "loss_curve.png").is_file()
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) >= 3


def test_validation_and_early_stopping(tmp_path):
    model = add_lora(tiny_gemma3(), LoraConfig(r=4, alpha=8, dropout=0.0), False)
    # lr so high that validation loss stops improving quickly
    cfg = TrainConfig(max_steps=40, lr=0.5, eval_every=1, early_stopping_patience=2, save_every=0, packing=False,
                      warmup_ratio=0.0, scheduler="constant")
    result = fit_sft(model, examples(8), examples(4, seed=7), cfg, run_dir=tmp_path, show_progress=False)
    assert result.stopped == "early_stopping" and result.steps < 40
    assert (tmp_path / "adapter_best" / "adapter_config.json").is_file()
    val = [r["val_loss"] for r in result.history if "val_loss" in r]
    assert result.best_val_loss == pytest.approx(min(val))


def test_lr_schedule_shape():
    factors = [lr_factor(s, total=100, warmup=10, kind="cosine") for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
    assert factors[-1] < 0.01
    assert lr_factor(50, total=100, warmup=0, kind="linear") == pytest.approx(0.5)


def oom_above(rows: int):
    """An SFT loss that runs out of memory on micro-batches of more than ``rows`` rows, as a capped GPU would."""
    def loss_fn(model, batch):
        if batch["input_ids"].shape[0] > rows:
            torch.empty(1024)  # some work before the failure, as in a real forward
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return sft_loss(model, batch)
    return loss_fn


def test_out_of_memory_halves_the_micro_batch_and_keeps_the_objective(tmp_path):
    cfg = TrainConfig(max_steps=3, lr=5e-3, batch_size=4, grad_accum=2, eval_every=0, save_every=0, packing=False,
                      precision="fp32")  # exact arithmetic: under bf16 autocast a split changes rounding
    data = examples(24, seed=5)
    runs = {}
    for name, loss_fn in (("plain", None), ("oom", oom_above(1))):
        model = lora_model("gemma3")
        runs[name] = fit_sft(model, data, [], cfg, run_dir=tmp_path / name, loss_fn=loss_fn, show_progress=False)
    losses = {k: [r["loss"] for r in run.history if "loss" in r] for k, run in runs.items()}
    assert len(losses["oom"]) == 3
    assert losses["oom"] == pytest.approx(losses["plain"], rel=1e-5)  # same rows, same objective
    assert runs["oom"].loss_tokens == runs["plain"].loss_tokens
    events = [r for r in runs["oom"].history if r.get("out_of_memory")]
    assert [(e["step"], e["micro_batch_rows"]) for e in events] == [(1, 2), (1, 1)]  # 4 -> 2 -> 1, then it fits


def test_out_of_memory_with_one_row_stops_with_a_clear_error(tmp_path):
    cfg = TrainConfig(max_steps=2, batch_size=1, grad_accum=1, eval_every=0, save_every=0, packing=False)
    with pytest.raises(BudgetTooSmall, match="one row"):
        fit_sft(lora_model("gemma3"), examples(4), [], cfg, run_dir=tmp_path, loss_fn=oom_above(0),
                show_progress=False)


def test_split_rows_and_more_splits():
    assert split_rows([1, 2, 3, 4, 5], 2) == [[1, 2, 3], [4, 5]]
    assert split_rows([1, 2], 4) == [[1], [2]]
    assert more_splits(1, 4) == 2 and more_splits(2, 3) == 3
    with pytest.raises(BudgetTooSmall):
        more_splits(3, 3)
