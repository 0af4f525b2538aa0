"""The loop on causal LMs other than Gemma: tiny random Llama- and Qwen2-shaped models, loaded in int8 through
``load_base_model`` (per-document packed attention, the int8 skip list), trained with packing, and the packed
loss equal to the documents run one by one."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from gemma_lowmem.config import LoraConfig, ModelConfig, TrainConfig
from gemma_lowmem.data.collate import collate, collate_for
from gemma_lowmem.loss import sft_loss
from gemma_lowmem.model import add_lora, load_base_model
from gemma_lowmem.train import fit
from tests.tiny import VOCAB, tiny_tokenizer

SHAPE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0, bos_token_id=2, eos_token_id=1)
FAMILIES = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**SHAPE, head_dim=16)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**SHAPE, tie_word_embeddings=True)),
}


@pytest.fixture(params=list(FAMILIES))
def model_dir(request, tmp_path):
    torch.manual_seed(0)
    FAMILIES[request.param]().save_pretrained(tmp_path / request.param)
    tiny_tokenizer().save_pretrained(tmp_path / request.param)
    return tmp_path / request.param


def _docs(lengths: list[int], seed: int = 0) -> list[dict[str, list[int]]]:
    gen = torch.Generator().manual_seed(seed)
    return [{"input_ids": (ids := torch.randint(6, VOCAB, (n,), generator=gen).tolist()), "labels": ids}
            for n in lengths]


def test_packed_rows_give_the_loss_of_the_documents_one_by_one(model_dir):
    model = load_base_model(ModelConfig(model=str(model_dir), quant="int8", dtype="fp32"), torch.device("cpu"),
                            "fp32")
    impl = model.config._attn_implementation
    docs = _docs([9, 17, 5])
    packed = sft_loss(model, collate([docs], pad_id=0, packed=True, attn_implementation=impl))
    alone = sum(sft_loss(model, collate([[d]], pad_id=0, packed=False)) for d in docs)
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-4)


def test_lora_training_on_packed_rows_lowers_the_loss(model_dir, tmp_path):
    base = load_base_model(ModelConfig(model=str(model_dir), quant="int8"), torch.device("cpu"), "fp32")
    model = add_lora(base, LoraConfig(r=8, alpha=16), gradient_checkpointing=True)
    data = _docs([12, 20, 7, 30, 16, 9, 25, 11] * 2, seed=1)
    cfg = TrainConfig(max_steps=12, lr=1e-2, batch_size=1, grad_accum=1, eval_every=0, save_every=0, packing=True,
                      pack_len=64, warmup_ratio=0.0, precision="fp32")
    result = fit(model, data, [], cfg, run_dir=tmp_path / "run", collate_fn=collate_for(model, pad_id=0, packed=True),
                 show_progress=False)
    losses = [r["loss"] for r in result.history if "loss" in r]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
