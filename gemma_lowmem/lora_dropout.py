"""LoRA dropout with one mask per distinct input, drawn four mask values per random word.

PEFT gives every adapted projection its own ``nn.Dropout``, so a decoder layer draws seven masks although q/k/v
read one tensor and gate/up another, and on the CPU each ``bernoulli_`` costs ~10 ns per element (torch.profiler:
a third of a 270M training step, more than all its matmuls). :class:`SharedInputDropout` replaces them all with
one module that

- remembers the last input it dropped (by identity, through a weak reference) and hands the projections that read
  the same tensor the same dropped tensor: four draws per layer instead of seven, one multiply for q/k/v, and one
  dropped copy saved for backward instead of three;
- draws its mask from 64-bit random words cut into four 16-bit lanes, a quarter of the generator calls of
  ``bernoulli_`` (the drop probability is rounded to a multiple of 1/65536);
- draws from torch's default generator, whose state non-reentrant checkpointing restores before a recompute, so
  the recompute reproduces the forward's mask exactly (at the same quarter cost).

Inputs are matched by identity. PEFT casts a projection's input to the LoRA weights' dtype where they differ (a
new tensor each time: those projections then draw their own masks, still correct); on the int8 layers under
autocast and in fp32 training nothing is cast, so the inputs are shared.
"""

from __future__ import annotations

import weakref

import torch

LANES = 65536  # 16-bit lanes: drop probability in steps of 1/65536


def keep_mask(shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    """A boolean mask of ``shape``, each element False (dropped) with probability ``round(p * 65536) / 65536``.

    Four mask elements come from each uniform 64-bit word of torch's default generator for ``device``.
    """
    n = shape.numel()
    words = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=device)
    lanes = words.view(torch.int16)[:n].view(shape)  # uniform over [-32768, 32767]
    return lanes >= -LANES // 2 + round(p * LANES)


class SharedInputDropout(torch.nn.Module):
    """Inverted dropout that gives every caller of the same input tensor the same dropped tensor.

    Args:
        p: drop probability, in [0, 1).
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"dropout probability {p} must be in [0, 1)")
        self.p = p
        self.scale = LANES / (LANES - round(p * LANES))  # 1 / keep rate, exact for the rounded probability
        self._input: weakref.ref | None = None  # the last input seen; dies with it, so a new tensor never matches
        self._output: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if self._input is not None and self._input() is x:
            return self._output
        out = x * keep_mask(x.shape, self.p, x.device) * self.scale
        self._input, self._output = weakref.ref(x), out
        return out

    def extra_repr(self) -> str:
        return f"p={self.p}"


def share_lora_dropout(model: torch.nn.Module, p: float) -> int:
    """Give every LoRA layer of a PEFT ``model`` one :class:`SharedInputDropout` (no-op for ``p == 0``).

    Returns:
        The number of LoRA layers that now share it.
    """
    if p == 0:
        return 0
    shared = SharedInputDropout(p)
    layers = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if isinstance(dropouts, torch.nn.ModuleDict):
            for name in dropouts:
                dropouts[name] = shared
            layers += 1
    return layers
