"""Memory sizes and measurement: parse ``--max-mem``, read peak memory (CUDA allocator, or CPU peak RSS)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from gemma_lowmem.errors import UserError

GiB = 1024**3
_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": GiB,
    "tib": 1024**4,
}


def parse_size(text: str) -> int:
    """Parse a memory size like ``8GB``, ``8GiB``, ``7.5G``, ``8000MB`` into bytes.

    ``G``/``GB`` are decimal (10^9) and ``GiB`` binary (2^30), as on disk labels and in ``nvidia-smi``.

    Raises:
        UserError: when the text is not a size.
    """
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise UserError(f"--max-mem {text!r} is not a size; write e.g. 8GB, 8GiB, 7.5G or 8000MB")
    size = float(match.group(1)) * _UNITS[unit]
    if size <= 0:
        raise UserError(f"--max-mem {text!r} must be larger than zero")
    return int(size)


def format_size(n_bytes: float) -> str:
    return f"{n_bytes / GiB:.2f} GiB"


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


class PeakMemory:
    """Peak memory of a phase: CUDA max allocated and reserved, or the process's peak RSS on CPU.

    ``reset()`` starts a new phase: ``torch.cuda.reset_peak_memory_stats`` on GPUs, and on Linux writing 5 to
    ``/proc/self/clear_refs`` resets the kernel's high-water mark (VmHWM) to the current RSS.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass  # not Linux, or not permitted: the peak then covers the whole process life

    def read(self) -> dict[str, int]:
        """Bytes: ``{"peak_allocated", "peak_reserved"}`` on CUDA, ``{"peak_rss"}`` on CPU."""
        if self.device.type == "cuda":
            return {
                "peak_allocated": torch.cuda.max_memory_allocated(self.device),
                "peak_reserved": torch.cuda.max_memory_reserved(self.device),
            }
        kib = _status_kib("VmHWM")
        if kib is None:
            import resource  # ru_maxrss is KiB on Linux; used where /proc is missing

            kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return {"peak_rss": kib * 1024}

    def peak(self) -> int:
        """The single number to compare with the budget: reserved on CUDA, RSS on CPU."""
        stats = self.read()
        return stats.get("peak_reserved", stats.get("peak_rss", 0))


BYTES_PER_WEIGHT = {"int8": 1.0, "nf4": 0.5, "none": None}


def estimate_weight_bytes(model_config: object, quant: str, dtype_bytes: int) -> int:
    """Bytes of the frozen weights, from the config alone (the model is built on the meta device).

    Linear layers of the decoder are quantized (int8: 1 byte, nf4: 0.5 byte + scales); embeddings, norms and the
    tied head stay in the weights' dtype.
    """
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    total, seen = 0.0, set()
    per_quantized = BYTES_PER_WEIGHT[quant] or dtype_bytes
    for name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if id(param) in seen:  # a tied head shares the embedding's tensor
                continue
            seen.add(id(param))
            quantized = isinstance(module, torch.nn.Linear) and param_name == "weight" and "lm_head" not in name
            total += param.numel() * (per_quantized if quantized else dtype_bytes)
    return int(total)
