"""Row-wise int8 embedding: exact agreement with its reference, the quantization error bound, module plumbing,
and the table memory-mapped from a file (same values, file layout, resident memory, state dicts)."""

from __future__ import annotations

import copy
import ctypes
import ctypes.util
import gc
import io
import math
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gemma_lowmem_kernels.int8_embedding as int8_module
from gemma_lowmem_kernels.int8_embedding import Int8Embedding, int8_embedding_ref, quantize_rows

V, D = 1003, 67  # odd on purpose


def make_table(seed: int = 0) -> torch.Tensor:
    """(V, D) fp32 table with an all-zero row and a row dominated by one large value."""
    weight = torch.randn(V, D, generator=torch.Generator().manual_seed(seed))
    weight[5] = 0
    weight[6, 3] = 1000.0
    return weight


def make_ids(seed: int = 1, shape: tuple[int, ...] = (3, 85)) -> torch.Tensor:
    ids = torch.randint(0, V, shape, generator=torch.Generator().manual_seed(seed))
    ids[0, :3] = torch.tensor([0, V - 1, 5])  # both ends and the zero row
    return ids


class ScaledEmbedding(nn.Embedding):
    """Gemma-style scaled word embedding with its scale as a 0-d buffer, like transformers' version."""

    def __init__(self, num: int, dim: int, embed_scale: float):
        super().__init__(num, dim)
        self.register_buffer("embed_scale", torch.tensor(embed_scale), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids) * self.embed_scale


def test_quantize_rows_error_bound():
    weight = make_table()
    q, scale = quantize_rows(weight)
    assert q.dtype == torch.int8 and q.shape == (V, D)
    assert scale.dtype == torch.float32 and scale.shape == (V,)
    assert q.abs().max() <= 127
    assert torch.all(q[5] == 0) and scale[5] == 0  # the zero row: no NaN
    nonzero = torch.ones(V, dtype=torch.bool)
    nonzero[5] = False
    assert torch.all(q[nonzero].abs().amax(dim=1) == 127)  # absmax maps to +-127
    err = (q.float() * scale[:, None] - weight).abs()
    assert torch.all(err <= scale[:, None] / 2 * (1 + 1e-6))
    assert err[6].max() > 1  # the outlier row pays for its large scale: the bound is per row


@pytest.mark.parametrize("chunk_rows", [1, 7, V + 5])
def test_quantize_rows_chunking_is_exact(chunk_rows):
    weight = make_table(seed=2)
    q, scale = quantize_rows(weight)
    q_chunked, scale_chunked = quantize_rows(weight, chunk_rows=chunk_rows)
    assert torch.equal(q, q_chunked) and torch.equal(scale, scale_chunked)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("embed_scale", [None, math.sqrt(D)])
def test_matches_reference_exactly(dtype, embed_scale):
    weight = make_table(seed=3)
    ids = make_ids()
    emb = nn.Embedding(V, D) if embed_scale is None else ScaledEmbedding(V, D, embed_scale)
    with torch.no_grad():
        emb.weight.copy_(weight)
    module = Int8Embedding.from_embedding(emb, dtype=dtype, chunk_rows=10)
    out = module(ids)
    assert out.dtype == dtype and out.shape == (*ids.shape, D)
    assert torch.equal(out, int8_embedding_ref(ids, weight, embed_scale=embed_scale, dtype=dtype))


def test_close_to_float_embedding():
    weight = make_table(seed=4)
    ids = make_ids(seed=5)
    module = Int8Embedding.from_embedding(nn.Embedding.from_pretrained(weight), dtype=torch.float32)
    _, scale = quantize_rows(weight)
    err = (module(ids) - F.embedding(ids, weight)).abs()  # (3, 85, D)
    assert torch.all(err <= scale[ids][..., None] / 2 * (1 + 1e-6))


