"""What the benchmark scripts share: the machine's name, one configuration per child process, CSV.

The scripts run as `python benchmarks/bench_X.py` and import this file from their own folder.
torch is imported only inside the functions that need it, so that a child can cap its memory
(cap_child_memory) before torch allocates anything.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import re
import resource
import subprocess
import sys
import time
from pathlib import Path
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

GIB = 2**30
MIB = 2**20
RESULTS = Path(__file__).resolve().parent / "results"
MARKER = "RESULT "  # a child's one line of JSON starts with this


# --- the machine -------------------------------------------------------------------------


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else platform.processor()."""
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return model


def ram_gib() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB


def machine_info(device: str) -> dict[str, str]:
    """CPU model, usable cores, RAM, torch version, and the GPU when the device is CUDA."""
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info = {"cpu": cpu_model(), "cores": str(cores), "ram_gb": f"{ram_gib():.0f}", "torch": torch.__version__, "gpu": ""}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def machine_label(info: dict[str, str]) -> str:
    """The machine in words, for plot titles and the CSV's machine column."""
    base = info["gpu"] or f"{info['cpu']}, {info['cores']} cores"
    return f"{base}, {info['ram_gb']} GB RAM, torch {info['torch']}"


def machine_slug(info: dict[str, str]) -> str:
    """The machine for file names: the GPU, or the CPU and its cores, lower-case with dashes."""
    name = info["gpu"] or f"{info['cpu']} {info['cores']}c"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def default_cap_gb() -> float:
    """20 GiB, or 85% of this machine's RAM if that is less."""
    return round(min(20.0, 0.85 * ram_gib()), 1)


def check_sweep_args(parser, sizes: list[int], device: str) -> None:
    """parser.error unless every size is a positive multiple of 16 and a CUDA device exists."""
    bad = [s for s in sizes if s <= 0 or s % 16]
    if bad:
        parser.error(f"--sizes {' '.join(map(str, bad))}: sizes must be positive multiples of 16")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            parser.error(f"--device {device}: CUDA is not available on this machine; use --device cpu")


# --- one configuration, in the child ---------------------------------------------------------


def cap_child_memory(cap_gb: float, device: str) -> None:
    """On the CPU, cap this process's private data (RLIMIT_DATA) at cap_gb GiB.

    Call before anything large exists: a failed allocation is then a RuntimeError in torch
    (recorded as OOM by oom_note), not the kernel's OOM killer taking the machine.
    """
    if not device.startswith("cuda"):
        resource.setrlimit(resource.RLIMIT_DATA, (int(cap_gb * GIB), resource.getrlimit(resource.RLIMIT_DATA)[1]))


def oom_note(error: BaseException) -> str:
    """The CSV note for an out-of-memory error; re-raises any other RuntimeError."""
    message = str(error)
    if not isinstance(error, MemoryError) and not re.search(r"can't allocate memory|out of memory", message):
        raise error
    wanted = re.search(r"allocate (\d+) bytes", message)
    return f"failed allocation of {int(wanted.group(1)) / GIB:.1f} GiB" if wanted else message[:120]


def print_result(row: dict) -> None:
    """The child's answer to run_in_child: one MARKER line of JSON."""
    print(MARKER + json.dumps(row), flush=True)


# --- the sweep, in the parent ------------------------------------------------------------


def run_in_child(script: str, args: list[str], timeout: float) -> dict:
    """Run `python script --child *args` and return the row it printed with print_result.

    A child past `timeout` seconds gives status "timeout", one killed by a signal "killed",
    one that printed no result "error" with the last line of its stderr as the note.
    """
    command = [sys.executable, str(Path(script).resolve()), "--child", *args]
    row = {"status": "error", "note": ""}
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "seconds": timeout, "note": f"over {timeout} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith(MARKER)]
    if lines:
        row = json.loads(lines[-1][len(MARKER) :])
    elif done.returncode < 0:
        row["status"] = "killed"
        row["note"] = f"signal {-done.returncode} after {time.perf_counter() - start:.0f} s (the kernel's OOM killer?)"
    else:
        row["note"] = (done.stderr.strip().splitlines() or ["no output"])[-1][:200]
    return row


def cap_mb(cap_gb: float, device: str) -> int | str:
    """The CSV's cap_mb: the child memory cap in MiB on the CPU, empty on CUDA (no cap)."""
    return round(cap_gb * GIB / MIB) if not device.startswith("cuda") else ""


