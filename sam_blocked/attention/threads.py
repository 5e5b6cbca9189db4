"""A call's CPU steps shared out among threads, each step on one thread.

torch runs every CPU operator on all of its threads: an OpenMP parallel region that ends
in a barrier. The patched encoder is ~10,000 such operators a call (query bands, windows,
token chunks). When another process shares a core with one of those threads, every
barrier waits for it: measured here (vit_b, 1024 px, 2 cores, one busy process), 2 threads
took longer than 1 (benchmarks/bench_contention.py, docs/benchmarks/contention.md).

Here the independent steps of one call (token chunks, groups of windows, heads, query
bands) go to `threads` worker threads instead; each worker runs its steps' operators on
its own thread alone, and takes the next step when it is done with one. A thread slowed
by another process then takes fewer steps instead of holding the other at a barrier.
Together the workers use torch's thread count (torch.get_num_threads(), the user's
setting, read at each call), no more.

A worker's operators run on one thread through that worker thread's own settings: its
OpenMP thread count (omp_set_num_threads, which sets the calling thread's) and MKL's
thread-local count (mkl_set_num_threads_local). Neither changes the caller's threads or
torch's process-wide count. The caller's autograd and autocast state is carried into the
workers for each call (they are thread-local in torch).

run_steps runs the steps in the calling thread, one after the other as before, when:
- one thread is asked for (torch.set_num_threads(1), a Ray worker with one CPU) or there
  is one step;
- the call is itself a step of an outer call (a window's attention inside a group of windows);
- this torch does not run its CPU operators through OpenMP, or its OpenMP library cannot
  be found (step_threads says which).
"""

from __future__ import annotations

import ctypes
import os
import queue
import threading
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, Optional, Sequence, TypeVar

import torch

T = TypeVar("T")

# .in_step: this thread runs a step of run_steps, .share: that run's threads,
# .threads: steps_on_threads' count
_local = threading.local()


def _openmp_library() -> Optional[ctypes.CDLL]:
    """The OpenMP runtime torch's CPU operators use, when it can be found (Linux), else None."""
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return None
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if ("libgomp" in line or "libiomp" in line or "libomp" in line) and "/" in line}
    except OSError:
        paths = set()
    torch_lib = os.path.join(os.path.dirname(torch.__file__), "")
    for path in sorted(paths, key=lambda p: (not p.startswith(torch_lib), p)):  # torch's own copy first
        try:
            lib = ctypes.CDLL(path)
            lib.omp_set_num_threads  # noqa: B018 (raises AttributeError when absent)
            return lib
        except (OSError, AttributeError):
            continue
    return None


def _mkl_local_setter() -> Optional[Callable[[int], int]]:
    """MKL's mkl_set_num_threads_local as torch links it, when torch was built with MKL."""
    if not torch.backends.mkl.is_available():
        return None
    folder = os.path.join(os.path.dirname(torch.__file__), "lib")
    for name in ("libtorch_cpu.so", "libtorch_cpu.dylib"):
        try:
            return ctypes.CDLL(os.path.join(folder, name)).MKL_Set_Num_Threads_Local
        except (OSError, AttributeError):
            continue
    return None


_OPENMP: Optional[ctypes.CDLL] = None
_MKL_LOCAL: Optional[Callable[[int], int]] = None
_RUNTIME_READ = False


def _runtime() -> Optional[ctypes.CDLL]:
    global _OPENMP, _MKL_LOCAL, _RUNTIME_READ
    if not _RUNTIME_READ:
        _OPENMP, _MKL_LOCAL = _openmp_library(), _mkl_local_setter()
        _RUNTIME_READ = True
    return _OPENMP


def shares_steps() -> bool:
    """Whether run_steps can run steps on threads of their own here (torch's OpenMP is reachable)."""
    return _runtime() is not None


def step_threads(device: Optional[torch.device | str]) -> int:
    """How many threads run_steps shares a call's steps among on `device`: torch's thread
    count on the CPU (or steps_on_threads' count), 1 elsewhere, inside a step, or where
    torch's OpenMP cannot be reached."""
    if device is None or torch.device(device).type != "cpu" or getattr(_local, "in_step", False):
        return 1
    chosen = getattr(_local, "threads", None)
    if chosen is not None:
        return chosen
    threads = torch.get_num_threads()
    return threads if threads > 1 and shares_steps() else 1


