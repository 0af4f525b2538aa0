"""Row-wise int8 embedding for big frozen tables: 1 byte per element plus one fp32 scale per row.

Gemma 3n's per-layer embedding table (262,144 x 7,680, 2.0B elements) takes 4 GiB in bf16 and 1.9 GiB here.
Each row is quantized symmetrically: ``scale = max|row| / 127``, ``q = round(row / scale)`` in [-127, 127].
A lookup gathers only the requested int8 rows (on the table's device), moves them to the ids' device and
dequantizes them there: ``(q * scale * embed_scale)`` in fp32, cast once to the compute ``dtype``. The table
can therefore stay on the CPU while the model trains on a GPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# fp32 temporaries while quantizing hold at most this many elements (64 MiB)
DEFAULT_CHUNK_ELEMENTS = 2**24


def _rows_per_chunk(embedding_dim: int, chunk_rows: int | None) -> int:
    return chunk_rows or max(1, DEFAULT_CHUNK_ELEMENTS // embedding_dim)


def _quantize_into(rows: torch.Tensor, q_out: torch.Tensor, scale_out: torch.Tensor) -> None:
    """Quantize (C, D) float rows into the (C, D) int8 and (C,) fp32 slices given (any devices)."""
    w = rows.detach().float()  # (C, D)
    scale = w.abs().amax(dim=1) / 127  # (C,)
    # an all-zero row has scale 0: divide by 1 instead so that it quantizes to zeros, not NaN
    q = torch.round(w / torch.where(scale > 0, scale, 1)[:, None]).clamp_(-127, 127)
    q_out.copy_(q)
    scale_out.copy_(scale)


def quantize_rows(weight: torch.Tensor, *, chunk_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row absmax int8 quantization, a chunk of rows at a time.

    Args:
        weight: (V, D) float table.
        chunk_rows: rows per chunk; None keeps the fp32 temporaries near 64 MiB.

    Returns:
        ``q`` (V, D) int8 in [-127, 127] and ``scale`` (V,) fp32 (``max|row| / 127``; 0 for an all-zero row),
        on ``weight``'s device, with ``weight ~= q * scale[:, None]`` to within ``scale / 2`` per element.
    """
    num, dim = weight.shape
    q = torch.empty(num, dim, dtype=torch.int8, device=weight.device)
    scale = torch.empty(num, dtype=torch.float32, device=weight.device)
    step = _rows_per_chunk(dim, chunk_rows)
    for start in range(0, num, step):
        _quantize_into(weight[start:start + step], q[start:start + step], scale[start:start + step])
    return q, scale


