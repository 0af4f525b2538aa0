"""Tiny random Gemma-shaped models for fast tests (2 layers, hidden 64, vocab 1000)."""

from __future__ import annotations

import torch
from transformers import Gemma3ForCausalLM, Gemma3nForCausalLM, Gemma3nTextConfig, Gemma3TextConfig

VOCAB = 1000


def gemma3_config(layers: int = 2, **overrides) -> Gemma3TextConfig:
    kw = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8,
        max_position_embeddings=512, pad_token_id=0, bos_token_id=2, eos_token_id=1,
        layer_types=["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(layers)],
    )
    kw.update(overrides)
    return Gemma3TextConfig(**kw)


def gemma3n_config(layers: int = 4, **overrides) -> Gemma3nTextConfig:
    kw = dict(
        vocab_size=VOCAB, vocab_size_per_layer_input=VOCAB, hidden_size=64, hidden_size_per_layer_input=8,
        intermediate_size=[128] * layers, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, sliding_window=8, max_position_embeddings=512, num_kv_shared_layers=2, laurel_rank=4,
        altup_num_inputs=2, activation_sparsity_pattern=[0.0] * layers, pad_token_id=0, bos_token_id=2,
        eos_token_id=1, layer_types=["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(layers)],
    )
    kw.update(overrides)
    return Gemma3nTextConfig(**kw)


def tiny_gemma3(seed: int = 0, **overrides) -> Gemma3ForCausalLM:
    torch.manual_seed(seed)
    return Gemma3ForCausalLM(gemma3_config(**overrides)).eval()


def tiny_gemma3n(seed: int = 0, **overrides) -> Gemma3nForCausalLM:
    torch.manual_seed(seed)
    return Gemma3nForCausalLM(gemma3n_config(**overrides)).eval()


SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]  # ids 0-5, as in tiny configs


def tiny_tokenizer(chat_template: str | None = None):
    """A byte-level tokenizer (any text, Korean included; 262 ids) with Gemma's special tokens and no merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIAL + sorted(alphabet))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        additional_special_tokens=["<start_of_turn>", "<end_of_turn>"],
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def news_record(i: int) -> dict:
    """A short CNN/DailyMail-shaped row (``id``, ``article``, ``highlights`` in the data set's own form), made up."""
    return {"id": f"r{i}",
            "article": f"The council of Town{i} voted on Tuesday to build {i + 3} new bridges. The plan costs "
                       f"{i + 1} million dollars. Work starts in spring. Residents welcomed the news.",
            "highlights": f"Town{i} council voted to build {i + 3} bridges .\nThe plan costs {i + 1} million dollars ."}
