"""The package's one decoding path: batched rows over a transformers KV cache, with masks built here.

:class:`Decoder` holds a batch of prompts (left-padded) and their :class:`~transformers.DynamicCache`. Three moves
feed it: :meth:`Decoder.feed` appends tokens (a different number per row), :meth:`Decoder.greedy` continues each
row greedily until a stop token or a cap, and :meth:`Decoder.branch` reads the next-token log-probabilities of a
whole tree of continuations in one forward pass, then forgets them. Free generation (:func:`generate_ids`) is
prefill + greedy; guided rubric decoding (:mod:`gemma_lowmem.evaluation.guided`) interleaves all three.

Why the masks are built here and not by transformers: rows pause (a finished slot, a shorter score) while others
go on, so a row's cache holds *holes*, slots that no query may see; and a branch's tokens see their ancestors only.
Every cache slot therefore carries ``real`` (a token, not a hole) and its position id; a query sees the real slots
at or before it (its ancestors, in a branch), and a sliding-window layer only those whose position is less than
the window behind its own. Positions skip the holes, so a batched row gets exactly the logits it would get alone.
The cache keeps every layer whole (``DynamicCache()`` without a config): a sliding layer's trimmed cache would not
line up with the masks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from functools import lru_cache
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

Autocast = Callable[[], AbstractContextManager[Any]]


def stop_token_ids(tokenizer: Any) -> list[int]:
    """EOS plus Gemma's ``<end_of_turn>`` where the vocabulary has it."""
    ids = {tokenizer.eos_token_id}
    end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    if isinstance(end_of_turn, int) and end_of_turn != tokenizer.unk_token_id:
        ids.add(end_of_turn)
    return sorted(i for i in ids if i is not None)


@lru_cache(maxsize=8)
def _decoded_vocabulary(tokenizer: Any) -> tuple[str, ...]:
    return tuple(tokenizer.batch_decode([[i] for i in range(len(tokenizer))]))


def token_ids_containing(tokenizer: Any, text: str) -> list[int]:
    """The ids whose decoded text contains ``text`` (e.g. every newline token: ``"\\n"``, ``"\\n\\n"``, ...).

    Args:
        tokenizer: a Hugging Face tokenizer (the decoded vocabulary is cached per tokenizer: one pass of a few
            seconds over Gemma's 262k tokens).
        text: the substring.

    Returns:
        The ids, ascending.
    """
    return [i for i, piece in enumerate(_decoded_vocabulary(tokenizer)) if text in piece]


def _attention_layout(model: torch.nn.Module) -> tuple[set[str], int | None, bool]:
    """(layer types, sliding window, additive masks?) of a causal LM's config."""
    config = model.config
    config = getattr(config, "text_config", None) or config
    window = getattr(config, "sliding_window", None)
    types = set(getattr(config, "layer_types", None) or ["full_attention"])
    eager = getattr(config, "_attn_implementation", "sdpa") == "eager"
    return types, window, eager