def test_keeps_embed_scale_and_matches_scaled_module():
    emb = ScaledEmbedding(V, D, embed_scale=math.sqrt(D))
    ids = make_ids(seed=6)
    module = Int8Embedding.from_embedding(emb)
    assert module.embed_scale == pytest.approx(math.sqrt(D))
    assert module.dtype == torch.float32  # dtype=None follows the source weight
    expected = emb(ids)
    _, scale = quantize_rows(emb.weight)
    bound = scale[ids][..., None] / 2 * math.sqrt(D) * (1 + 1e-5)
    assert torch.all((module(ids) - expected).abs() <= bound)


def test_from_transformers_gemma3n_scaled_embedding():
    modeling = pytest.importorskip("transformers.models.gemma3n.modeling_gemma3n")
    emb = modeling.Gemma3nTextScaledWordEmbedding(V, D, padding_idx=0, embed_scale=16.0).to(torch.bfloat16)
    module = Int8Embedding.from_embedding(emb)
    assert module.embed_scale == 16.0 and module.padding_idx == 0 and module.dtype == torch.bfloat16
    ids = make_ids(seed=7)
    torch.testing.assert_close(module(ids), emb(ids), rtol=0.02, atol=0.02 * 16 * emb.weight.abs().max().item())


def test_no_trainable_parameters():
    module = Int8Embedding.from_embedding(nn.Embedding(V, D))
    assert list(module.parameters()) == []
    assert {name: b.dtype for name, b in module.named_buffers()} == {"q": torch.int8, "scale": torch.float32}
    assert not module(make_ids()).requires_grad


def test_state_dict_round_trip():
    module = Int8Embedding.from_embedding(ScaledEmbedding(V, D, 3.0), dtype=torch.bfloat16)
    state = module.state_dict()
    assert set(state) == {"q", "scale"}
    restored = Int8Embedding(V, D, embed_scale=3.0, dtype=torch.bfloat16)
    restored.load_state_dict(state)
    ids = make_ids(seed=8)
    assert torch.equal(restored(ids), module(ids))


def test_does_not_keep_the_float_table_alive():
    emb = nn.Embedding(V, D)
    weight_ref = weakref.ref(emb.weight)
    module = Int8Embedding.from_embedding(emb)
    del emb
    gc.collect()
    assert weight_ref() is None
    assert module.q.shape == (V, D)


