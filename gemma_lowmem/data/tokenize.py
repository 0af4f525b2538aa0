"""Conversations -> token examples ``{"input_ids", "labels"}`` with loss on the final assistant turn only.

The tokenizer's chat template is used when it has one; otherwise (the bundled Gemma 3 270M GGUF has none) Gemma's
turn format. Gemma has no system role: with ``system_role=False`` the system text is folded into the first user turn.
Tokenized sets are cached on disk, keyed by tokenizer, template, settings and data.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from gemma_lowmem.data.conversation import Conversation, Message
from gemma_lowmem.errors import UserError
from gemma_lowmem.text import cut_at_sentence_end

IGNORE_INDEX = -100
GEMMA_ROLES = {"user": "user", "assistant": "model"}


def fold_system(messages: list[Message]) -> list[Message]:
    """Merge a leading system message into the first user turn (for templates without a system role)."""
    if not messages or messages[0]["role"] != "system":
        return list(messages)
    system, rest = messages[0]["content"], list(messages[1:])
    if not rest or rest[0]["role"] != "user":
        raise ValueError("a system message must be followed by a user turn")
    rest[0] = {"role": "user", "content": f"{system}\n\n{rest[0]['content']}"}
    return rest


def gemma_turns(tokenizer: Any, messages: list[Message], add_generation_prompt: bool) -> str:
    """Gemma's turn format: ``<start_of_turn>user\\n...<end_of_turn>\\n``, the assistant role named ``model``."""
    text = tokenizer.bos_token or ""
    for message in messages:
        text += f"<start_of_turn>{GEMMA_ROLES[message['role']]}\n{message['content']}<end_of_turn>\n"
    if add_generation_prompt:
        text += "<start_of_turn>model\n"
    return text


def render(tokenizer: Any, messages: list[Message], *, add_generation_prompt: bool, system_role: bool = False) -> str:
    """Render messages to the model's prompt text (chat template, or Gemma turns without one)."""
    if not system_role:
        messages = fold_system(messages)
    roles = [m["role"] for m in messages if m["role"] != "system"]
    if any(a == b for a, b in zip(roles, roles[1:])):
        raise ValueError(f"roles must alternate user/assistant, got {roles}")
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return gemma_turns(tokenizer, messages, add_generation_prompt)


def split_prompt_answer(tokenizer: Any, messages: list[Message], system_role: bool = False) -> tuple[str, str]:
    """(prompt text up to the answer, answer text including its end-of-turn marker)."""
    prompt = render(tokenizer, messages[:-1], add_generation_prompt=True, system_role=system_role)
    full = render(tokenizer, messages, add_generation_prompt=False, system_role=system_role)
    if not full.startswith(prompt):
        raise ValueError("the chat template does not render the prompt as a prefix of the conversation")
    return prompt, full[len(prompt) :]


def encode_messages(tokenizer: Any, messages: list[Message], system_role: bool = False,
                    answer_weights: list[tuple[int, int, int]] = ()) -> dict[str, list[int]]:
    """One conversation -> ``input_ids`` and ``labels`` (-100 everywhere but the final answer).

    With ``answer_weights`` (see :class:`~gemma_lowmem.data.conversation.Conversation`) the example also gets
    ``loss_weights``: per token, how many times its loss counts (a token that overlaps a span takes its weight).
    """
    prompt, answer = split_prompt_answer(tokenizer, messages, system_role)
    # The rendered text already holds <bos>: no second one from the tokenizer.
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    encoded = tokenizer(answer, add_special_tokens=False, return_offsets_mapping=bool(answer_weights))
    answer_ids = encoded["input_ids"]
    example = {"input_ids": prompt_ids + answer_ids, "labels": [IGNORE_INDEX] * len(prompt_ids) + answer_ids}
    if answer_weights:
        start = answer.find(messages[-1]["content"])  # where the content begins in the rendered answer
        if start < 0:
            raise ValueError("the chat template changes the answer's text: its weighted spans cannot be placed")
        weights = [1] * len(answer_ids)
        for i, (a, b) in enumerate(encoded["offset_mapping"]):
            for lo, hi, weight in answer_weights:
                if a < start + hi and start + lo < b:
                    weights[i] = weight
        example["loss_weights"] = [1] * len(prompt_ids) + weights
    return example


