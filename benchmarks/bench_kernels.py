"""Micro benchmarks (pytest-benchmark): the chunked loss against full logits, int8_linear against bitsandbytes'
Linear8bitLt, packed masks, first-fit-decreasing.

Run them explicitly (they are not under ``tests/``)::

    python -m pytest benchmarks/bench_kernels.py --benchmark-columns=min,median,max,rounds
    BENCH_VOCAB=262144 BENCH_TOKENS=2048 python -m pytest benchmarks/bench_kernels.py -k loss   # Gemma's vocab
    BENCH_TOKENS=2048 BENCH_HIDDEN=2048 BENCH_INTERMEDIATE=8192 \
        python -m pytest benchmarks/bench_kernels.py -k int8_linear   # a Gemma 3n E2B MLP projection

The loss shapes default to a small vocabulary so that a busy 2-core machine finishes in about a minute;
``BENCH_VOCAB``, ``BENCH_TOKENS`` and ``BENCH_HIDDEN`` set them (Gemma 3 270M: 262144 and 640). The int8 linear
maps ``BENCH_TOKENS`` x ``BENCH_HIDDEN`` to ``BENCH_INTERMEDIATE`` (default 4 x hidden) features in bf16, forward
and input gradient (the frozen weight gets none). ``BENCH_THREADS`` sets torch's threads: on a machine shared
with other jobs, fewer threads than cores time more steadily (two threads on two busy cores wait on each other
at every op).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from gemma_lowmem.data.packing import first_fit_decreasing, packed_attention_masks
from gemma_lowmem_kernels import int8_linear, linear_cross_entropy, linear_cross_entropy_ref

VOCAB = int(os.environ.get("BENCH_VOCAB", 16384))
TOKENS = int(os.environ.get("BENCH_TOKENS", 512))
HIDDEN = int(os.environ.get("BENCH_HIDDEN", 640))
INTERMEDIATE = int(os.environ.get("BENCH_INTERMEDIATE", 4 * HIDDEN))
ANSWER_SHARE = 0.25  # CNN/DailyMail rubric conversations: ~244 answer tokens of ~972 carry the loss
LOSSES = {"chunked": linear_cross_entropy, "full_logits": linear_cross_entropy_ref}


@pytest.fixture(scope="module", autouse=True)
def threads():
    before = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", before)))
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def loss_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(TOKENS, HIDDEN, generator=g)  # (N, H)
    weight = torch.randn(VOCAB, HIDDEN, generator=g) * HIDDEN**-0.5  # (V, H): frozen, as Gemma's tied head
    labels = torch.randint(0, VOCAB, (TOKENS,), generator=g)  # (N,)
    labels[: int(TOKENS * (1 - ANSWER_SHARE))] = -100  # the prompt carries no loss
    return hidden, weight, labels


@pytest.mark.parametrize("impl", LOSSES)
def test_loss_forward_backward(benchmark, impl, loss_inputs):
    hidden, weight, labels = loss_inputs
    loss_fn = LOSSES[impl]

    def step() -> torch.Tensor:
        h = hidden.detach().requires_grad_()
        loss = loss_fn(h, weight, labels, reduction="sum")
        loss.backward()
        return h.grad

    grad = benchmark.pedantic(step, rounds=3, warmup_rounds=1)
    benchmark.extra_info.update(tokens=TOKENS, vocab=VOCAB, hidden=HIDDEN, loss_tokens=int((labels != -100).sum()))
    assert grad.shape == hidden.shape and torch.isfinite(grad).all()


@pytest.fixture(scope="module")
def int8_layer() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """A quantized bitsandbytes ``Linear8bitLt`` (HIDDEN -> INTERMEDIATE, no bias) in training mode, as in LoRA
    runs, with its int8 weight (out, in) and row scales (out,) for ``int8_linear``."""
    bnb = pytest.importorskip("bitsandbytes")
    module = bnb.nn.Linear8bitLt(HIDDEN, INTERMEDIATE, bias=False, has_fp16_weights=False)
    with torch.no_grad():
        module.weight.data.normal_(0, HIDDEN**-0.5, generator=torch.Generator().manual_seed(0))
    module = module.to("cpu").train()  # .to quantizes: weight is the int8 CB, weight.SCB the row absmax
    # read before the first forward, which moves SCB into module.state
    return module, module.weight.data, module.weight.SCB / 127


@pytest.mark.parametrize("impl", ["int8_linear", "bnb_linear8bitlt"])
def test_int8_linear_forward_backward(benchmark, impl, int8_layer):
    module, q, scale = int8_layer
    x = torch.randn(TOKENS, HIDDEN, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)  # (N, H)
    layer = module if impl == "bnb_linear8bitlt" else (lambda h: int8_linear(h, q, scale))

    def step() -> torch.Tensor:
        h = x.detach().requires_grad_()
        layer(h).sum().backward()
        return h.grad

    grad = benchmark.pedantic(step, rounds=3, warmup_rounds=1)
    benchmark.extra_info.update(tokens=TOKENS, in_features=HIDDEN, out_features=INTERMEDIATE, dtype="bfloat16")
    assert grad.shape == x.shape and torch.isfinite(grad).all()


# Two packed rows of 2048 tokens, conversations as long as CNN/DailyMail rubric conversations (583-1273 tokens).
PACKED_ROWS = [[972, 1000], [800, 1100, 120]]


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_packed_masks(benchmark, implementation):
    masks = benchmark.pedantic(
        packed_attention_masks, args=(PACKED_ROWS, 2048),
        kwargs={"sliding_window": 512, "implementation": implementation}, rounds=5, warmup_rounds=1,
    )
    assert masks["full_attention"].shape == masks["sliding_attention"].shape == (2, 1, 2048, 2048)


def test_first_fit_decreasing_100k(benchmark):
    lengths = np.random.default_rng(0).integers(583, 1274, size=100_000).tolist()
    bins = benchmark.pedantic(first_fit_decreasing, args=(lengths, 2048), rounds=3, warmup_rounds=0)
    packed = sorted(i for b in bins for i in b)
    assert packed == list(range(len(lengths)))
    benchmark.extra_info["packing_efficiency"] = sum(lengths) / (len(bins) * 2048)