def test_random_fills_in_chunks(monkeypatch):
    chunk_rows = 100
    seen = []
    quantize = int8_module._quantize_into

    def recording_quantize(rows, q_out, scale_out):
        seen.append(rows.shape)
        quantize(rows, q_out, scale_out)

    monkeypatch.setattr(int8_module, "_quantize_into", recording_quantize)
    module = Int8Embedding.random(V, D, 0.02, torch.Generator().manual_seed(9), padding_idx=-1, chunk_rows=chunk_rows,
                                  dtype=torch.float32)
    assert seen == [(chunk_rows, D)] * (V // chunk_rows) + [(V % chunk_rows, D)]  # the float table is never whole
    assert module.q.shape == (V, D) and module.q.dtype == torch.int8 and module.scale.dtype == torch.float32
    assert module.padding_idx == V - 1
    rows = module(torch.arange(V))  # (V, D) dequantized
    assert torch.all(rows[V - 1] == 0)
    assert rows[:-1].std().item() == pytest.approx(0.02, rel=0.05)
    again = Int8Embedding.random(V, D, 0.02, torch.Generator().manual_seed(9), padding_idx=-1, chunk_rows=chunk_rows)
    assert torch.equal(again.q, module.q)  # same seed, same table


def test_table_stays_put_under_module_to():
    model = nn.Sequential(Int8Embedding.from_embedding(nn.Embedding(V, D)), nn.Linear(D, 2))
    model.to(torch.float64)
    model.half()
    model.to("meta")  # the Linear moves, the table does not
    table = model[0]
    assert model[1].weight.is_meta
    assert table.q.dtype == torch.int8 and table.scale.dtype == torch.float32
    assert table.table_device == torch.device("cpu") and table.scale.device == torch.device("cpu")
    table.move_table("meta")
    assert table.q.is_meta and table.scale.is_meta


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpu_table_serves_gpu_ids():
    module = Int8Embedding.from_embedding(ScaledEmbedding(V, D, 2.0), dtype=torch.bfloat16)
    ids = make_ids(seed=10)
    out = module(ids.cuda())
    assert out.device.type == "cuda" and module.table_device == torch.device("cpu")
    assert torch.equal(out.cpu(), module(ids))
    module.move_table("cuda")
    assert torch.equal(module(ids.cuda()).cpu(), out.cpu())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_mapped_table_serves_gpu_ids_and_moves_to_gpu(tmp_path):
    emb = ScaledEmbedding(V, D, 2.0).cuda()
    in_memory = Int8Embedding.from_embedding(emb, table_device="cpu")
    mapped = Int8Embedding.from_embedding(emb, table_file=tmp_path / "table.int8")  # quantized on the GPU
    assert mapped.table_device == torch.device("cpu") and mapped.scale.device == torch.device("cpu")
    ids = make_ids(seed=28).cuda()
    assert torch.equal(mapped(ids), in_memory(ids))
    mapped.move_table("cuda")
    assert mapped.table_file is None and mapped.q.is_cuda and torch.equal(mapped(ids), in_memory(ids))


def test_rejects_what_it_cannot_convert():
    with pytest.raises(ValueError, match="max_norm"):
        Int8Embedding.from_embedding(nn.Embedding(V, D, max_norm=1.0))
    with pytest.raises(ValueError, match="meta"):
        Int8Embedding.from_embedding(nn.Embedding(V, D, device="meta"))


def test_repr_names_the_layout():
    text = repr(Int8Embedding(V, D, padding_idx=-2, embed_scale=2.0))
    assert f"{V}, {D}, padding_idx={V - 2}, embed_scale=2.0" in text and "table_device=cpu" in text


SMAPS_ROLLUP = Path("/proc/self/smaps_rollup")


def vm_rss_bytes() -> int:
    """This process's resident set (anonymous and file-backed pages), counted by walking its page tables.

    Not /proc/self/status's VmRSS: that reads the kernel's per-CPU counters without summing them, and once read an
    unchanged VmRSS across a fresh 64 MiB table that was written row by row (CI, kernel 6.x).
    """
    for line in SMAPS_ROLLUP.read_text().splitlines():
        if line.startswith("Rss:"):
            return int(line.split()[1]) * 1024  # reported in kB
    raise AssertionError(f"no Rss line in {SMAPS_ROLLUP}")


def file_table(path: Path, num: int = V, dim: int = D) -> torch.Tensor:
    """The raw int8 file as a (num, dim) tensor, read with ordinary file reads."""
    return torch.from_numpy(np.fromfile(path, dtype=np.int8).reshape(num, dim))


@pytest.mark.parametrize("how", ["map_table", "table_file"])
def test_mapped_lookups_match_in_memory(tmp_path, how):
    emb = ScaledEmbedding(V, D, 2.0)
    with torch.no_grad():
        emb.weight.copy_(make_table(seed=11))
    in_memory = Int8Embedding.from_embedding(emb, dtype=torch.float32, chunk_rows=100)
    path = tmp_path / "table.int8"
    if how == "map_table":
        mapped = Int8Embedding.from_embedding(emb, dtype=torch.float32, chunk_rows=100)
        assert mapped.map_table(path) is mapped
    else:
        mapped = Int8Embedding.from_embedding(emb, dtype=torch.float32, chunk_rows=100, table_file=path)
    assert in_memory.table_file is None and mapped.table_file == path
    assert path.stat().st_size == V * D  # raw int8, nothing else
    assert torch.equal(file_table(path), in_memory.q)  # row-major
    ids = make_ids(seed=12)
    assert torch.equal(mapped(ids), in_memory(ids))
    assert torch.equal(mapped.scale, in_memory.scale) and mapped.table_device == torch.device("cpu")
    assert f"table_file={str(path)!r} (memory-mapped)" in repr(mapped)
    assert "memory-mapped" not in repr(in_memory)
    assert not list(tmp_path.glob("*.partial"))


def test_random_table_file_matches_random(tmp_path):
    kwargs = dict(padding_idx=3, dtype=torch.float32, chunk_rows=97)  # 97 does not divide V: a short last chunk
    in_memory = Int8Embedding.random(V, D, 0.5, torch.Generator().manual_seed(13), **kwargs)
    path = tmp_path / "random.int8"
    mapped = Int8Embedding.random(V, D, 0.5, torch.Generator().manual_seed(13), table_file=path, **kwargs)
    assert mapped.table_file == path and path.stat().st_size == V * D
    assert torch.equal(mapped.q, in_memory.q) and torch.equal(mapped.scale, in_memory.scale)
    assert torch.equal(file_table(path), in_memory.q)
    assert torch.all(mapped(torch.tensor([3])) == 0)  # the padding row


@pytest.mark.skipif(not SMAPS_ROLLUP.exists(), reason="needs /proc/self/smaps_rollup (Linux)")
def test_table_file_keeps_the_table_out_of_resident_memory(tmp_path):
    num, dim = 8192, 8192  # 64 MiB of int8
    table_bytes = num * dim
    # 16-row chunks keep the fp32 temporaries at 512 KiB: freed temporaries of a few MiB stay in malloc's heap
    # (measured: up to 48 MiB more VmRSS with 256-row chunks), which would blur what the table itself costs
    chunk_rows = 16
    ids = torch.randint(0, num, (16,), generator=torch.Generator().manual_seed(14))
    # warm up the code paths (and their library pages) so that the measurements see only the table
    Int8Embedding.random(64, dim, table_file=tmp_path / "warmup.int8", chunk_rows=chunk_rows)(ids % 64)
    gc.collect()
    # Freed heap that earlier tests left resident would serve the in-memory table without a new page (seen after
    # tests/evaluation): give it back first, so that a table held in memory shows in VmRSS.
    ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
    before = vm_rss_bytes()
    mapped = Int8Embedding.random(num, dim, 0.02, torch.Generator().manual_seed(15), chunk_rows=chunk_rows,
                                  table_file=tmp_path / "table.int8")
    rows = mapped(ids)
    mapped_growth = vm_rss_bytes() - before
    before = vm_rss_bytes()
    in_memory = Int8Embedding.random(num, dim, 0.02, torch.Generator().manual_seed(15), chunk_rows=chunk_rows)
    in_memory_growth = vm_rss_bytes() - before
    assert mapped_growth < 0.25 * table_bytes, f"mapped table: VmRSS grew {mapped_growth / 2**20:.1f} MiB"
    assert in_memory_growth > 0.9 * table_bytes  # the same measurement does see a table held in memory
    assert torch.equal(rows, in_memory(ids))


def test_map_table_rejects_a_file_of_the_wrong_size(tmp_path):
    path = tmp_path / "short.int8"
    path.write_bytes(bytes(V * D - 1))
    module = Int8Embedding(V, D)
    with pytest.raises(ValueError, match="short.int8") as info:
        module.map_table(path, write=False)
    assert f"{V * D - 1} bytes" in str(info.value) and str(V * D) in str(info.value)
    assert module.table_file is None


def test_map_table_maps_an_existing_file(tmp_path):
    path = tmp_path / "table.int8"
    built = Int8Embedding.random(V, D, generator=torch.Generator().manual_seed(16), table_file=path)
    ids = make_ids(seed=17)
    for table_device in ["cpu", "meta"]:  # e.g. a model built on the meta device
        reopened = Int8Embedding(V, D, table_device=table_device).map_table(path, write=False)
        reopened.scale.copy_(built.scale)  # the file holds q only
        assert reopened.table_file == path and reopened.scale.device == torch.device("cpu")
        assert torch.equal(reopened(ids), built(ids))


def test_map_table_rewrites_a_mapped_file_safely(tmp_path):
    path, other = tmp_path / "a.int8", tmp_path / "b.int8"
    module = Int8Embedding.random(V, D, generator=torch.Generator().manual_seed(18), table_file=path)
    expected = module.q.clone()
    old_q = module.q  # a live map of the first file, e.g. held by a state dict
    module.map_table(path)  # rewritten beside and renamed: the old map must stay readable (no SIGBUS)
    module.map_table(other)  # from a mapped table to a new file
    assert module.table_file == other
    assert torch.equal(old_q, expected) and torch.equal(module.q, expected)
    assert torch.equal(file_table(path), expected) and torch.equal(file_table(other), expected)


def test_failed_write_leaves_no_file(tmp_path, monkeypatch):
    calls = []

    def failing_quantize(rows, q_out, scale_out):
        calls.append(rows.shape)
        if len(calls) == 2:
            raise RuntimeError("disk full")

    monkeypatch.setattr(int8_module, "_quantize_into", failing_quantize)
    path = tmp_path / "table.int8"
    with pytest.raises(RuntimeError, match="disk full"):
        Int8Embedding.from_embedding(nn.Embedding(V, D), chunk_rows=100, table_file=path)
    assert list(tmp_path.iterdir()) == []  # neither the table nor its partial file


def test_mapped_state_dict_round_trip(tmp_path):
    path = tmp_path / "table.int8"
    mapped = Int8Embedding.random(V, D, generator=torch.Generator().manual_seed(19), embed_scale=3.0,
                                  table_file=path)
    buffer = io.BytesIO()
    torch.save(mapped.state_dict(), buffer)  # the mapped q saves as an ordinary tensor
    buffer.seek(0)
    state = torch.load(buffer)
    restored = Int8Embedding(V, D, embed_scale=3.0)
    restored.load_state_dict(state)
    ids = make_ids(seed=20)
    assert restored.table_file is None and torch.equal(restored(ids), mapped(ids))


def test_load_state_dict_into_a_mapped_table_rewrites_its_file(tmp_path):
    source = Int8Embedding.random(V, D, generator=torch.Generator().manual_seed(21))
    path = tmp_path / "table.int8"
    mapped = Int8Embedding.random(V, D, generator=torch.Generator().manual_seed(22), table_file=path)
    assert not torch.equal(mapped.q, source.q)
    result = mapped.load_state_dict(source.state_dict())
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert mapped.table_file == path  # still mapped, now from the rewritten file
    assert torch.equal(file_table(path), source.q)
    ids = make_ids(seed=23)
    assert torch.equal(mapped(ids), source(ids))
    with pytest.raises(RuntimeError, match="size mismatch for q"):  # the default checks still apply
        mapped.load_state_dict({"q": source.q[:-1], "scale": source.scale})
    mapped.load_state_dict(source.state_dict(), assign=True)  # assign takes the tensors as they are
    assert mapped.table_file is None and mapped.q.data_ptr() == source.q.data_ptr()


def test_move_table_copies_a_mapped_table(tmp_path):
    path = tmp_path / "table.int8"
    module = Int8Embedding.random(V, D, generator=torch.Generator().manual_seed(24), table_file=path)
    module.to(torch.float64)  # whole-model casts leave the mapped table alone too
    assert module.table_file == path
    ids = make_ids(seed=25)
    expected = module(ids)
    mapped_ptr = module.q.data_ptr()
    module.move_table("cpu")
    assert module.table_file is None and module.q.data_ptr() != mapped_ptr  # copied into memory
    assert "memory-mapped" not in repr(module) and torch.equal(module(ids), expected)


def test_deepcopy_of_a_mapped_table_is_in_memory(tmp_path):
    path = tmp_path / "table.int8"
    module = Int8Embedding.random(V, D, generator=torch.Generator().manual_seed(26), table_file=path)
    clone = copy.deepcopy(module)
    ids = make_ids(seed=27)
    assert clone.table_file is None and module.table_file == path
    assert torch.equal(clone(ids), module(ids))


def test_table_file_needs_a_cpu_table(tmp_path):
    path = tmp_path / "table.int8"
    with pytest.raises(ValueError, match="table_device='meta'"):
        Int8Embedding.random(V, D, table_device="meta", table_file=path)
    with pytest.raises(ValueError, match="meta device"):
        Int8Embedding(V, D, table_device="meta").map_table(path)
    assert not path.exists()
