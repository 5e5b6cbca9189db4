"""Peak-memory measurement: the CPU resident high-water mark, the CUDA allocator's peak."""

from __future__ import annotations

import os

import torch

MIB = 2**20


def reset_peak(device: torch.device | str = "cpu") -> None:
    """Start a new peak-memory window for `device` (CPU: the process's resident high-water mark)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        # Linux: writing 5 to clear_refs resets VmHWM to the current resident size.
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")


def current_bytes(device: torch.device | str = "cpu") -> int:
    """Memory in use now: CUDA allocated bytes, or the process's resident set (VmRSS)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    return _proc_status_kib("VmRSS") * 1024


def peak_bytes(device: torch.device | str = "cpu") -> int:
    """Peak since the last reset_peak: CUDA max allocated, or the resident high-water mark (VmHWM)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    return _proc_status_kib("VmHWM") * 1024


def _proc_status_kib(field: str) -> int:
    with open(f"/proc/{os.getpid()}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}: peak memory is measured on Linux only")


def format_bytes(n: float) -> str:
    """Bytes as MiB or GiB, e.g. "381.0 MiB"."""
    sign = "-" if n < 0 else ""
    n = abs(n)
    return f"{sign}{n / 2**30:.2f} GiB" if n >= 2**30 else f"{sign}{n / MIB:.1f} MiB"