class Int8Embedding(nn.Module):
    """A frozen embedding stored as row-wise int8; the constructor leaves the table uninitialised.

    Fill it with :meth:`from_embedding`, :meth:`random` or ``load_state_dict`` (buffers ``q`` and ``scale``).
    The table stays on ``table_device``: ``Module.to()``, ``cuda()``, ``half()`` and ``to_empty()`` leave it
    alone, so that moving or casting the rest of a model neither copies a 2 GiB table to the GPU nor casts
    its fp32 scales; use :meth:`move_table` to move it on purpose. Lookups return rows on the ids' device.

    Args:
        num_embeddings: rows V.
        embedding_dim: columns D.
        padding_idx: kept for parity with ``nn.Embedding`` (the table is frozen, so it changes no gradient).
        embed_scale: multiplier applied to the looked-up rows (Gemma's scaled word embeddings); None for 1.
        dtype: compute dtype of the returned rows.
        table_device: where ``q`` and ``scale`` live.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, *, padding_idx: int | None = None,
                 embed_scale: float | None = None, dtype: torch.dtype = torch.bfloat16,
                 table_device: torch.device | str = "cpu"):
        super().__init__()
        if padding_idx is not None and padding_idx < 0:
            padding_idx += num_embeddings
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.padding_idx = padding_idx
        self.embed_scale = None if embed_scale is None else float(embed_scale)
        self.dtype = dtype
        # torch.empty does not touch the pages: an unfilled table costs no resident memory
        self.register_buffer("q", torch.empty(num_embeddings, embedding_dim, dtype=torch.int8, device=table_device))
        self.register_buffer("scale", torch.empty(num_embeddings, dtype=torch.float32, device=table_device))

    @property
    def table_device(self) -> torch.device:
        """Where the int8 table and its scales live."""
        return self.q.device

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Look up rows.

        Args:
            ids: integer tensor of any shape, on any device.

        Returns:
            (*ids.shape, D) rows in ``self.dtype`` on ``ids.device``.
        """
        flat = ids.reshape(-1).to(self.q.device)  # (n,); a host sync when ids and table are on different devices
        q = self.q.index_select(0, flat).to(ids.device)  # (n, D) int8: only the gathered rows travel, 1 byte each
        scale = self.scale.index_select(0, flat).to(ids.device)  # (n,)
        rows = q.float().mul_(scale[:, None])  # (n, D) fp32
        if self.embed_scale is not None:
            rows.mul_(self.embed_scale)
        return rows.to(self.dtype).view(*ids.shape, self.embedding_dim)

    def _apply(self, fn, recurse=True):
        # Pinned table: whole-model moves, casts and to_empty() skip it (see the class docstring).
        return self

    def move_table(self, device: torch.device | str) -> Int8Embedding:
        """Move ``q`` and ``scale`` to ``device`` (the one way to move the table). Returns self."""
        self.q = self.q.to(device)
        self.scale = self.scale.to(device)
        return self

    @classmethod
    def from_embedding(cls, module: nn.Embedding, *, dtype: torch.dtype | None = None,
                       table_device: torch.device | str | None = None,
                       chunk_rows: int | None = None) -> Int8Embedding:
        """Quantize an ``nn.Embedding`` (or a subclass with ``embed_scale``, like Gemma's scaled embeddings).

        Only a chunk of rows is ever copied to fp32, and no reference to the float table is kept: it is freed
        once the caller swaps this module in and drops the old one.

        Args:
            module: the embedding to convert; its ``embed_scale`` (float or 0-d tensor) is kept if it has one.
            dtype: compute dtype of the returned rows; None for the module's weight dtype.
            table_device: where the int8 table lives; None for the module's weight device.
            chunk_rows: rows quantized at a time; None keeps the fp32 temporaries near 64 MiB.

        Returns:
            The int8 embedding, producing what ``module`` produced up to quantization error.
        """
        weight = module.weight
        if weight.is_meta:
            raise ValueError("from_embedding needs a materialised weight; for a model built on the meta device "
                             "use Int8Embedding.random(...) or the constructor and load_state_dict")
        if module.max_norm is not None:
            raise ValueError(f"max_norm={module.max_norm}: renormalising rows in place is not supported by the "
                             "frozen int8 table; set max_norm=None")
        # Gemma's scaled embeddings keep the float in scalar_embed_scale and a 0-d buffer in embed_scale
        embed_scale = getattr(module, "scalar_embed_scale", getattr(module, "embed_scale", None))
        if isinstance(embed_scale, torch.Tensor):
            embed_scale = embed_scale.item()  # host sync, once at conversion
        out = cls(module.num_embeddings, module.embedding_dim, padding_idx=module.padding_idx,
                  embed_scale=embed_scale, dtype=dtype or weight.dtype,
                  table_device=weight.device if table_device is None else table_device)
        step = _rows_per_chunk(module.embedding_dim, chunk_rows)
        for start in range(0, module.num_embeddings, step):
            _quantize_into(weight[start:start + step], out.q[start:start + step], out.scale[start:start + step])
        return out

    @classmethod
    def random(cls, num_embeddings: int, embedding_dim: int, std: float = 1.0,
               generator: torch.Generator | None = None, *, padding_idx: int | None = None,
               embed_scale: float | None = None, dtype: torch.dtype = torch.bfloat16,
               table_device: torch.device | str = "cpu", chunk_rows: int | None = None) -> Int8Embedding:
        """A table of N(0, std^2) rows, drawn and quantized a chunk at a time (the float table never exists whole).

        For memory benchmarks of models built on the meta device. The padding row is zero, as in ``nn.Embedding``.

        Args:
            num_embeddings, embedding_dim, padding_idx, embed_scale, dtype, table_device: as in the constructor.
            std: standard deviation of the float rows before quantization.
            generator: random generator (its device draws the rows); None for the global CPU one.
            chunk_rows: rows drawn at a time; None keeps the fp32 temporaries near 64 MiB.

        Returns:
            The filled int8 embedding.
        """
        out = cls(num_embeddings, embedding_dim, padding_idx=padding_idx, embed_scale=embed_scale, dtype=dtype,
                  table_device=table_device)
        draw_device = generator.device if generator is not None else "cpu"
        step = _rows_per_chunk(embedding_dim, chunk_rows)
        for start in range(0, num_embeddings, step):
            end = min(start + step, num_embeddings)
            rows = torch.randn(end - start, embedding_dim, generator=generator, device=draw_device).mul_(std)
            if out.padding_idx is not None and start <= out.padding_idx < end:
                rows[out.padding_idx - start] = 0
            _quantize_into(rows, out.q[start:end], out.scale[start:end])
        return out

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, padding_idx={self.padding_idx}, "
                f"embed_scale={self.embed_scale}, dtype={self.dtype}, table_device={self.table_device}")


def int8_embedding_ref(ids: torch.Tensor, weight: torch.Tensor, *, embed_scale: float | None = None,
                       dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Specification of :class:`Int8Embedding`: quantize-dequantize the whole table, then ``F.embedding``.

    Args:
        ids: integer tensor of any shape.
        weight: (V, D) float table.
        embed_scale: multiplier of the looked-up rows; None for 1.
        dtype: dtype of the result.

    Returns:
        (*ids.shape, D) rows in ``dtype``, bit-identical to ``Int8Embedding`` built from ``weight``.
    """
    w = weight.detach().float()  # (V, D)
    scale = w.abs().amax(dim=1) / 127  # (V,)
    q = torch.round(w / torch.where(scale > 0, scale, 1)[:, None]).clamp(-127, 127).to(torch.int8)
    table = q.float() * scale[:, None]  # (V, D) dequantized
    rows = F.embedding(ids, table)
    if embed_scale is not None:
        rows = rows * embed_scale
    return rows.to(dtype)