class Decoder:
    """A batch of rows decoded together over one KV cache (see the module docstring for holes and masks).

    Attributes:
        rows: the batch size.
        last_logits: (rows, V) float32: each row's next-token logits after the last real token it was fed.
    """

    def __init__(self, model: torch.nn.Module, prompts: Sequence[Sequence[int]], *, pad_id: int,
                 autocast: Autocast = contextlib.nullcontext) -> None:
        """Prefill the prompts (left-padded into one batch).

        Args:
            model: the causal LM (put into eval mode by the caller).
            prompts: token ids per row, each non-empty.
            pad_id: the id fed into holes (never seen by a real token).
            autocast: zero-argument callable returning the context manager every forward runs under (training's
                ``Precision.autocast``, so generation computes as training did).
        """
        assert prompts and all(len(p) for p in prompts), "every row needs a prompt"
        self.model, self.pad_id, self.autocast = model, pad_id, autocast
        self.device = next(model.parameters()).device
        self.layer_types, self.window, self.eager = _attention_layout(model)
        self.rows = len(prompts)
        self.cache = DynamicCache()
        self.real = torch.zeros(self.rows, 0, dtype=torch.bool, device=self.device)  # (B, K): cache slot is a token
        self.pos = torch.zeros(self.rows, 0, dtype=torch.long, device=self.device)  # (B, K): its position id
        self.next_pos = torch.zeros(self.rows, dtype=torch.long, device=self.device)  # (B,)
        self.last_logits = torch.zeros(0)
        self.feed(prompts)

    @property
    def length(self) -> int:
        """Cache slots per row (tokens and holes)."""
        return self.real.shape[1]

    def _masks(self, visible: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor) -> Any:
        """The attention mask argument for (B, Q, K) ``visible``: a dict per layer type (Gemma), else one tensor."""
        masks = {}
        for layer_type in self.layer_types:
            vis = visible
            if layer_type == "sliding_attention" and self.window:
                vis = vis & (q_pos[:, :, None] - k_pos[:, None, :] < self.window)
            vis = vis[:, None]  # (B, 1, Q, K)
            if self.eager:  # eager attention adds its mask to the scores
                vis = torch.zeros(vis.shape, device=self.device).masked_fill(~vis, torch.finfo(torch.float32).min)
            masks[layer_type] = vis
        return masks if len(self.layer_types) > 1 or "sliding_attention" in self.layer_types \
            else masks["full_attention"]

    @torch.no_grad()
    def _forward(self, tokens: torch.Tensor, real: torch.Tensor, parents: Sequence[int] | None = None,
                 keep_all: bool = False) -> torch.Tensor:
        """Run (B, T) ``tokens`` (``real`` (B, T) marks tokens, the rest are holes) on top of the cache.

        ``parents``: a branch: token ``t`` sees the cache and its ancestors ``parents[t], parents[parents[t]]..``
        (-1: the root), at position ``next_pos + depth``; else each row's real tokens form a sequence. Returns the
        last column's logits (B, V), or every column's (B, T, V) with ``keep_all``.
        """
        b, t = tokens.shape
        if parents is None:
            within = torch.ones(t, t, dtype=torch.bool, device=self.device).tril()  # (T, T) causal
            new_pos = self.next_pos[:, None] + (real.long().cumsum(1) - 1).clamp(min=0)  # (B, T)
        else:
            within = torch.eye(t, dtype=torch.bool, device=self.device)
            depth = torch.zeros(t, dtype=torch.long)
            for i, p in enumerate(parents):  # parents come before their children
                if p >= 0:
                    within[i] |= within[p]
                    depth[i] = depth[p] + 1
            new_pos = self.next_pos[:, None] + depth.to(self.device)[None]
        key_real = torch.cat([self.real, real], dim=1)  # (B, K + T)
        key_pos = torch.cat([self.pos, new_pos], dim=1)
        visible = torch.cat([self.real[:, None, :].expand(b, t, -1), within[None] & real[:, None, :]], dim=2)
        visible &= key_real[:, None, :]
        # A hole's query sees only itself: an empty row would make softmax NaN, and NaN times a zero weight
        # would then leak into every later token through the values.
        holes = ~real
        visible[:, :, self.length:] |= torch.eye(t, dtype=torch.bool, device=self.device)[None] & holes[:, :, None]
        visible[:, :, : self.length] &= ~holes[:, :, None]
        with self.autocast():
            out = self.model(input_ids=tokens, attention_mask=self._masks(visible, new_pos, key_pos),
                             position_ids=new_pos, cache=self.cache, use_cache=True,
                             logits_to_keep=0 if keep_all else 1)
        self.real, self.pos = key_real, key_pos
        if parents is None:
            self.next_pos = self.next_pos + real.sum(1)
        return out.logits if keep_all else out.logits[:, -1].float()  # a branch casts row by row: (B, T, V)

    def feed(self, tokens: Sequence[Sequence[int]]) -> None:
        """Append each row's tokens (any number, none too) and update ``last_logits`` of the rows that got some.

        Shorter rows get their holes first, so every row's last token is in the last column and one column of
        logits is computed (a prompt batch is left-padded this way).

        Args:
            tokens: per row, the ids to append.
        """
        assert len(tokens) == self.rows
        width = max(len(t) for t in tokens)
        if width == 0:
            return
        ids = torch.full((self.rows, width), self.pad_id, dtype=torch.long)
        real = torch.zeros((self.rows, width), dtype=torch.bool)
        for r, row in enumerate(tokens):
            if row:
                ids[r, width - len(row):] = torch.tensor(row)
                real[r, width - len(row):] = True
        real = real.to(self.device)
        logits = self._forward(ids.to(self.device), real)
        fed = real[:, -1:]
        self.last_logits = logits if self.last_logits.numel() == 0 else torch.where(fed, logits, self.last_logits)

    def greedy(self, stop_ids: Sequence[int], max_new_tokens: int, active: Sequence[bool] | None = None
               ) -> list[list[int]]:
        """Continue each active row greedily until it picks a stop token or has ``max_new_tokens`` new tokens.

        Every new token but the stop token is fed, so the cache ends right after the row's text and
        ``last_logits`` is the distribution that picked the stop token (or would pick the next one).

        Args:
            stop_ids: ids that end a row; they are neither fed nor returned.
            max_new_tokens: most tokens per row.
            active: rows to continue (default: all); the others get holes.

        Returns:
            Per row, its new tokens (empty for inactive rows).
        """
        stops = torch.tensor(list(stop_ids), dtype=torch.long, device=self.device)
        going = torch.tensor(list(active) if active is not None else [True] * self.rows, device=self.device)
        new: list[torch.Tensor] = []
        for _ in range(max_new_tokens):
            token = self.last_logits.argmax(-1)  # (B,)
            going &= ~torch.isin(token, stops)
            if not bool(going.any()):  # host sync: one per generated token, the price of stopping early
                break
            token = torch.where(going, token, torch.full_like(token, self.pad_id))
            logits = self._forward(token[:, None], going[:, None])
            self.last_logits = torch.where(going[:, None], logits, self.last_logits)
            new.append(torch.where(going, token, torch.full_like(token, -1)))
        if not new:
            return [[] for _ in range(self.rows)]
        columns = torch.stack(new, dim=1).tolist()  # (B, new): -1 where a row had stopped
        return [[t for t in row if t >= 0] for row in columns]

    def branch(self, tokens: Sequence[int], parents: Sequence[int], read_ids: Sequence[int]) -> torch.Tensor:
        """Next-token log-probabilities after every node of a tree of continuations, in one forward pass.

        The same tree hangs after every row's last real token; its tokens are removed from the cache again, so the
        rows continue from where they were.

        Args:
            tokens: the nodes' token ids (T,), parents before children.
            parents: each node's parent index, -1 for a child of the row's last token.
            read_ids: the vocabulary ids to read.

        Returns:
            (rows, T, len(read_ids)) float32 log-probabilities (normalised over the whole vocabulary).
        """
        length, next_pos = self.length, self.next_pos
        ids = torch.tensor(list(tokens), dtype=torch.long, device=self.device)[None].expand(self.rows, -1)
        logits = self._forward(ids, torch.ones_like(ids, dtype=torch.bool), parents=parents, keep_all=True)
        read = torch.tensor(list(read_ids), dtype=torch.long, device=self.device)
        out = torch.stack([row[:, read].float() - torch.logsumexp(row.float(), dim=-1, keepdim=True)
                           for row in logits])
        del logits  # (B, T, V) float32: the largest tensor of a guided pass
        self.cache.crop(-len(tokens))  # a negative count removes the last tokens
        self.real, self.pos, self.next_pos = self.real[:, :length], self.pos[:, :length], next_pos
        return out

    def log_probs(self, read_ids: Sequence[int]) -> torch.Tensor:
        """(rows, len(read_ids)) log-probabilities of the next token, from ``last_logits``."""
        read = torch.tensor(list(read_ids), dtype=torch.long, device=self.device)
        return self.last_logits[:, read] - torch.logsumexp(self.last_logits, dim=-1, keepdim=True)


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices in batches of ``batch_size``, longest first, so each batch pads little."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[s : s + batch_size] for s in range(0, len(order), batch_size)]


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
    autocast: Autocast = contextlib.nullcontext,
) -> list[list[int]]:
    """Greedy continuation of token prompts (the stop token excluded), in the prompts' order.

    Args:
        model: the causal LM.
        prompts: token ids per prompt.
        pad_id: the padding id.
        stop_ids: ids that end an answer.
        max_new_tokens: longest answer.
        batch_size: prompts per batch (sorted by length, so each batch pads little).
        show_progress: show a progress bar.
        autocast: zero-argument callable returning the context manager of every forward (see :class:`Decoder`).

    Returns:
        The new tokens of each prompt.
    """
    was_training = model.training
    model.eval()
    outputs: list[list[int]] = [[] for _ in prompts]
    bar = tqdm(total=len(prompts), desc="generating", unit="prompt", disable=not show_progress, leave=False)
    for rows in length_sorted_batches([len(p) for p in prompts], batch_size):
        decoder = Decoder(model, [prompts[i] for i in rows], pad_id=pad_id, autocast=autocast)
        for i, new in zip(rows, decoder.greedy(stop_ids, max_new_tokens)):
            outputs[i] = new
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
    autocast: Autocast = contextlib.nullcontext,
) -> list[str]:
    """Greedy answers to rendered prompt texts (which already hold any special tokens, e.g. ``<bos>``).

    Args:
        model: the causal LM.
        tokenizer: its tokenizer.
        prompts: the rendered prompts.
        max_new_tokens: longest answer.
        batch_size: prompts per batch.
        show_progress: show a progress bar.
        autocast: zero-argument callable returning the context manager of every forward.

    Returns:
        The decoded answers, special tokens dropped, stripped.
    """
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    out = generate_ids(
        model, ids, pad_id=tokenizer.pad_token_id, stop_ids=stop_token_ids(tokenizer),
        max_new_tokens=max_new_tokens, batch_size=batch_size, show_progress=show_progress, autocast=autocast,
    )
    return [tokenizer.decode(o, skip_special_tokens=True).strip() for o in out]