@dataclass
class EncodedSet:
    """Token examples of a data set and what happened on the way."""

    examples: list[dict[str, list[int]]]
    n_cut: int = 0  # conversations whose `cut` span (article) was shortened to fit max_seq_length
    n_dropped: int = 0  # conversations that could not fit even after cutting
    dropped: list[int] = field(default_factory=list)  # their indices in the input list
    kept: list[int] = field(default_factory=list)  # input index of each example


def _encode_fitting(tokenizer: Any, conv: Conversation, max_len: int, system_role: bool) -> tuple[dict | None, bool]:
    example = encode_messages(tokenizer, conv.messages, system_role, conv.answer_weights)
    if not example["labels"] or all(t == IGNORE_INDEX for t in example["labels"]):
        raise UserError("a conversation's answer tokenized to nothing; check the data's answer text")
    original = cut = conv.cut
    for _ in range(4):  # the token count of a cut is estimated from characters: a few tries converge
        overflow = len(example["input_ids"]) - max_len
        if overflow <= 0:
            return example, cut != original
        if not cut:
            return None, False
        cut_tokens = len(tokenizer(cut, add_special_tokens=False)["input_ids"])
        keep = max(0.0, (cut_tokens - overflow - 8) / max(cut_tokens, 1))
        shorter = cut_at_sentence_end(cut, int(len(cut) * keep))
        messages = [{**m, "content": m["content"].replace(cut, shorter, 1)} for m in conv.messages]
        conv, cut = replace(conv, messages=messages, cut=shorter), shorter  # the answer (and its weights) stays
        example = encode_messages(tokenizer, conv.messages, system_role, conv.answer_weights)
    return (example, True) if len(example["input_ids"]) <= max_len else (None, False)


def _cache_key(tokenizer: Any, conversations: list[Conversation], max_len: int, system_role: bool) -> str:
    digest = hashlib.sha256()
    header = [
        getattr(tokenizer, "name_or_path", ""),
        len(tokenizer),
        getattr(tokenizer, "chat_template", None) or "",
        max_len,
        system_role,
        3,
    ]  # the last item versions this file's encoding: a change to the tokens or the cuts it makes bumps it
    digest.update(json.dumps(header).encode())
    for conv in conversations:
        digest.update(json.dumps([conv.messages, conv.cut, conv.answer_weights], ensure_ascii=False).encode())
    return digest.hexdigest()[:20]


def encode_conversations(
    tokenizer: Any,
    conversations: list[Conversation],
    max_seq_length: int,
    *,
    system_role: bool = False,
    cache_dir: str | Path | None = None,
    desc: str = "tokenizing",
) -> EncodedSet:
    """Tokenize a data set once, cutting the ``cut`` span (never the answer) of conversations that are too long.

    Args:
        tokenizer: a Hugging Face tokenizer.
        conversations: the task's conversations.
        max_seq_length: longest example in tokens.
        system_role: keep a system turn (else folded into the first user turn).
        cache_dir: folder for the on-disk cache (None: no cache).
        desc: progress bar label.

    Returns:
        The examples with counts of cut and dropped conversations.
    """
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"tokens-{_cache_key(tokenizer, conversations, max_seq_length, system_role)}.pt"
        if path.is_file():
            return EncodedSet(**torch.load(path, map_location="cpu"))
    result = EncodedSet(examples=[])
    for i, conv in enumerate(tqdm(conversations, desc=desc, unit="conv", leave=False)):
        example, was_cut = _encode_fitting(tokenizer, conv, max_seq_length, system_role)
        if example is None:
            result.n_dropped += 1
            result.dropped.append(i)
            continue
        result.n_cut += was_cut
        result.examples.append(example)
        result.kept.append(i)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(result.__dict__, tmp)
        tmp.replace(path)
    return result
