"""Peak-memory measurement: the CPU resident high-water mark, the CUDA allocator's peak, and
on the CPU also the allocator's view (tensor_peak_bytes: the tensors alive at once); and the
one reader of the memory still available (available_bytes). Every caller (engines, the
interactive encode, the CLI's --tile auto, the benchmarks) uses these."""

from __future__ import annotations

import os
from typing import Any, Callable, Optional

import torch

from sam_blocked.attention.threads import steps_on_threads

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


def reset_peak_memory(device: torch.device | str = "cpu") -> bool:
    """reset_peak where it can be done: False where the peak cannot be measured (no
    /proc/self/clear_refs: not Linux, or not allowed), and then peak_bytes means nothing."""
    try:
        reset_peak(device)
        return True
    except OSError:
        return False


def measure_peak(device: torch.device | str, fn: Callable[[], object]) -> int:
    """Run fn() and return its peak memory on `device` over what was in use before it
    (CUDA: the allocator's peak; CPU: the resident high-water mark), at least 0."""
    reset_peak(device)
    before = current_bytes(device)
    fn()
    return max(0, peak_bytes(device) - before)


def available_bytes(device: torch.device | str = "cpu") -> Optional[int]:
    """Bytes that can still be allocated on `device`, None if unknown: on CUDA the driver's
    free memory plus what torch's allocator holds cached but unallocated; on the CPU MemAvailable."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return None


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


def tensor_peak_bytes(fn: Callable[[], Any]) -> tuple[Any, int]:
    """Run fn() and return (its result, the peak bytes of CPU tensors alive at once during it,
    over those alive before it): the allocator's view, as CUDA's max_memory_allocated reports
    it, read from torch.profiler's memory events (their allocations and frees in time order).

    The resident high-water mark (peak_bytes) also holds what a process maps once (kernels'
    code, thread stacks) and what glibc keeps after a free; this counts tensors only, the
    figure sam_blocked.plan_memory's count predicts. The profiler slows small ops a little,
    and on this project's CPU a GEMM after a profiled run ran 20-25% slower: time fn, and
    anything else, before it. The profiler sees this thread only, so the patched encoder's
    steps run here one after the other (attention.threads), as on one thread: compare with
    the planner's count for threads=1. On more threads each step takes its share of the
    budget, so the steps at once hold about as much.
    """
    from torch.profiler import ProfilerActivity, profile

    # torch's profiler sees this thread's allocations only: the patched steps run here, one
    # after the other, each within the whole step budget (with more threads, each within its share)
    with steps_on_threads(1), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    changes: list[tuple[int, int]] = []  # (time ns, bytes: + allocated, - freed)

    def walk(node) -> None:
        fields = node.extra_fields
        if type(fields).__name__ == "_ExtraFields_Allocation" and fields.device.type == "cpu":
            changes.append((node.start_time_ns, fields.alloc_size))
        for child in node.children:
            walk(child)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    alive = peak = 0
    for _, change in sorted(changes, key=lambda c: c[0]):
        alive += change
        peak = max(peak, alive)
    return result, peak
