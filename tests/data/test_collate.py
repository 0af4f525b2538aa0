"""Collation: shapes, pads and label masking; and a packed row of documents equals the documents run one by one
(logits, summed loss, LoRA gradients) on tiny Gemma 3 and Gemma 3n under sdpa, eager and per-document attention."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model

from gemma_lowmem.attention import PACKED_SDPA, register
from gemma_lowmem.data.collate import IGNORE_INDEX, attention_settings, collate, collate_for
from tests.tiny import VOCAB, gemma3_config, tiny_gemma3, tiny_gemma3n
from tests.tolerance import assert_as_accurate, fp64_copy

DOC_LENGTHS = (13, 21, 10)  # unequal and all longer than the tiny models' sliding window of 8, so the window matters


def make_doc(n: int, prompt: int, gen: torch.Generator) -> dict:
    ids = torch.randint(3, VOCAB, (n,), generator=gen).tolist()
    return {"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]}


def make_docs(seed: int = 0) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    return [make_doc(n, prompt, gen) for n, prompt in zip(DOC_LENGTHS, (4, 0, 2))]  # doc 1 has a label at its start


# ---- shapes, pads, labels ------------------------------------------------------------------------------------------


def test_unpacked_pads_right_and_masks_labels() -> None:
    a = {"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8]}
    b = {"input_ids": [9, 10], "labels": [9, 10]}
    batch = collate([[a], [b]], pad_id=0, packed=False)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [9, 10, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 7, 8], [-100, 10, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["attention_mask"].dtype == torch.long
    assert "position_ids" not in batch  # the model counts positions itself; right padding keeps them right
    assert batch["num_loss_tokens"].item() == 3 and batch["num_tokens"].item() == 6


def test_packed_positions_labels_and_counts() -> None:
    a = {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}
    b = {"input_ids": [8, 9], "labels": [8, 9]}
    c = {"input_ids": [4, 3, 2, 1], "labels": [-100, -100, 2, 1]}
    batch = collate([[a, b], [c]], pad_id=0, packed=True, sliding_window=2)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [4, 3, 2, 1, 0]]
    # b's first label (8) would be predicted from a's last token: it must not count.
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9], [-100, -100, 2, 1, -100]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    assert batch["num_loss_tokens"].item() == 5 and batch["num_tokens"].item() == 9
    full, sliding = batch["attention_mask"]["full_attention"], batch["attention_mask"]["sliding_attention"]
    assert full.dtype == torch.bool and full.shape == (2, 1, 5, 5)
    assert full[0, 0, 3].tolist() == [False, False, False, True, False]  # b's first token sees only itself
    assert full[0, 0, 2].tolist() == [True, True, True, False, False]
    assert sliding[0, 0, 2].tolist() == [False, True, True, False, False]  # window 2: keys q-1 and q
    assert full[1, 0, 4].tolist() == [True] * 5  # a pad sees the row up to itself; no real token sees it


def test_eager_masks_take_mask_dtype() -> None:
    a = {"input_ids": [5, 6, 7], "labels": [5, 6, 7]}
    batch = collate([[a, a]], pad_id=0, packed=True, sliding_window=2, attn_implementation="eager",
                    mask_dtype=torch.bfloat16)
    assert batch["attention_mask"]["full_attention"].dtype == torch.bfloat16
    # no sliding layers (Llama-shaped): one (B, 1, T, T) mask, as such models take it
    single = collate([[a, a]], pad_id=0, packed=True, attn_implementation="eager", mask_dtype=torch.bfloat16)
    torch.testing.assert_close(single["attention_mask"], batch["attention_mask"]["full_attention"])


def test_packed_sdpa_batches_carry_document_ids() -> None:
    a = {"input_ids": [5, 6, 7], "labels": [5, 6, 7]}
    batch = collate([[a, a], [a]], pad_id=0, packed=True, sliding_window=2, attn_implementation=PACKED_SDPA)
    mask = batch["attention_mask"]
    assert set(mask) == {"full_attention", "sliding_attention"}
    assert mask["full_attention"].tolist() == [[0, 0, 0, 1, 1, 1], [0, 0, 0, -1, -1, -1]]
    assert mask["sliding_attention"] is mask["full_attention"]  # each layer applies its own window


def test_rejects_bad_rows() -> None:
    a = {"input_ids": [5, 6], "labels": [5, 6]}
    with pytest.raises(ValueError, match="row 0 holds 2 examples"):
        collate([[a, a]], pad_id=0, packed=False)
    with pytest.raises(ValueError, match="row 1, example 0"):
        collate([[a], [{"input_ids": [1, 2], "labels": [1]}]], pad_id=0, packed=False)
    with pytest.raises(ValueError, match="row 0 holds no example"):
        collate([[]], pad_id=0, packed=True)


def test_collate_for_reads_the_model_config() -> None:
    """Window, layer layout and attention implementation, a multimodal config's nested text_config included."""
    gemma = tiny_gemma3()
    assert attention_settings(gemma) == {"sliding_window": 8, "attn_implementation": "sdpa"}
    gemma.config._attn_implementation = "eager"
    batch = collate_for(gemma, pad_id=0, packed=True)([make_docs()])
    expected = collate([make_docs()], pad_id=0, packed=True, sliding_window=8, attn_implementation="eager")
    assert batch.keys() == expected.keys()
    for kind in ("full_attention", "sliding_attention"):
        assert torch.equal(batch["attention_mask"][kind], expected["attention_mask"][kind])
    full_only = torch.nn.Module()
    full_only.config = gemma3_config(layer_types=["full_attention"] * 2)  # names a window, has no sliding layer
    assert attention_settings(full_only)["sliding_window"] is None
    nested = torch.nn.Module()
    nested.config = type("MultimodalConfig", (), {"text_config": gemma3_config(), "_attn_implementation": None})()
    assert attention_settings(nested) == {"sliding_window": 8, "attn_implementation": "sdpa"}
    assert attention_settings(torch.nn.Module()) == {"sliding_window": None, "attn_implementation": "sdpa"}


