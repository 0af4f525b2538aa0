"""Batched greedy generation with the KV cache: left padding, length-sorted batches, stop at the end of turn."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm


def stop_token_ids(tokenizer: Any) -> list[int]:
    """EOS plus Gemma's ``<end_of_turn>`` where the vocabulary has it."""
    ids = {tokenizer.eos_token_id}
    end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    if isinstance(end_of_turn, int) and end_of_turn != tokenizer.unk_token_id:
        ids.add(end_of_turn)
    return sorted(i for i in ids if i is not None)


@torch.no_grad()
def generate_ids(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    pad_id: int,
    stop_ids: Sequence[int],
    max_new_tokens: int = 256,
    batch_size: int = 8,
    show_progress: bool = True,
) -> list[list[int]]:
    """Greedy continuation of token prompts (the stop token excluded), in the prompts' order.

    Prompts are sorted by length so each batch pads little; each batch is left-padded so all rows end at the same
    position and the new token of every row is read from the last column.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    outputs: list[list[int]] = [[] for _ in prompts]
    stops = torch.tensor(list(stop_ids), device=device)
    bar = tqdm(total=len(prompts), desc="generating", unit="prompt", disable=not show_progress, leave=False)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        width = max(len(prompts[i]) for i in rows)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):
            input_ids[r, width - len(prompts[i]) :] = torch.tensor(prompts[i])
            mask[r, width - len(prompts[i]) :] = 1
        input_ids, mask = input_ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T): real tokens count from 0 after the left pads
        done = torch.zeros(len(rows), dtype=torch.bool, device=device)
        new_tokens = []
        past = None
        step_ids, step_pos = input_ids, positions
        for _ in range(max_new_tokens):
            # logits_to_keep=1: the prefill would otherwise build (B, T, 262k) logits for every prompt position
            out = model(input_ids=step_ids, attention_mask=mask, position_ids=step_pos, past_key_values=past,
                        use_cache=True, logits_to_keep=1)
            past = out.past_key_values
            token = out.logits[:, -1].argmax(-1)  # (B,)
            token = torch.where(done, torch.full_like(token, pad_id), token)
            done |= torch.isin(token, stops)
            new_tokens.append(token)
            if bool(done.all()):  # host sync: one per generated token, the price of stopping early
                break
            step_ids = token[:, None]
            step_pos = step_pos[:, -1:] + 1
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        generated = torch.stack(new_tokens, dim=1).tolist()  # (B, new)
        for r, i in enumerate(rows):
            row = generated[r]
            cut = next((k for k, t in enumerate(row) if t in set(stop_ids)), len(row))
            outputs[i] = row[:cut]
        bar.update(len(rows))
    bar.close()
    model.train(was_training)
    return outputs


def generate_texts(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 256,
    batch_size: int = 8,
    show_progress: bool = True,
) -> list[str]:
    """Greedy answers to rendered prompt texts (which already hold any special tokens, e.g. ``<bos>``)."""
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    out = generate_ids(
        model, ids, pad_id=tokenizer.pad_token_id, stop_ids=stop_token_ids(tokenizer),
        max_new_tokens=max_new_tokens, batch_size=batch_size, show_progress=show_progress,
    )
    return [tokenizer.decode(o, skip_special_tokens=True).strip() for o in out]
