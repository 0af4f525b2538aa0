"""LoRA dropout: the mask's statistics, its scaling, one mask per distinct input, the same mask in a recompute."""

from __future__ import annotations

import math

import pytest
import torch

import gemma_lowmem.lora_dropout as lora_dropout
from gemma_lowmem.config import LoraConfig
from gemma_lowmem.data.collate import collate
from gemma_lowmem.lora_dropout import LANES, SharedInputDropout, keep_mask
from gemma_lowmem.loss import sft_loss
from gemma_lowmem.model import add_lora
from tests.test_train import MODELS, examples, lora_grads

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


@pytest.mark.parametrize("p", [0.05, 0.3])
def test_keep_rate_of_the_whole_mask_and_of_each_16_bit_lane(p):
    torch.manual_seed(0)
    n = 4 * 250_000
    mask = keep_mask(torch.Size([n]), p, torch.device("cpu"))
    keep = 1 - round(p * LANES) / LANES
    for name, part in {"all": mask, **{f"lane {i}": mask.view(-1, 4)[:, i] for i in range(4)}}.items():
        sigma = math.sqrt(keep * (1 - keep) / part.numel())
        rate = part.float().mean().item()
        assert abs(rate - keep) < 6 * sigma, f"{name}: keep rate {rate:.5f}, expected {keep:.5f} +- {sigma:.1e}"


def test_kept_values_are_scaled_by_the_inverse_keep_rate_and_dropped_ones_are_zero():
    torch.manual_seed(1)
    x = torch.randn(1000, 37, dtype=torch.float64)  # odd sizes: the last random word is cut
    drop = SharedInputDropout(0.25)
    out = drop(x)
    kept = out != 0
    assert 0.7 < kept.double().mean().item() < 0.8
    assert drop.scale == pytest.approx(1 / 0.75, rel=1e-15)  # 0.25 is a whole number of 1/65536 steps
    torch.testing.assert_close(out[kept], x[kept] * drop.scale, rtol=0, atol=0)
    assert out.dtype == x.dtype and out.shape == x.shape


def test_off_in_eval_mode_and_at_zero():
    x = torch.randn(8, 5)
    assert SharedInputDropout(0.5).eval()(x) is x
    assert SharedInputDropout(0.0)(x) is x
    with pytest.raises(ValueError, match="must be in"):
        SharedInputDropout(1.0)


def test_the_same_input_gets_the_same_dropped_tensor_and_a_new_input_a_new_mask():
    torch.manual_seed(2)
    drop = SharedInputDropout(0.5)
    x = torch.randn(64, 32)
    first = drop(x)
    assert drop(x) is first  # q, k and v read one tensor: one mask, one multiply
    y = x.clone()  # equal values, another tensor (the next layer, or a recompute)
    assert not torch.equal(drop(y) != 0, first != 0)


def lora_with_dropout(name: str, p: float, checkpointing: bool) -> torch.nn.Module:
    model = add_lora(MODELS[name](seed=0), LoraConfig(r=4, alpha=8, dropout=p), checkpointing).double()
    g = torch.Generator().manual_seed(1)
    for pname, param in model.named_parameters():
        if "lora_B" in pname:  # B = 0 at init hides dropout from the loss: make the adapter do something
            param.data = torch.randn(param.shape, generator=g, dtype=param.dtype) * 0.1
    return model.train()


def test_projections_that_read_one_input_share_its_mask(monkeypatch):
    model = lora_with_dropout("gemma3", 0.5, checkpointing=False)
    inputs: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if name.endswith("lora_A.default"):
            module.register_forward_hook(lambda m, args, out, name=name: inputs.__setitem__(name, args[0]))
    draws = []
    monkeypatch.setattr(lora_dropout, "keep_mask", lambda *a: draws.append(a) or keep_mask(*a))
    batch = collate([[e] for e in examples(2, seed=3)], pad_id=0, packed=False)
    sft_loss(model, batch)

    layers = model.base_model.model.model.layers
    assert all(isinstance(d, SharedInputDropout) for layer in layers for m in layer.modules()
               if isinstance(getattr(m, "lora_dropout", None), torch.nn.ModuleDict) for d in m.lora_dropout.values())
    for i in range(len(layers)):
        def seen(proj: str, i: int = i) -> torch.Tensor:
            return next(t for n, t in inputs.items() if f"layers.{i}." in n and f".{proj}.lora_A" in n)

        assert seen("q_proj") is seen("k_proj") is seen("v_proj")
        assert seen("gate_proj") is seen("up_proj")
        assert seen("o_proj") is not seen("q_proj") and seen("down_proj") is not seen("gate_proj")
    assert len(draws) == 4 * len(layers)  # attention input, o_proj's, the MLP input, down_proj's (PEFT: 7 a layer)


@pytest.mark.parametrize("name", MODELS)
def test_a_checkpointed_recompute_draws_the_same_masks(name):
    """Loss and every LoRA gradient with checkpointing equal those without it, from the same seed (fp64: the two
    paths run the same ops, so only a different mask could separate them), and both differ from dropout off."""
    batch = collate([[e] for e in examples(3, seed=1)], pad_id=0, packed=False)
    runs = {}
    for p, checkpointing in ((0.3, False), (0.3, True), (0.0, False)):
        model = lora_with_dropout(name, p, checkpointing)
        torch.manual_seed(7)
        loss = sft_loss(model, batch)
        loss.backward()
        runs[p, checkpointing] = loss.detach(), lora_grads(model)
    (loss_a, grads_a), (loss_b, grads_b) = runs[0.3, False], runs[0.3, True]
    torch.testing.assert_close(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 0
    for key in grads_a:
        torch.testing.assert_close(grads_a[key], grads_b[key], msg=key)
    assert not torch.isclose(loss_a, runs[0.0, False][0])