def steps_at_once(device: Optional[torch.device | str]) -> int:
    """How many steps run at once where a step is sized now: inside a step, its run's
    threads (its own inner steps run inline); elsewhere step_threads(device)."""
    if device is not None and torch.device(device).type == "cpu" and getattr(_local, "in_step", False):
        return _local.share
    return step_threads(device)


@contextmanager
def steps_on_threads(threads: int, in_step: bool = False) -> Iterator[None]:
    """Within the block, this thread sizes and runs CPU steps as if step_threads were `threads`
    (in_step: as if inside one of the steps of a run on `threads` threads). The planner
    counts a run on that many threads; memory.measure.tensor_peak_bytes runs the steps in
    its own thread (threads=1), where torch's profiler sees them."""
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a whole number >= 1, got {threads!r}")
    before = tuple(getattr(_local, name, None) for name in ("threads", "in_step", "share"))
    _local.threads = threads
    if in_step:
        _local.in_step, _local.share = True, threads
    try:
        yield
    finally:
        _local.threads, _local.in_step, _local.share = before


class _Workers:
    """`size` daemon threads, each running its operators on itself alone, waiting for jobs."""

    def __init__(self, size: int):
        self.size = size
        self.jobs: "queue.SimpleQueue[Callable[[], None]]" = queue.SimpleQueue()
        for i in range(size):
            threading.Thread(target=self._serve, name=f"sam_blocked-step-{i}", daemon=True).start()

    def _serve(self) -> None:
        # torch sets a thread's OpenMP and MKL counts to its own the first time the thread
        # runs a parallel loop (at::internal::lazy_init_num_threads): let that happen first
        torch.ones(1 << 16).sum()
        _one_thread()
        _local.in_step, _local.share = True, 1
        while True:
            self.jobs.get()()


def _one_thread() -> None:
    """This thread's OpenMP team and MKL calls: itself alone (its own settings, nobody else's)."""
    _runtime().omp_set_num_threads(1)
    if _MKL_LOCAL is not None:
        _MKL_LOCAL(1)


_workers: dict[int, _Workers] = {}
_workers_lock = threading.Lock()


def _forget_workers() -> None:  # a forked child has none of its parent's threads
    _workers.clear()


os.register_at_fork(after_in_child=_forget_workers)


def _get_workers(size: int) -> _Workers:
    with _workers_lock:
        if size not in _workers:
            _workers[size] = _Workers(size)
        return _workers[size]


def _cpu_autocast() -> tuple[bool, torch.dtype]:
    """The caller's CPU autocast (enabled, dtype): torch >= 2.4 names the device, older has its own calls."""
    if hasattr(torch, "get_autocast_dtype"):
        return torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")
    return torch.is_autocast_cpu_enabled(), torch.get_autocast_cpu_dtype()


def run_steps(step: Callable[[T, int], None], items: Iterable[T], threads: int) -> None:
    """step(item, slot) for every item, on `threads` threads (step_threads), each item once.

    Steps must be independent: each writes only its own part of the outputs. `slot`
    (0 <= slot < threads) names the thread running the step, so a step can reuse a buffer
    of its own: no two steps with the same slot run at once. The first error raised by a
    step is raised here once the running steps have finished; steps not yet started are
    dropped.

    Args:
        step: the work on one item; its return value is ignored.
        items: the steps' inputs, taken in order.
        threads: at most this many steps run at once (1, or where shares_steps() is False:
            in this thread, in order).
    """
    items = list(items) if not isinstance(items, Sequence) else items
    threads = min(threads, len(items))
    if threads <= 1 or not shares_steps():  # without per-thread counts, workers would each use every core
        for item in items:
            step(item, 0)
        return
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()
    autocast = _cpu_autocast()
    next_item = iter(range(len(items)))
    lock = threading.Lock()
    errors: list[BaseException] = []
    done = threading.Semaphore(0)

    def serve(slot: int) -> None:
        _local.share = threads
        _one_thread()  # again, should anything have set this thread's counts since
        try:
            with torch.inference_mode(inference), torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=autocast[1], enabled=autocast[0]):
                while True:
                    with lock:
                        i = None if errors else next(next_item, None)
                    if i is None:
                        return
                    step(items[i], slot)
        except BaseException as error:  # noqa: BLE001 (re-raised in the caller)
            with lock:
                errors.append(error)
        finally:
            done.release()

    workers = _get_workers(threads)
    for slot in range(threads):
        workers.jobs.put(lambda slot=slot: serve(slot))
    for _ in range(threads):
        done.acquire()
    if errors:
        raise errors[0]