def read_rows(path: Path) -> list[dict]:
    """The rows of an earlier run's CSV, or none if there is no such file."""
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_rows(path: Path, rows: Iterable[dict], fields: list[str], order: Optional[Callable[[dict], tuple]] = None) -> None:
    """Write `rows` (sorted by `order`, if given) as CSV with columns `fields`; other keys are dropped."""
    rows = sorted(rows, key=order) if order else list(rows)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def sweep_csv_path(args, prefix: str, info: Optional[dict[str, str]] = None) -> Path:
    """<args.out_dir>/<prefix>_<args.machine, or the slug of this machine's `info`>.csv"""
    return args.out_dir / f"{prefix}_{args.machine or machine_slug(info or machine_info(args.device))}.csv"


def print_table(parser, args, prefix: str, markdown_table: Callable[[list[dict]], str]) -> int:
    """--table: print the sweep's CSV (sweep_csv_path) as the README's Markdown table; 0, or a parser error if there is none."""
    path = sweep_csv_path(args, prefix)
    rows = read_rows(path)
    if not rows:
        parser.error(f"--table: no results at {path}; run the sweep first, or name the machine with --machine")
    print(markdown_table(rows))
    return 0


@dataclass
class SweepCSV:
    """A sweep's CSV, benchmarks/results/<prefix>_<machine>.csv: rows keyed by `key`, written after each one.

    Rows of an earlier run in the same file are kept unless re-measured (or args.fresh).
    """

    info: dict[str, str]
    label: str
    path: Path
    rows: dict
    key: Callable[[dict], tuple]
    fields: list[str]
    order: Callable[[dict], tuple]

    @classmethod
    def open(cls, args, prefix: str, key: Callable, fields: list[str], order: Callable) -> "SweepCSV":
        """Name the machine, pick the file (args.out_dir, args.machine), print what the sweep does."""
        info = machine_info(args.device)
        label = machine_label(info)
        path = sweep_csv_path(args, prefix, info)
        args.out_dir.mkdir(parents=True, exist_ok=True)
        rows = {} if args.fresh else {key(r): r for r in read_rows(path)}
        print(f"machine: {label}\nmemory cap (CPU, per child): {args.mem_cap_gb:g} GiB; timeout {args.timeout} s; writing {path}")
        return cls(info, label, path, rows, key, fields, order)

    def add(self, row: dict) -> None:
        """Keep `row` and rewrite the CSV: a long sweep keeps what it measured."""
        self.rows[self.key(row)] = row
        write_rows(self.path, self.rows.values(), self.fields, self.order)

    def finish(self, plot: Callable[[list[dict], Path, str], None]) -> Path:
        """Plot every row to the PNG next to the CSV; return the CSV's path."""
        plot(list(self.rows.values()), self.path.with_suffix(".png"), self.label)
        print(f"wrote {self.path} and {self.path.with_suffix('.png')}")
        return self.path


# --- the speed floor ---------------------------------------------------------------------


def gemm_rate(dtype: str = "float32", device: str = "cpu", shape: tuple[int, int, int] = (2048, 2048, 2048), repeat: int = 5, max_seconds: float = 10.0) -> float:
    """FLOP/s of one plain (m x k) @ (k x n) matmul in this process: the fastest of `repeat`
    after a warm-up. The default square product ran as fast as any of SAM's own shapes here
    (vit_b's MLP, 4096 x 768 @ 768 x 3072, ran 10% slower), so the floor it gives is strict.
    Divide a model's FLOPs (sam_blocked.memory.flops.encoder_flops) by it for the time a GEMM-bound
    run would take.

    The timed calls stop early once they have taken `max_seconds` together (one at least):
    on a CPU without bfloat16 instructions (no AVX512-BF16 / AMX) one bfloat16 2048^3
    product on one thread took 20 s here."""
    import torch

    m, k, n = shape
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=generator).to(device, getattr(torch, dtype))
    b = torch.randn(k, n, generator=generator).to(device, getattr(torch, dtype))
    best, spent = float("inf"), 0.0
    with torch.inference_mode():
        for i in range(repeat + 1):
            start = time.perf_counter()
            a @ b
            if device.startswith("cuda"):
                torch.cuda.synchronize(device)
            if i:  # the first call is the warm-up
                took = time.perf_counter() - start
                best, spent = min(best, took), spent + took
                if spent > max_seconds:
                    break
    return 2 * m * k * n / best


# --- busy processes beside a measurement (issue 23) ------------------------------------------

BUSY_LOOP = "import time\nend = time.monotonic() + {seconds}\nn = 0\nwhile time.monotonic() < end:\n    n += 1\n"


def start_busy(count: int, seconds: float) -> list[subprocess.Popen]:
    """`count` Python processes, each spinning a pure-Python loop for at most `seconds`."""
    code = BUSY_LOOP.format(seconds=seconds)
    return [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(count)]


def stop_busy(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
