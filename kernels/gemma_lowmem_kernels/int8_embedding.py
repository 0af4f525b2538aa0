"""Row-wise int8 embedding for big frozen tables: 1 byte per element plus one fp32 scale per row.

Gemma 3n's per-layer embedding table (262,144 x 7,680, 2.0B elements) takes 4 GiB in bf16 and 1.9 GiB here.
Each row is quantized symmetrically: ``scale = max|row| / 127``, ``q = round(row / scale)`` in [-127, 127].
A lookup gathers only the requested int8 rows (on the table's device), moves them to the ids' device and
dequantizes them there: ``(q * scale * embed_scale)`` in fp32, cast once to the compute ``dtype``. The table
can therefore stay on the CPU while the model trains on a GPU.

The int8 table can also live in a file (raw int8, row-major) that ``q`` memory-maps privately: see
:meth:`Int8Embedding.map_table` and the ``table_file`` argument of :meth:`Int8Embedding.random` and
:meth:`Int8Embedding.from_embedding`, which write the file a chunk of rows at a time, so the whole int8 table is
never resident. A training step gathers only its ~2k rows, so the process then holds the pages of the rows it
has touched (a few pages per row) instead of the whole 1.9 GiB. The OS page cache still holds those pages, and
counts them against a cgroup's memory limit, but they are clean and the kernel can drop them under pressure. To
keep that cost per row, mapping first flushes the file and drops it from the page cache (the pages written are
large folios, each mapped whole on a fault) and advises random access (no read-ahead); the first lookup of a
row therefore reads it from disk. The fp32 scales (4 bytes per row) stay in memory.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import torch
import torch.nn.functional as F
from torch import nn

# fp32 temporaries while quantizing hold at most this many elements (64 MiB)
DEFAULT_CHUNK_ELEMENTS = 2**24

# madvise through libc: Python's mmap objects can advise their own pages, but a module holding one could no
# longer be deep-copied, and torch.from_file gives no handle on its mapping
_LIBC = ctypes.CDLL(None) if os.name == "posix" else None


def _rows_per_chunk(embedding_dim: int, chunk_rows: int | None) -> int:
    return chunk_rows or max(1, DEFAULT_CHUNK_ELEMENTS // embedding_dim)


def _advise(table: torch.Tensor, advice_name: str) -> None:
    """Pass ``madvise`` advice (e.g. ``"MADV_RANDOM"``) for a mapped table's pages; a no-op where unsupported."""
    advice = getattr(mmap, advice_name, None)
    if _LIBC is not None and advice is not None:
        # advice only: a failure changes speed and residency, never the values read
        _LIBC.madvise(ctypes.c_void_p(table.data_ptr()), ctypes.c_size_t(table.nbytes), advice)


@contextlib.contextmanager
def _table_writer(path: Path) -> Iterator[BinaryIO]:
    """A file that replaces ``path`` once the block completes; a failed write leaves ``path`` as it was.

    Writing beside ``path`` and renaming also keeps any live map of the old file valid: truncating a mapped file
    in place would make every later read of its pages fault (SIGBUS).
    """
    partial = path.with_name(path.name + ".partial")
    try:
        with open(partial, "wb") as f:
            yield f
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def _write_rows(f: BinaryIO, table: torch.Tensor, step: int) -> None:
    """Append a (V, D) table of any device and dtype to ``f`` as raw int8, ``step`` rows at a time."""
    for start in range(0, table.shape[0], step):
        # ordinary writes: the bytes go to the page cache, never into this process's mapped (resident) pages
        f.write(table[start:start + step].to("cpu", torch.int8).contiguous().numpy())


