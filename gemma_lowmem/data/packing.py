"""Pack several short examples into one row, and the attention masks that keep them apart.

Packing puts documents end to end in one row of ``pack_len`` tokens so that fewer slots hold padding. Restarting
``position_ids`` per document is not enough for Gemma 3 under ``sdpa`` or ``eager`` (tokens would still attend
across documents), and a single 4D mask would make the sliding-window layers ignore their window. So a packed
batch carries one block-diagonal causal mask per layer type, ``{"full_attention": M, "sliding_attention":
M_window}``, which the Gemma 3 and Gemma 3n decoders take as-is instead of building their own. Under
:data:`~gemma_lowmem.attention.PACKED_SDPA` the dict holds the (B, T) document ids instead, and the attention
function runs each document on its own (no (T, T) mask, no masked-out work).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence

import torch

from gemma_lowmem.attention import PACKED_SDPA

SUPPORTED_IMPLEMENTATIONS = ("sdpa", "eager", PACKED_SDPA)
MAX_FILL_ITEMS = 20_000  # above this many examples fill_bins keeps first-fit decreasing (see fill_bins)
MAX_FILL_CANDIDATES = 512  # examples one bin's subset-sum may choose from: bounds the work per bin


def _check_lengths(lengths: Sequence[int], pack_len: int) -> None:
    """Raise ValueError naming the first example that cannot go into a bin of ``pack_len`` tokens."""
    if pack_len < 1:
        raise ValueError(f"pack_len={pack_len} must be >= 1")
    for i, length in enumerate(lengths):
        if not 1 <= length <= pack_len:
            raise ValueError(
                f"example {i} has {length} tokens, outside [1, pack_len={pack_len}]; "
                "cut (or drop) it before packing"
            )


def first_fit_decreasing(lengths: Sequence[int], pack_len: int) -> list[list[int]]:
    """Pack examples into as few bins of ``pack_len`` tokens as first-fit decreasing finds.

    Examples are taken longest first (ties by index) and each goes into the earliest-opened bin with room. The
    earliest bin with room is found in O(log n) through a max segment tree over the bins' free space (100k
    examples: 0.35 s on a 2-core CPU).

    Args:
        lengths: token count of each example; each must be in [1, pack_len] (cut longer ones before packing).
        pack_len: tokens per bin.

    Returns:
        Bins in the order they were opened; each bin lists example indices, longest first.
    """
    _check_lengths(lengths, pack_len)
    n = len(lengths)
    if n == 0:
        return []
    # Leaves are bins 0..size-1 (at most n are ever opened); a leaf not opened yet has all pack_len tokens free,
    # and since bins open left to right the leftmost leaf with room is either an open bin or the next new one.
    size = 1 << max(n - 1, 0).bit_length()
    free = [pack_len] * (2 * size)  # free[node] = max free space among the bins under node; node 1 is the root
    bins: list[list[int]] = []
    for i in sorted(range(n), key=lambda j: -lengths[j]):  # stable: equal lengths keep index order
        need = lengths[i]
        node = 1
        while node < size:  # descend to the leftmost leaf whose free space >= need
            node = 2 * node if free[2 * node] >= need else 2 * node + 1
        leaf = node - size
        if leaf == len(bins):
            bins.append([])
        bins[leaf].append(i)
        free[node] -= need
        node //= 2
        while node:  # refresh the maxima on the path to the root; stop once one is unchanged
            best = max(free[2 * node], free[2 * node + 1])
            if free[node] == best:
                break
            free[node] = best
            node //= 2
    return bins



def _max_fill(lengths: Sequence[int], pack_len: int) -> list[list[int]]:
    """Max-fill bins: each bin opens with the longest example left and fills its room as fully as subset-sum can.

    Examples left are kept grouped by length, so a bin's candidates hold each length at most ``room // length``
    times (more copies could never fit together) and at most MAX_FILL_CANDIDATES examples, longest first. The
    subset-sum over [0, room] is a bitset in a Python int (bit s set = some subset sums to s), one shift-or per
    candidate; it stops as soon as bit ``room`` is set.
    """
    by_len: dict[int, list[int]] = {}
    for i in sorted(range(len(lengths)), key=lambda j: -lengths[j]):  # each group lists its indices ascending
        by_len.setdefault(lengths[i], []).append(i)
    neg_sizes = sorted(-n for n in by_len)  # distinct lengths left, negated so that bisect sees them ascending
    taken = {n: 0 for n in by_len}  # per length: how many of its group are in bins already
    bins: list[list[int]] = []

    def take(n: int) -> int:
        group = by_len[n]
        i = group[taken[n]]
        taken[n] += 1
        if taken[n] == len(group):
            del neg_sizes[bisect_left(neg_sizes, -n)]
        return i

    while neg_sizes:
        first = -neg_sizes[0]
        b = [take(first)]
        room = pack_len - first
        cands: list[int] = []  # candidate lengths, longest first, repeated as often as they may be chosen
        for neg in neg_sizes[bisect_left(neg_sizes, -room) :]:
            n = -neg
            copies = min(len(by_len[n]) - taken[n], room // n, MAX_FILL_CANDIDATES - len(cands))
            cands += [n] * copies
            if len(cands) == MAX_FILL_CANDIDATES:
                break
        mask = (1 << (room + 1)) - 1
        reach = [1]  # reach[j]: the sums that the first j candidates reach
        for n in cands:
            reach.append(reach[-1] | ((reach[-1] << n) & mask))
            if reach[-1] >> room & 1:
                break
        s = reach[-1].bit_length() - 1  # the largest reachable sum <= room
        chosen = []
        for j in range(len(reach) - 1, 0, -1):  # walk back: candidate j-1 is used iff the first j-1 miss sum s
            if not reach[j - 1] >> s & 1:
                chosen.append(cands[j - 1])
                s -= cands[j - 1]
        assert s == 0
        b += [take(n) for n in sorted(chosen, reverse=True)]
        bins.append(b)
    return bins


def fill_bins(lengths: Sequence[int], pack_len: int) -> list[list[int]]:
    """Pack examples into few bins of ``pack_len`` tokens: max-fill, or first-fit decreasing where that is better.

    Max-fill (see :func:`_max_fill`) fills each bin to the brim where first-fit decreasing leaves a little gap in
    each: on 900 CNN/DailyMail rubric conversations (584-1246 tokens) at pack_len 8192 it needs 107 bins, the lower
    bound, against FFD's 110. FFD also runs, and its bins are kept when they are no more; above MAX_FILL_ITEMS
    examples only FFD runs: with that many examples FFD's gaps are filled by short ones anyway (100k random lengths
    1..2048 at 8192: FFD reaches the bound, max-fill 2% above it and 15 times slower).

    Args:
        lengths: token count of each example; each must be in [1, pack_len] (cut longer ones before packing).
        pack_len: tokens per bin.

    Returns:
        Bins in the order they were opened; each bin lists example indices, longest first (ties by index).
    """
    ffd = first_fit_decreasing(lengths, pack_len)
    if len(lengths) > MAX_FILL_ITEMS:
        return ffd
    best = _max_fill(lengths, pack_len)
    return best if len(best) < len(ffd) else ffd

def doc_ids(doc_lengths_per_row: Sequence[Sequence[int]], total_len: int) -> torch.Tensor:
    """Which document each slot of a packed batch holds.

    Args:
        doc_lengths_per_row: per row, the token counts of its documents in order.
        total_len: T, the padded row length.

    Returns:
        (B, T) long tensor: document number within the row (0, 1, ...), -1 on the pad tail.
    """
    ids = torch.full((len(doc_lengths_per_row), total_len), -1, dtype=torch.long)
    for b, docs in enumerate(doc_lengths_per_row):
        used = sum(docs)
        if used > total_len:
            raise ValueError(f"row {b} holds {used} tokens, more than total_len={total_len}")
        ids[b, :used] = torch.repeat_interleave(torch.arange(len(docs)), torch.as_tensor(docs, dtype=torch.long))
    return ids


Runs = tuple[tuple[tuple[int, int], ...], ...]  # per row, (document id, length) pairs


def document_runs(doc_lengths_per_row: Sequence[Sequence[int]], total_len: int) -> Runs:
    """The runs of :func:`doc_ids` per row as host-side ``(id, length)`` pairs, the pad tail last as ``(-1, n)``.

    Packed attention slices each row's documents with them; reading them off the (B, T) ids on a GPU would cost a
    host sync per row and layer, in the forward and again in every recompute.
    """
    return tuple(
        tuple((d, n) for d, n in enumerate(docs)) + (((-1, total_len - sum(docs)),) if sum(docs) < total_len else ())
        for docs in doc_lengths_per_row
    )


def packed_position_ids(doc_lengths_per_row: Sequence[Sequence[int]], total_len: int) -> torch.Tensor:
    """Positions that restart at 0 for each document (and for the pad tail, which is treated as one more document).

    Args:
        doc_lengths_per_row: per row, the token counts of its documents in order.
        total_len: T, the padded row length.

    Returns:
        (B, T) long tensor.
    """
    pos = torch.zeros(len(doc_lengths_per_row), total_len, dtype=torch.long)
    for b, docs in enumerate(doc_lengths_per_row):
        pad = total_len - sum(docs)
        pos[b] = torch.cat([torch.arange(n) for n in (*docs, pad)])
    return pos


def packed_attention_masks(
    doc_lengths_per_row: Sequence[Sequence[int]],
    total_len: int,
    *,
    sliding_window: int | None,
    implementation: str,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """Block-diagonal causal masks for a packed batch, one per Gemma layer type (or document ids standing for them).

    Query q may see key k iff both lie in the same document and k <= q; in ``sliding_attention`` also
    q - sliding_window < k, the same window as transformers' ``sliding_window_overlay``. A pad slot (the row's tail)
    sees every slot up to itself, in both masks, as with ordinary right padding: no real token sees a pad and pads
    carry no loss, so this changes nothing real, but a pad that saw only pads would stay exactly zero through every
    Gemma 3n layer (its pad embedding is zero) and the final ``mean(h**2) ** 0.5`` would turn the gradients NaN.

    Args:
        doc_lengths_per_row: per row, the token counts of its documents in order.
        total_len: T, the padded row length.
        sliding_window: window of the sliding layers; None gives them the full mask (a model without sliding layers).
        implementation: "sdpa" (boolean mask, True = may attend), "eager" (additive mask: 0 or finfo(dtype).min)
            or :data:`~gemma_lowmem.attention.PACKED_SDPA` (document ids; each layer applies its own window).
        dtype: the eager mask's dtype (the attention scores' dtype); ignored otherwise.

    Returns:
        ``{"full_attention": M, "sliding_attention": M_window}``, each (B, 1, T, T); under PACKED_SDPA both entries
        are the (B, T) long ids of :func:`doc_ids`.
    """
    if implementation not in SUPPORTED_IMPLEMENTATIONS:
        raise ValueError(f"packed attention masks support {SUPPORTED_IMPLEMENTATIONS}, not {implementation!r}")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window={sliding_window} must be >= 1 (or None)")
    seg = doc_ids(doc_lengths_per_row, total_len)  # (B, T)
    if implementation == PACKED_SDPA:
        return {"full_attention": seg, "sliding_attention": seg}
    q = torch.arange(total_len)[:, None]  # (T, 1)
    k = torch.arange(total_len)[None, :]  # (1, T)
    causal = k <= q  # (T, T)
    same_doc = seg[:, :, None] == seg[:, None, :]  # (B, T, T)
    pad_query = (seg < 0)[:, :, None]  # (B, T, 1)
    full = causal & (same_doc | pad_query)  # (B, T, T)
    masks = {"full_attention": full}
    if sliding_window is None:
        masks["sliding_attention"] = full
    else:
        masks["sliding_attention"] = causal & ((same_doc & (k > q - sliding_window)) | pad_query)
    out = {}
    for name, allowed in masks.items():
        allowed = allowed[:, None]  # (B, 1, T, T): broadcast over heads
        if implementation == "eager":
            zero = torch.zeros((), dtype=dtype)
            allowed = torch.where(allowed, zero, torch.finfo(dtype).min)
        out[name] = allowed
    return out
