"""Where the run happens and in which precision: one place for the device-dependent choices."""

from __future__ import annotations

import os
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

from gemma_lowmem.errors import UserError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def default_device() -> torch.device:
    """The first CUDA GPU when there is one, else the CPU (``LOCAL_RANK`` picks the GPU under torchrun)."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def bf16_supported(device: torch.device) -> bool:
    """Whether the device computes bf16 matmuls natively.

    GPUs before Ampere (T4, V100) do not. CPUs need oneDNN's bf16 path (AVX-512 or AMX): on an AVX2-only CPU a bf16
    matmul falls back to a reference kernel, measured 90x slower than fp32 (2048x2048x640: 6.7 s vs 73 ms).
    """
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def weight_dtype(device: torch.device, name: str = "auto") -> torch.dtype:
    """dtype for frozen non-quantized weights: bf16 where supported; fp16 on GPUs without bf16; fp32 on CPUs
    without native bf16 (there bf16 storage would make every matmul fall back to the slow kernel)."""
    if name != "auto":
        return DTYPES[name]
    if bf16_supported(device):
        return torch.bfloat16
    return torch.float16 if device.type == "cuda" else torch.float32


@dataclass(frozen=True)
class Precision:
    """Autocast settings of a run.

    Attributes:
        dtype: autocast dtype, or None for plain fp32.
        use_scaler: fp16 needs a GradScaler against gradient underflow; bf16 does not.
    """

    device_type: str
    dtype: torch.dtype | None
    use_scaler: bool

    def autocast(self) -> AbstractContextManager:
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)


def resolve_precision(device: torch.device, name: str = "auto") -> Precision:
    """Pick autocast: bf16 where native (CPUs with AVX-512/AMX, Ampere+ GPUs), fp16 + GradScaler on GPUs without
    bf16 (Colab T4), plain fp32 on CPUs without native bf16."""
    if name == "auto":
        name = "bf16" if bf16_supported(device) else "fp16" if device.type == "cuda" else "fp32"
    if name == "bf16" and device.type == "cuda" and not bf16_supported(device):
        raise UserError(f"precision=bf16 is not supported on {torch.cuda.get_device_name(device)}: use fp16")
    if name == "fp16" and device.type == "cpu":
        raise UserError("precision=fp16 autocast is for GPUs; on the CPU use --precision bf16 or fp32")
    dtype = None if name == "fp32" else DTYPES[name]
    return Precision(device.type, dtype, use_scaler=name == "fp16")