def _map_file(path: Path, num: int, dim: int) -> torch.Tensor:
    """Map ``path`` privately as a (num, dim) int8 tensor: pages are read on first touch, writes stay private."""
    size = path.stat().st_size
    if size != num * dim:
        raise ValueError(f"{path}: the table file holds {size} bytes, but a {num} x {dim} int8 table needs "
                         f"{num * dim}; pass the file written for this table, or write it with map_table(path)")
    with open(path, "rb") as f:
        # Drop the file from the page cache (flushing it first: dirty pages cannot be dropped). Pages written
        # through the page cache sit in large folios that a fault maps whole (measured on Linux 6.18, ext4:
        # 2.5 MiB resident for one 8 KiB row); read back on demand under MADV_RANDOM, they come a page at a time.
        os.fsync(f.fileno())
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    table = torch.from_file(str(path), shared=False, size=num * dim, dtype=torch.int8).view(num, dim)
    _advise(table, "MADV_RANDOM")  # lookups jump between rows: read-ahead would only inflate residency
    return table


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
    A CPU table can be memory-mapped from a file (:meth:`map_table`, or ``table_file=`` when building it);
    ``state_dict()`` then returns the mapped ``q``, which saves as an ordinary tensor.

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
        # (file, address of its map) while q is mapped; the address tells a replaced or deep-copied q apart
        self._mapping: tuple[Path, int] | None = None

    @property
    def table_device(self) -> torch.device:
        """Where the int8 table and its scales live."""
        return self.q.device

    @property
    def table_file(self) -> Path | None:
        """The file ``q`` is memory-mapped from, or None for a table held in memory."""
        if self._mapping is None or self.q.data_ptr() != self._mapping[1]:
            return None
        return self._mapping[0]

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

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # A mapped table loads into its file: copying into the private map would instead copy every page into
        # anonymous memory, leaving the whole table resident and the file stale.
        key, path = prefix + "q", self.table_file
        source = state_dict.get(key)
        # assign=True takes the given tensor as q, and the default load reports a missing key or a bad shape
        if (path is None or not isinstance(source, torch.Tensor) or source.shape != self.q.shape
                or local_metadata.get("assign_to_params_buffers", False)):
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                          unexpected_keys, error_msgs)
            return
        rest = {k: v for k, v in state_dict.items() if k != key}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if strict:
            missing_keys.remove(key)  # loaded below, not missing
        with _table_writer(path) as f:
            _write_rows(f, source.detach(), _rows_per_chunk(self.embedding_dim, None))
        self._map(path)

    def _map(self, path: Path) -> Int8Embedding:
        self.q = _map_file(path, self.num_embeddings, self.embedding_dim)  # frees the table q held before
        self._mapping = (path, self.q.data_ptr())
        return self

    def map_table(self, path: str | os.PathLike, *, write: bool = True) -> Int8Embedding:
        """Back ``q`` by a private memory map of ``path``, freeing the in-memory int8 table.

        Lookups stay bit-identical; afterwards only the pages of the rows looked up are resident (see the module
        docstring). Writes into ``q`` stay private to this process; ``load_state_dict`` rewrites the file.

        Args:
            path: file for the raw int8 table (row-major, V x D bytes); written beside and renamed into place,
                so a map of an older ``path`` stays valid.
            write: True writes the current table to ``path`` first, in chunks of rows; False maps an existing
                file (e.g. written earlier by ``table_file=``) and leaves ``scale`` to the caller.

        Returns:
            self, with its table on the CPU.

        Raises:
            ValueError: the file's size is not V x D bytes, or ``write`` with a table on the meta device.
        """
        path = Path(path)
        if write:
            if self.q.is_meta:
                raise ValueError(f"map_table({str(path)!r}): the table is on the meta device, so there is nothing "
                                 "to write; fill it first (load_state_dict) or build it with random(table_file=...)")
            if self.table_file is not None:
                _advise(self.q, "MADV_SEQUENTIAL")  # the copy reads every page: let the kernel read ahead
            with _table_writer(path) as f:
                _write_rows(f, self.q, _rows_per_chunk(self.embedding_dim, None))
        # the table and its scales share a device (scales of a meta table are left for the caller to fill)
        if self.scale.is_meta:
            self.scale = torch.empty(self.num_embeddings, dtype=torch.float32)
        elif self.scale.device.type != "cpu":
            self.scale = self.scale.cpu()
        return self._map(path)

    def move_table(self, device: torch.device | str) -> Int8Embedding:
        """Move ``q`` and ``scale`` to ``device`` (the one way to move the table). Returns self.

        A mapped table is copied whole into memory on ``device`` (the CPU included) and stops being mapped.
        """
        if self.table_file is not None:
            _advise(self.q, "MADV_SEQUENTIAL")  # the copy reads every page: let the kernel read ahead
            self.q = self.q.to(device, copy=True)
            self._mapping = None
        else:
            self.q = self.q.to(device)
        self.scale = self.scale.to(device)
        return self

    def _fill(self, step: int, quantize_chunk: Callable[[int, int, torch.Tensor, torch.Tensor], None],
              table_file: str | os.PathLike | None) -> Int8Embedding:
        """Fill the table ``step`` rows at a time; with ``table_file``, through a reused chunk into that file.

        ``quantize_chunk(start, end, q_out, scale_out)`` writes rows [start, end) into the (end - start, D) int8
        and (end - start,) fp32 slices it is given.
        """
        num = self.num_embeddings
        if table_file is None:
            for start in range(0, num, step):
                end = min(start + step, num)
                quantize_chunk(start, end, self.q[start:end], self.scale[start:end])
            return self
        path = Path(table_file)
        chunk = torch.empty(min(step, num), self.embedding_dim, dtype=torch.int8)  # (C, D): all of q ever held
        with _table_writer(path) as f:
            for start in range(0, num, step):
                end = min(start + step, num)
                quantize_chunk(start, end, chunk[:end - start], self.scale[start:end])
                _write_rows(f, chunk[:end - start], step)
        return self._map(path)

    @classmethod
    def from_embedding(cls, module: nn.Embedding, *, dtype: torch.dtype | None = None,
                       table_device: torch.device | str | None = None, chunk_rows: int | None = None,
                       table_file: str | os.PathLike | None = None) -> Int8Embedding:
        """Quantize an ``nn.Embedding`` (or a subclass with ``embed_scale``, like Gemma's scaled embeddings).

        Only a chunk of rows is ever copied to fp32, and no reference to the float table is kept: it is freed
        once the caller swaps this module in and drops the old one.

        Args:
            module: the embedding to convert; its ``embed_scale`` (float or 0-d tensor) is kept if it has one.
            dtype: compute dtype of the returned rows; None for the module's weight dtype.
            table_device: where the int8 table lives; None for the module's weight device (the CPU with
                ``table_file``).
            chunk_rows: rows quantized at a time; None keeps the fp32 temporaries near 64 MiB.
            table_file: None keeps the int8 table in memory; a path writes it there a chunk at a time (the whole
                int8 table is never resident) and memory-maps it, as :meth:`map_table` does.

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
        return cls.from_rows(lambda start, end: weight[start:end], module.num_embeddings, module.embedding_dim,
                             padding_idx=module.padding_idx, embed_scale=embed_scale, dtype=dtype or weight.dtype,
                             table_device=weight.device if table_device is None else table_device,
                             chunk_rows=chunk_rows, table_file=table_file)

    @classmethod
    def from_rows(cls, read_rows: Callable[[int, int], torch.Tensor], num_embeddings: int, embedding_dim: int, *,
                  padding_idx: int | None = None, embed_scale: float | None = None,
                  dtype: torch.dtype = torch.bfloat16, table_device: torch.device | str = "cpu",
                  chunk_rows: int | None = None, table_file: str | os.PathLike | None = None) -> Int8Embedding:
        """Quantize a float table that ``read_rows(start, end)`` hands over a chunk of rows at a time.

        The rows may live anywhere (another device, a file): only one chunk is ever read and copied to fp32, and
        each chunk is quantized straight into the table on ``table_device`` (or into ``table_file``), so moving a
        float table from the CPU to a GPU this way never puts its float copy on the GPU.

        Args:
            read_rows: ``read_rows(start, end) -> (end - start, D)`` float rows [start, end).
            num_embeddings, embedding_dim, padding_idx, embed_scale, dtype, table_device: as in the constructor.
            chunk_rows: rows read at a time; None keeps the fp32 temporaries near 64 MiB.
            table_file: as in :meth:`from_embedding`.

        Returns:
            The filled int8 embedding.
        """
        if table_file is not None:
            _check_cpu_table(table_device, table_file)
            table_device = "cpu"
        out = cls(num_embeddings, embedding_dim, padding_idx=padding_idx, embed_scale=embed_scale, dtype=dtype,
                  table_device=table_device)

        def quantize_chunk(start: int, end: int, q_out: torch.Tensor, scale_out: torch.Tensor) -> None:
            _quantize_into(read_rows(start, end).to(q_out.device), q_out, scale_out)

        return out._fill(_rows_per_chunk(embedding_dim, chunk_rows), quantize_chunk, table_file)

    @classmethod
    def random(cls, num_embeddings: int, embedding_dim: int, std: float = 1.0,
               generator: torch.Generator | None = None, *, padding_idx: int | None = None,
               embed_scale: float | None = None, dtype: torch.dtype = torch.bfloat16,
               table_device: torch.device | str = "cpu", chunk_rows: int | None = None,
               table_file: str | os.PathLike | None = None) -> Int8Embedding:
        """A table of N(0, std^2) rows, drawn and quantized a chunk at a time (the float table never exists whole).

        For memory benchmarks of models built on the meta device. The padding row is zero, as in ``nn.Embedding``.
        The same generator state gives the same table with or without ``table_file``.

        Args:
            num_embeddings, embedding_dim, padding_idx, embed_scale, dtype, table_device: as in the constructor.
            std: standard deviation of the float rows before quantization.
            generator: random generator (its device draws the rows); None for the global CPU one.
            chunk_rows: rows drawn at a time; None keeps the fp32 temporaries near 64 MiB.
            table_file: None keeps the int8 table in memory; a path writes it there a chunk at a time (the whole
                int8 table is never resident) and memory-maps it, as :meth:`map_table` does.

        Returns:
            The filled int8 embedding.
        """
        if table_file is not None:
            _check_cpu_table(table_device, table_file)
        out = cls(num_embeddings, embedding_dim, padding_idx=padding_idx, embed_scale=embed_scale, dtype=dtype,
                  table_device=table_device)
        draw_device = generator.device if generator is not None else "cpu"

        def quantize_chunk(start: int, end: int, q_out: torch.Tensor, scale_out: torch.Tensor) -> None:
            rows = torch.randn(end - start, embedding_dim, generator=generator, device=draw_device).mul_(std)
            if out.padding_idx is not None and start <= out.padding_idx < end:
                rows[out.padding_idx - start] = 0
            _quantize_into(rows, q_out, scale_out)

        return out._fill(_rows_per_chunk(embedding_dim, chunk_rows), quantize_chunk, table_file)

    def extra_repr(self) -> str:
        text = (f"{self.num_embeddings}, {self.embedding_dim}, padding_idx={self.padding_idx}, "
                f"embed_scale={self.embed_scale}, dtype={self.dtype}, table_device={self.table_device}")
        path = self.table_file
        return text if path is None else f"{text}, table_file={str(path)!r} (memory-mapped)"


def _check_cpu_table(table_device: torch.device | str | None, table_file: str | os.PathLike) -> None:
    """A table mapped from a file lives on the CPU: reject any other ``table_device``."""
    if table_device is not None and torch.device(table_device).type != "cpu":
        raise ValueError(f"table_file={str(table_file)!r} maps the table into CPU memory, but table_device="
                         f"{table_device!r}; pass table_device='cpu' (or None), or drop table_file and use "
                         "move_table(device) after building")


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
