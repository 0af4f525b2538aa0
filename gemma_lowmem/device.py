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

    GPUs: compute capability 8.0 (Ampere) or newer. ``torch.cuda.is_bf16_supported()`` is not the test: by default
    it counts emulation and answers True on a T4 (7.5), where bf16 runs several times slower and SDPA's fast kernels
    refuse it. CPUs need oneDNN's bf16 path (AVX-512 or AMX): on an AVX2-only CPU a bf16 matmul falls back to a
    reference kernel, measured 90x slower than fp32 (2048x2048x640: 6.7 s vs 73 ms).
    """
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    return device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def _auto_precision(device: torch.device) -> str:
    if bf16_supported(device):
        return "bf16"
    return "fp16" if device.type == "cuda" else "fp32"


def weight_dtype(device: torch.device, name: str = "auto", precision: str = "auto") -> torch.dtype:
    """dtype of the frozen non-quantized weights (norms, small float linears, the rows the int8 tables return).

    They follow the run's precision: bf16 under bf16 autocast; fp32 under fp32 and under fp16 autocast. fp16 cannot
    hold Gemma's residual stream: in the real Gemma 3 270M it reaches ~1e5 (fp16's max is 65,504) and a forward
    with fp16 weights is inf by layer 8. With fp32 weights the embedding's rows, the residual additions and the
    norms stay fp32 while autocast still runs every matmul in fp16 (measured on the 270M, int8 base, 2 x 1024-token
    conversations: loss 2.19617 under fp16 autocast, 2.19620 in fp32). An explicit ``name`` overrides this.
    """
    if name != "auto":
        return DTYPES[name]
    return torch.bfloat16 if resolve_precision(device, precision).dtype == torch.bfloat16 else torch.float32


@dataclass(frozen=True)
class Precision:
    """Autocast settings of a run.

    Attributes:
        device_type: where autocast applies ("cuda" or "cpu").
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
    """Pick autocast: bf16 where native (CPUs with AVX-512/AMX, GPUs of compute capability 8.0+), fp16 + GradScaler
    on GPUs without bf16 (Colab T4, V100), plain fp32 on CPUs without native bf16.

    ``fp16`` is accepted on the CPU too (slow there: it exists to check the T4's numerics without a GPU).
    """
    if name == "auto":
        name = _auto_precision(device)
    if name == "bf16" and device.type == "cuda" and not bf16_supported(device):
        major, minor = torch.cuda.get_device_capability(device)
        raise UserError(f"--precision bf16 needs a GPU of compute capability 8.0 or newer; "
                        f"{torch.cuda.get_device_name(device)} has {major}.{minor}: use --precision fp16 (or auto)")
    dtype = None if name == "fp32" else DTYPES[name]
    return Precision(device.type, dtype, use_scaler=name == "fp16")