# ---- packed == one by one on tiny Gemma models --------------------------------------------------------------------


def summed_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The loop's objective before normalisation: position t predicts labels[t + 1] (at least fp32; fp64 stays)."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")


def packed_batch(model: torch.nn.Module, docs: list[dict], implementation: str) -> dict:
    # Row 0 packs all three documents; row 1 packs two of them and has a pad tail, so pads and B > 1 are exercised.
    return collate([docs, docs[1:]], pad_id=0, packed=True, sliding_window=model.config.sliding_window,
                   attn_implementation=implementation)


def forward(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    # use_cache=False as in training; the dict mask does not depend on it.
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 position_ids=batch.get("position_ids"), use_cache=False).logits


def test_loss_weights_ride_along_packed_and_count_in_num_loss_tokens() -> None:
    a = {"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "loss_weights": [1, 1, 4]}
    b = {"input_ids": [8, 9], "labels": [8, 9]}  # no weights: each token once
    batch = collate([[a, b]], pad_id=0, packed=True, sliding_window=2)
    assert batch["loss_weights"].tolist() == [[1, 1, 4, 1, 1]]
    assert batch["num_loss_tokens"].item() == 1 + 4 + 1  # labels 6, 7 (x4) and 9; b's first label never counts
    assert "loss_weights" not in collate([[b]], pad_id=0, packed=True, sliding_window=2)


register()  # the tiny models below are built with attn_implementation=PACKED_SDPA
MODELS = {"gemma3": tiny_gemma3, "gemma3n": tiny_gemma3n}
CASES = [(name, impl) for name in MODELS for impl in ("sdpa", "eager", PACKED_SDPA)]


def one_by_one_logits(model: torch.nn.Module, docs: list[dict]) -> list[torch.Tensor]:
    """Each document run alone, unpadded: (n, V) logits each."""
    return [model(input_ids=torch.tensor([d["input_ids"]])).logits[0] for d in docs]


# Packed and one-by-one runs sum in other orders and matrix shapes: each comparison below allows a small factor of
# the one-by-one run's own fp32 error against the same model in fp64, measured here (tests/tolerance.py).


@pytest.mark.parametrize(("name", "implementation"), CASES)
def test_packed_logits_and_loss_equal_one_by_one(name: str, implementation: str) -> None:
    model = MODELS[name](attn_implementation=implementation)
    docs = make_docs()
    batch = packed_batch(model, docs, implementation)
    with torch.no_grad():
        packed = forward(model, batch)  # (2, T, V)
        singles = one_by_one_logits(model, docs)
        golds = one_by_one_logits(fp64_copy(model), docs)
    assert torch.isfinite(packed).all()  # pad rows included
    for row, first in ((0, 0), (1, 1)):  # row 0 packs all documents, row 1 the last two
        start = 0
        for doc, single, gold in zip(docs[first:], singles[first:], golds[first:]):
            n = len(doc["input_ids"])
            assert_as_accurate(packed[row, start : start + n], single, gold, name=f"row {row} logits at {start}")
            start += n
    labels = [torch.tensor([d["labels"]]) for d in docs]
    reference = sum(summed_loss(s[None], y) for s, y in zip(singles, labels))
    gold = sum(summed_loss(g[None], y) for g, y in zip(golds, labels))
    assert_as_accurate(summed_loss(packed[:1], batch["labels"][:1]), reference, gold, name="loss")
    loss_tokens = sum(t != IGNORE_INDEX for d in [*docs, *docs[1:]] for t in d["labels"][1:])
    assert batch["num_loss_tokens"].item() == loss_tokens


@pytest.mark.parametrize(("name", "implementation"), CASES)
def test_packed_lora_gradients_equal_one_by_one(name: str, implementation: str) -> None:
    model = get_peft_model(
        MODELS[name](attn_implementation=implementation),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    lora = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in n for n in lora)
    docs = make_docs(seed=2)
    batch = packed_batch(model, docs, implementation)

    # Row 1's pad tail is the NaN trap on Gemma 3n: a pad that saw only pads would keep a zero hidden state.
    packed_loss = summed_loss(forward(model, batch), batch["labels"])
    packed_grads = dict(zip(lora, torch.autograd.grad(packed_loss, list(lora.values()))))

    def one_by_one(model: torch.nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        loss = sum(  # row 0 holds all documents, row 1 the last two
            summed_loss(model(input_ids=torch.tensor([d["input_ids"]])).logits, torch.tensor([d["labels"]]))
            for d in [*docs, *docs[1:]]
        )
        return loss, dict(zip(params, torch.autograd.grad(loss, list(params.values()))))

    single_loss, single_grads = one_by_one(model)
    gold_loss, gold_grads = one_by_one(fp64_copy(model))

    assert_as_accurate(packed_loss, single_loss, gold_loss, name="loss")
    for n, g in single_grads.items():
        assert g.abs().max() > 0, n  # B != 0, so every LoRA factor gets a gradient
    assert_as_accurate(packed_grads, single_grads, gold_grads, name="grad")


@pytest.mark.parametrize(("name", "implementation"), CASES)
def test_unpacked_padded_batch_equals_one_by_one(name: str, implementation: str) -> None:
    """Right padding longer than the sliding window: real-token logits, loss and LoRA gradients are unchanged."""
    model = get_peft_model(
        MODELS[name](attn_implementation=implementation),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    gen = torch.Generator().manual_seed(3)
    docs = [make_doc(30, 5, gen), make_doc(6, 2, gen)]  # row 1 gets a 24-token pad tail
    batch = collate([[d] for d in docs], pad_id=0, packed=False)
    labels = [torch.tensor([d["labels"]]) for d in docs]

    def grads(model: torch.nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor]:
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        return dict(zip(params, torch.autograd.grad(loss, list(params.values()))))

    logits = forward(model, batch)
    singles = one_by_one_logits(model, docs)
    gold_model = fp64_copy(model)
    golds = one_by_one_logits(gold_model, docs)
    for b, (doc, single, gold) in enumerate(zip(docs, singles, golds)):
        assert_as_accurate(logits[b, : len(doc["input_ids"])], single, gold, name=f"row {b} logits")
    loss = summed_loss(logits, batch["labels"])
    reference = sum(summed_loss(s[None], y) for s, y in zip(singles, labels))
    gold = sum(summed_loss(g[None], y) for g, y in zip(golds, labels))
    assert_as_accurate(loss, reference, gold, name="loss")
    assert_as_accurate(grads(model, loss), grads(model, reference), grads(gold_model, gold), name="grad")


@pytest.mark.parametrize("name", MODELS)
def test_packed_sdpa_unpacked_and_generation_equal_sdpa(name: str) -> None:
    """Without document ids (padded batches, generation with a cache) PACKED_SDPA is transformers' sdpa."""
    sdpa, ours = MODELS[name](attn_implementation="sdpa"), MODELS[name](attn_implementation=PACKED_SDPA)
    gen = torch.Generator().manual_seed(4)
    docs = [make_doc(30, 5, gen), make_doc(6, 2, gen)]  # row 1 gets a 24-token pad tail
    batch = collate([[d] for d in docs], pad_id=0, packed=False)
    with torch.no_grad():
        torch.testing.assert_close(forward(ours, batch), forward(sdpa, batch), atol=0, rtol=0)
        prompt = torch.tensor([docs[0]["input_ids"]])
        kwargs = dict(max_new_tokens=12, do_sample=False, output_scores=True, return_dict_in_generate=True)
        out_sdpa, out_ours = sdpa.generate(prompt, **kwargs), ours.generate(prompt, **kwargs)
    assert torch.equal(out_ours.sequences, out_sdpa.sequences)
    torch.testing.assert_close(torch.stack(out_ours.scores), torch.stack(out_sdpa.scores), atol=0, rtol=0)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_controls_that_must_fail(implementation: str) -> None:
    """Without the per-layer-type masks, packed logits differ: the equality tests above can fail."""
    model = tiny_gemma3(attn_implementation=implementation)
    docs = make_docs()
    batch = packed_batch(model, docs, implementation)
    with torch.no_grad():
        good = forward(model, batch)
        # Restarting positions with a 2D padding mask: documents see each other.
        two_d = model(input_ids=batch["input_ids"], attention_mask=(batch["input_ids"] != 0).long(),
                      position_ids=batch["position_ids"], use_cache=False).logits
        # One mask for every layer: the sliding layers lose their window.
        full = batch["attention_mask"]["full_attention"]
        one_mask = forward(model, {**batch, "attention_mask": {"full_attention": full, "sliding_attention": full}})
    later = slice(DOC_LENGTHS[0], sum(DOC_LENGTHS))  # the 2nd and 3rd documents of row 0
    assert (two_d[0, later] - good[0, later]).abs().max() > 1e-2
    assert (one_mask[0] - good[0]).abs().max() > 1e-2
