"""Memory as measured: sizes (``--max-mem``), the peak of a phase, the CUDA cap, out-of-memory errors.

Measuring (:class:`PeakMemory`): CUDA max allocated and reserved; on the CPU the process's peak RSS (VmHWM), which
``reset()`` restarts per phase. :func:`return_freed_memory_to_os` keeps glibc from hoarding freed blocks (CPU).
The planner that predicts the peaks is :mod:`gemma_lowmem.planner`.
"""

from __future__ import annotations

import ctypes
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


def _status_kib(field: str, path: str = "/proc/self/status") -> int | None:
    try:
        for line in Path(path).read_text().splitlines():
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


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
CPU_MMAP_THRESHOLD = 2**20
# With glibc's default thresholds a CPU run's peak RSS was this many times the predicted peak (Gemma 3 270M, one
# packed 2048-token row, checkpointing: 4.32 GiB against 1.35 predicted; 1.60 GiB with return_freed_memory_to_os,
# but 39% longer: 185 s against 133 s for the same 3 steps, benchmarks/bench_train.py). ``run.setup`` gives freed
# memory back only when the budget needs it: predicted peak x this factor above the budget.
GLIBC_RETAINED_FACTOR = 3.2


def return_freed_memory_to_os(threshold: int = CPU_MMAP_THRESHOLD) -> bool:
    """Make glibc serve blocks of ``threshold`` bytes and more straight from the OS, and give them back on free.

    By default glibc raises its mmap threshold to the size of each freed block, up to 32 MiB, and serves smaller
    blocks from its heaps, which keep freed memory. Training frees tensors of 1-32 MiB all the time (the int8
    matmuls' dequantized weights, per-layer activations), so the process's RSS ratchets up: measured +0.3 GiB
    peak and +0.4 GiB at rest after two steps of a 2-layer Gemma 3n (E2B widths, 256 tokens). A fixed
    threshold also turns the adjustment off. Call once at startup, on the CPU.

    Returns:
        Whether the setting was applied (False where glibc is not the C library).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold))


class BudgetTooSmall(UserError):
    """No plan fits the budget; ``needed`` is the smallest predicted peak in bytes."""

    def __init__(self, message: str, needed: int) -> None:
        super().__init__(message)
        self.needed = needed


class WeightsExceedBudget(BudgetTooSmall):
    """The frozen weights (and the adapter's states) alone exceed the budget."""


def enforce_cap(budget: int, device: torch.device) -> float | None:
    """Cap this process's CUDA allocator at ``budget`` bytes (``set_per_process_memory_fraction``).

    Beyond the cap, allocations raise ``torch.OutOfMemoryError`` instead of growing (the loop then halves the
    micro-batch: ``train.more_splits``). On the CPU nothing is capped (an address-space limit would count
    mapped files and reserved-but-untouched memory); the peak RSS is measured and reported instead.

    Returns:
        The fraction of the GPU's memory set, or None on the CPU.
    """
    if device.type != "cuda":
        return None
    total = torch.cuda.get_device_properties(device).total_memory
    fraction = min(1.0, budget / total)
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    return fraction


def free_bytes(device: torch.device, budget: int | None = None) -> int:
    """Bytes this process can still allocate on ``device`` (0 when unknown).

    CUDA: the device's free memory plus the allocator's cached blocks, within the cap :func:`enforce_cap` set.
    CPU: the kernel's ``MemAvailable``. With ``budget`` (``--max-mem``), also no more than the budget less what
    the process holds now (CUDA allocated; CPU resident).
    """
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        allocated = torch.cuda.memory_allocated(device)
        cap = torch.cuda.get_per_process_memory_fraction(device) * total
        available = min(free + torch.cuda.memory_reserved(device) - allocated, cap - allocated)
        in_use = allocated
    else:
        available = (_status_kib("MemAvailable", "/proc/meminfo") or 0) * 1024
        in_use = (_status_kib("VmRSS") or 0) * 1024
    if budget is not None:
        available = min(available, budget - in_use)
    return max(0, int(available))


def is_oom(err: BaseException) -> bool:
    """An out-of-memory error from the CUDA caching allocator or the CPU allocator."""
    if isinstance(err, torch.OutOfMemoryError):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)
