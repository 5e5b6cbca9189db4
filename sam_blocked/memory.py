"""Peak-memory measurement (CPU resident high-water mark, CUDA allocator) and stock estimates."""

from __future__ import annotations

import os
from typing import Optional

import torch

from sam_blocked.attention import plan_blocks

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


def stock_attention_bytes(batch: int, heads: int, grid: tuple[int, int], head_dim: int, itemsize: int = 4) -> int:
    """Estimated extra peak of one stock global Attention call: three live (B*heads, N, N)
    tensors while the bias is added (scores, scores+rel_h, +rel_w), plus qkv and its copy."""
    n = grid[0] * grid[1]
    scores = batch * heads * n * n * itemsize
    qkv = 3 * batch * heads * n * head_dim * itemsize
    return 3 * scores + 2 * qkv


def blocked_attention_bytes(
    batch: int, heads: int, grid: tuple[int, int], head_dim: int, chunks: int = 16, max_block_mb: Optional[float] = None, itemsize: int = 4
) -> int:
    """Estimated extra peak of one patched Attention call: the output, one head group's
    q, k, v (projected and permuted), and two float32 score blocks."""
    n = grid[0] * grid[1]
    plan = plan_blocks(batch * heads, grid, chunks, max_block_mb)
    heads_per_step = max(1, min(heads, plan.group // batch))
    out = batch * n * heads * head_dim * itemsize
    qkv = 2 * 3 * batch * heads_per_step * n * head_dim * itemsize
    return 2 * out + qkv + 2 * plan.block_bytes


def format_bytes(n: float) -> str:
    """Bytes as MiB or GiB, e.g. "381.0 MiB"."""
    sign = "-" if n < 0 else ""
    n = abs(n)
    return f"{sign}{n / 2**30:.2f} GiB" if n >= 2**30 else f"{sign}{n / MIB:.1f} MiB"
