"""Row-wise int8 embedding: exact agreement with its reference, the quantization error bound, module plumbing."""

from __future__ import annotations

import gc
import math
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kernels.int8_embedding as int8_module
from kernels.int8_embedding import Int8Embedding, int8_embedding_ref, quantize_rows

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


def test_rejects_what_it_cannot_convert():
    with pytest.raises(ValueError, match="max_norm"):
        Int8Embedding.from_embedding(nn.Embedding(V, D, max_norm=1.0))
    with pytest.raises(ValueError, match="meta"):
        Int8Embedding.from_embedding(nn.Embedding(V, D, device="meta"))


def test_repr_names_the_layout():
    text = repr(Int8Embedding(V, D, padding_idx=-2, embed_scale=2.0))
    assert f"{V}, {D}, padding_idx={V - 2}, embed_scale=2.0" in text and "table_device=cpu" in text
