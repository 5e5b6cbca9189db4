"""The prepared GPU check of issue 25: five steps in one go, within a wall-clock budget, into one folder.

In order, each with its own time budget (what one step leaves unused goes to the next):
  tests      the CUDA cases of tests/test_attention.py and tests/test_backends.py (pytest -k cuda:
             every backend in float32, bfloat16 and float16 against stock, and their memory),
             then sam_blocked.verify_equivalence of the whole encoder per backend and dtype;
  grid       the backend grid: vit_b, vit_h; one global layer and the whole encoder; 1024, 2048,
             4096 px; batch 1 and 8; bfloat16, float32; stock, stock-sdpa (the full bias, then
             SDPA, as transformers and timm run it) and every backend; timed after a warm-up
             (CUDA events), peak = torch.cuda.max_memory_allocated;
  samfast    segment-anything-fast's workload side by side: vit_h encoder, batch 8, bfloat16,
             1024 px, img/s and peak for stock-sdpa and each backend, with its A100 figures;
  tiles      `sam-blocked segment --tile` on an 8000 x 8000 tiled TIFF mosaic of scikit-image
             photographs, prompts and automatic masks, tiles of 1024, 2048 and 4096 px;
  automasks  the automatic-mask job: `segment --auto` on a 1024 px photo today, and
             benchmarks/bench_amg.py (issue 22) once it has landed.

Every measurement runs in a child process that writes a row as soon as it has one; a cell
that cannot fit (out of memory, or over the step's remaining time by estimate) is a row
saying why, and a child that crashes (a CUDA error poisons its context) is restarted on the
cells left. Writes <out>/gpu_<gpu>_{steps,tests,grid,samfast,tiles,automasks}.csv,
gpu_<gpu>.log and gpu_<gpu>.png: 8 files, as the device tool returns at most 8.

    bash benchmarks/gpu_check.sh                    # on the GPU machine: wheels, then this, into $OUT
    python benchmarks/gpu_check.py --dry-run --out /tmp/check   # the same code on the CPU, tiny sizes: a minute
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py and bench_backends.py
from common import GIB, MIB, gemm_rate, machine_info, machine_label, machine_slug, write_rows  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("tests", "grid", "samfast", "tiles", "automasks")
BUDGET_S = {"tests": 90, "grid": 180, "samfast": 50, "tiles": 100, "automasks": 40}  # 460 of 480 s
MODES = ("stock", "stock-sdpa", "blocked", "sdpa", "bands", "flashbias", "flex", "auto")
FULL = {
    "test_dtypes": ["float32", "bfloat16", "float16"], "verify": ("vit_b", 1024),
    "models": ["vit_b", "vit_h"], "sizes": [1024, 2048, 4096], "batches": [1, 8], "dtypes": ["bfloat16", "float32"], "repeat": 3,
    "samfast": ("vit_h", 1024, 8, "bfloat16"), "samfast_repeat": 10,
    "mosaic": 8000, "tiles": [1024, 2048, 4096], "tile_model": "vit_b", "tile_dtype": "bfloat16", "points_per_side": 8,
    "auto_image": 1024, "auto_model": "vit_b", "auto_dtype": "bfloat16", "auto_points": 32, "flex_compile_s": 30,
}  # fmt: skip
DRY = {
    **FULL, "test_dtypes": ["float32", "bfloat16"], "verify": ("tiny", 64), "models": ["tiny"], "sizes": [64], "batches": [1, 2],
    "repeat": 1, "samfast": ("tiny", 128, 2, "bfloat16"), "samfast_repeat": 2, "mosaic": 600, "tiles": [256, 512],
    "tile_model": "tiny", "tile_dtype": "float32", "points_per_side": 2, "auto_image": 128, "auto_model": "tiny",
    "auto_dtype": "float32", "auto_points": 4,
}  # fmt: skip
# segment-anything-fast's README, vit_h, batch 8, bfloat16, 1024 px, on an A100 40 GB: reference, not measured here
SAMFAST_REFERENCE = [
    {"mode": "reference: segment-anything-fast SDPA (A100 40 GB)", "status": "reference", "peak_mb": 7947, "img_per_s": 21.92},
    {"mode": "reference: segment-anything-fast flash_4 (A100 40 GB)", "status": "reference", "peak_mb": 4550, "img_per_s": 22.87},
]
# issue 22's benchmark, run here once it exists; the session that lands it checks these flags
AMG_SCRIPT = ROOT / "benchmarks" / "bench_amg.py"
AMG_ARGS = ["--device", "{device}", "--out-dir", "{tmp}", "--machine", "{slug}"]

STEP_FIELDS = ["step", "status", "budget_s", "seconds", "rows", "note"]
TEST_FIELDS = ["kind", "test", "dtype", "backend", "status", "seconds", "max_rel_error", "tolerance", "note"]
GRID_FIELDS = [
    "machine", "device", "scope", "model", "size", "tokens", "batch", "dtype", "mode", "backend_used", "status",
    "seconds", "mean_s", "calls", "first_s", "img_per_s", "weights_mb", "peak_mb", "peak_extra_mb", "planner_mb",
    "estimate_s", "threads", "torch", "note",
]  # fmt: skip
TILE_FIELDS = ["job", "image", "tile", "model", "dtype", "status", "seconds", "peak_mb", "tiles", "encoder_passes", "masks", "note"]


# --- the parent: steps, budgets, files ---------------------------------------------------------


class Run:
    """The out folder, the log, the deadline, and each step's budget."""

    def __init__(self, args: argparse.Namespace, info: dict[str, str]):
        self.args, self.info = args, info
        self.device = "cpu" if args.dry_run else args.device
        self.sizes = DRY if args.dry_run else FULL
        self.prefix = f"{'dryrun' if args.dry_run else 'gpu'}_{machine_slug(info)}"
        self.label = machine_label(info)
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix="gpu_check_"))  # mosaics, segment outputs: never in out
        self.log = open(self.out / f"{self.prefix}.log", "a")
        self.started = time.monotonic()
        self.spare = 0.0  # seconds a finished step left unused
        self.scale = args.budget_s / sum(BUDGET_S.values())

    def say(self, text: str) -> None:
        line = f"[{time.monotonic() - self.started:6.1f} s] {text}"
        print(line, flush=True)
        self.log.write(line + "\n")
        self.log.flush()

    def path(self, name: str) -> Path:
        return self.out / f"{self.prefix}_{name}.csv"

    def budget(self, step: str) -> float:
        """This step's seconds: its share plus what earlier steps left, never eating later steps' shares."""
        later = sum(BUDGET_S[s] for s in STEPS[STEPS.index(step) + 1 :] if s in self.args.steps) * self.scale
        left = self.args.budget_s - (time.monotonic() - self.started) - later
        return max(0.0, min(BUDGET_S[step] * self.scale + self.spare, left))

    def child(self, step: str, cells: list[dict], spec: dict, seconds: float) -> list[dict]:
        """Run `cells` in child processes (`--child step`) within `seconds`; one row per cell.

        A cell the child started but never finished is recorded as crashed and the child is
        restarted on the rest; cells left when the time is up are recorded as not run.
        """
        rows_file = self.tmp / f"{step}.jsonl"
        spec_file = self.tmp / f"{step}.json"
        spec_file.write_text(json.dumps({**spec, "device": self.device, "dry_run": self.args.dry_run, "tmp": str(self.tmp), "cells": cells}))
        deadline = time.monotonic() + seconds
        done: dict[str, dict] = {}
        for attempt in range(4):
            left = deadline - time.monotonic()
            if left < 2 or len(done) == len(cells):
                break
            command = [sys.executable, str(Path(__file__).resolve()), "--child", step, "--spec", str(spec_file),
                       "--rows", str(rows_file), "--deadline", str(time.time() + left)]  # fmt: skip
            self.log.flush()
            env = {**os.environ, "PYTHONUNBUFFERED": "1", **({"OMP_NUM_THREADS": "1"} if self.args.dry_run else {})}
            child = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
            try:
                rc = child.wait(timeout=left + 10)  # the child stops itself at the deadline; 10 s of grace
            except subprocess.TimeoutExpired:
                child.kill()
                rc = child.wait()
                self.say(f"{step}: child killed at the step's deadline")
            started = None
            for line in rows_file.read_text().splitlines() if rows_file.exists() else []:
                record = json.loads(line)
                if "started" in record:
                    started = record["started"]
                else:
                    done[record["key"]] = record
                    started = None if started == record["key"] else started
            if started is not None and started not in done:
                note = f"the child process ended (exit code {rc}) during this cell: killed at the deadline" if rc < 0 or time.monotonic() >= deadline else f"the child process crashed during this cell (exit code {rc}); restarted on the rest"
                done[started] = {"key": started, "status": "crashed", "note": note}
                with open(rows_file, "a") as f:
                    f.write(json.dumps(done[started]) + "\n")
            if rc == 0:
                break
        rows = []
        for cell in cells:
            row = done.get(cell["key"]) or {"status": "not run", "note": f"the step's {seconds:.0f} s were spent before this cell"}
            rows.append({**cell, **row})
        return rows


def step_tests(run: Run, seconds: float) -> list[dict]:
    """pytest -k cuda over the files with CUDA cases, then verify_equivalence per backend and dtype."""
    rows = []
    # flex's cases compile a kernel per dtype: run them apart, so a timeout there keeps the rest
    for selector, share in (("cuda and not flex", 0.45), ("cuda and flex", 0.25)):
        junit = run.tmp / f"junit_{len(rows)}.xml"
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", selector, f"--junitxml={junit}",
                   "tests/test_attention.py", "tests/test_backends.py"]  # fmt: skip
        run.say("tests: " + " ".join(command[1:]))
        try:
            run.log.flush()
            done = subprocess.run(command, stdout=run.log, stderr=subprocess.STDOUT, cwd=ROOT, timeout=share * seconds)
            rows += junit_rows(junit) if junit.exists() else []
            run.say(f"tests: pytest exited {done.returncode}")
        except subprocess.TimeoutExpired:
            rows.append({"kind": "pytest", "test": f"-k '{selector}'", "status": "timeout", "note": f"over its {share * seconds:.0f} s"})
    model, size = run.sizes["verify"]
    cells = [{"key": f"{b} {d}", "kind": "verify", "test": f"{model} encoder {size} px", "backend": b, "dtype": d}
             for d in run.sizes["test_dtypes"] for b in ("auto", "blocked", "sdpa", "bands", "flashbias", "flex")]  # fmt: skip
    left = seconds - (time.monotonic() - run.step_started)
    return rows + run.child("tests", cells, {"model": model, "size": size}, left)


def junit_rows(path: Path) -> list[dict]:
    import xml.etree.ElementTree as ET

    rows = []
    for case in ET.parse(path).iter("testcase"):
        status, note = "passed", ""
        for tag in ("failure", "error", "skipped"):
            found = case.find(tag)
            if found is not None:
                status, note = ("failed" if tag == "failure" else tag), (found.get("message") or "")[:300]
        name = case.get("name", "")
        dtype = next((d for d in ("float32", "bfloat16", "float16") if d in name), "")
        rows.append({"kind": "pytest", "test": f"{case.get('classname')}::{name}", "dtype": dtype, "status": status,
                     "seconds": case.get("time"), "note": note})  # fmt: skip
    return rows


def grid_cells(models, sizes, batches, dtypes, scopes=("layer", "encoder"), modes=MODES) -> list[dict]:
    """One cell per configuration; flex's cells after the others, as each new shape compiles for tens of seconds."""
    cells = []
    for dtype in dtypes:
        for model in models:
            for size in sizes:
                for batch in batches:
                    for scope in scopes:
                        for mode in modes:
                            cells.append({"key": f"{dtype} {model} {size} {batch} {scope} {mode}", "scope": scope, "model": model,
                                          "size": size, "tokens": (size // 16) ** 2, "batch": batch, "dtype": dtype, "mode": mode})  # fmt: skip
    return sorted(cells, key=lambda c: c["mode"] == "flex")  # stable: the order above otherwise


def step_grid(run: Run, seconds: float) -> list[dict]:
    """One child per (dtype, model): a child compiles flex per shape, and a crash loses one group."""
    s = run.sizes
    groups = [(d, m) for d in s["dtypes"] for m in s["models"]]
    rows = []
    for i, (dtype, model) in enumerate(groups):
        share = (seconds - (time.monotonic() - run.step_started)) / (len(groups) - i)
        cells = grid_cells([model], s["sizes"], s["batches"], [dtype])
        run.say(f"grid: {model} {dtype}, {len(cells)} cells, {share:.0f} s")
        rows += run.child("grid", cells, {"repeat": s["repeat"], "flex_compile_s": s["flex_compile_s"]}, share)
    return rows


def step_samfast(run: Run, seconds: float) -> list[dict]:
    model, size, batch, dtype = run.sizes["samfast"]
    cells = grid_cells([model], [size], [batch], [dtype], scopes=("encoder",), modes=[m for m in MODES if m != "stock"])
    rows = run.child("samfast", cells, {"repeat": run.sizes["samfast_repeat"], "flex_compile_s": run.sizes["flex_compile_s"]}, seconds)
    return rows + [{**r, "model": model, "size": size, "batch": batch, "dtype": dtype} for r in SAMFAST_REFERENCE]


def step_tiles(run: Run, seconds: float) -> list[dict]:
    s = run.sizes
    cells = [{"key": f"{job} {tile}", "job": job, "image": f"mosaic {s['mosaic']} x {s['mosaic']}", "tile": tile,
              "model": s["tile_model"], "dtype": s["tile_dtype"]} for job in ("prompts", "auto") for tile in s["tiles"]]  # fmt: skip
    return run.child("tiles", cells, {"mosaic": s["mosaic"], "points_per_side": s["points_per_side"]}, seconds)


def step_automasks(run: Run, seconds: float) -> list[dict]:
    s = run.sizes
    cells = [{"key": "auto whole", "job": f"segment --auto, {s['auto_points']} points per side, SAM's filters",
              "image": f"photo {s['auto_image']} x {s['auto_image']}", "model": s["auto_model"], "dtype": s["auto_dtype"]},
             {"key": "bench_amg", "job": "benchmarks/bench_amg.py (issue 22)", "image": "", "model": "", "dtype": ""}]  # fmt: skip
    spec = {"image": s["auto_image"], "points": s["auto_points"], "slug": run.prefix}
    return run.child("automasks", cells, spec, seconds)


def main_parent(args: argparse.Namespace) -> int:
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print(f"gpu_check: --device {args.device}: CUDA is not available here; use --dry-run for the CPU rehearsal", file=sys.stderr)
        return 2
    run = Run(args, machine_info("cpu" if args.dry_run else args.device))
    run.say(f"gpu_check on {run.label}; budget {args.budget_s:.0f} s; writing {run.out}/{run.prefix}_*")
    steps = {"tests": step_tests, "grid": step_grid, "samfast": step_samfast, "tiles": step_tiles, "automasks": step_automasks}
    fields = {"tests": TEST_FIELDS, "grid": GRID_FIELDS, "samfast": GRID_FIELDS, "tiles": TILE_FIELDS, "automasks": TILE_FIELDS}
    summary, failed = [], False
    for step in STEPS:
        if step not in args.steps:
            summary.append({"step": step, "status": "skipped", "note": "not in --steps"})
            continue
        seconds = run.budget(step)
        run.step_started = time.monotonic()
        run.say(f"{step}: {seconds:.0f} s")
        try:
            rows = steps[step](run, seconds) if seconds >= 5 else []
            status = "ok" if seconds >= 5 else "skipped"
            note = "" if seconds >= 5 else f"only {seconds:.0f} s of the budget left"
        except Exception as error:  # one step's failure must not cost the others
            rows, status, note = [], "error", f"{type(error).__name__}: {error}"[:300]
        for row in rows:
            row.update(machine=run.label, device=run.device, torch=torch.__version__)
        write_rows(run.path(step), rows, fields[step])
        took = time.monotonic() - run.step_started
        run.spare = max(0.0, seconds - took)
        bad = [r for r in rows if r.get("status") in ("failed", "error", "crashed")]
        failed |= status == "error" or bool(bad)
        counts = {k: sum(r.get("status") == k for r in rows) for k in sorted({r.get("status", "") for r in rows})}
        summary.append({"step": step, "status": status, "budget_s": round(seconds), "seconds": round(took, 1), "rows": len(rows),
                        "note": note or ", ".join(f"{v} {k}" for k, v in counts.items())})  # fmt: skip
        run.say(f"{step}: {summary[-1]['note']} in {took:.1f} s")
    write_rows(run.path("steps"), summary, STEP_FIELDS)
    plot(run)
    run.say(f"done in {time.monotonic() - run.started:.1f} s: " + ", ".join(sorted(p.name for p in run.out.iterdir())))
    return 1 if failed else 0


def plot(run: Run) -> None:
    """bench_backends' plot of the grid rows: per scope, time and extra peak per configuration and mode."""
    from bench_backends import plot as backends_plot
    from common import read_rows

    rows = read_rows(run.path("grid"))
    if rows:
        backends_plot(rows, run.out / f"{run.prefix}.png", f"{run.label} (gpu_check)")


# --- the children -------------------------------------------------------------------------------


class Child:
    """A child's spec, rows file and deadline; `emit` appends one row (or a start marker) at once."""

    def __init__(self, args: argparse.Namespace):
        self.spec = json.loads(Path(args.spec).read_text())
        self.rows_path = Path(args.rows)
        self.deadline = float(args.deadline)
        done = [json.loads(line) for line in self.rows_path.read_text().splitlines()] if self.rows_path.exists() else []
        self.done = {r["key"] for r in done if "key" in r}
        self.cells = [c for c in self.spec["cells"] if c["key"] not in self.done]

    def left(self) -> float:
        return self.deadline - time.time()

    def emit(self, record: dict) -> None:
        with open(self.rows_path, "a") as f:
            f.write(json.dumps(record) + "\n")


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device) -> None:
    import torch

    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the resident size
            f.write("5")


def _memory(device, peak: bool) -> int:
    """CUDA: allocated (or max allocated) bytes; CPU: resident (or high-water) bytes of the process."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) if peak else torch.cuda.memory_allocated(device)
    key = "VmHWM:" if peak else "VmRSS:"
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))


def _timed(fn, device) -> float:
    """Seconds of one call: CUDA events on the GPU, the wall clock on the CPU."""
    import torch

    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        end.synchronize()
        del out
        return start.elapsed_time(end) / 1000
    start = time.perf_counter()
    out = fn()
    del out
    return time.perf_counter() - start


def _free(device) -> None:
    import torch

    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def _is_oom(error: BaseException) -> bool:
    return isinstance(error, MemoryError) or "out of memory" in str(error).lower() or "can't allocate memory" in str(error)


def set_mode(module, mode: str) -> None:
    """Stock, stock with the full bias and SDPA (bench_backends.stock_sdpa_forward), or patch_sam(backend=mode)."""
    import types

    from bench_backends import stock_sdpa_forward
    from segment_anything.modeling.image_encoder import Attention

    import sam_blocked

    sam_blocked.unpatch_sam(module)
    for m in module.modules():
        if isinstance(m, Attention):
            m.__dict__.pop("forward", None)
            if mode == "stock-sdpa":
                m.forward = types.MethodType(stock_sdpa_forward, m)
    if mode not in ("stock", "stock-sdpa"):
        sam_blocked.patch_sam(module, backend=mode)


def cell_flops(encoder, scope: str, size: int, batch: int) -> float:
    """FLOPs of one call, for estimates: linear layers 2 x tokens x weights, attention 4 N^2 C per grid."""
    blocks = list(encoder.blocks)
    dim = blocks[0].attn.qkv.in_features
    grid = size // 16
    if scope == "layer":
        return batch * (2 * grid * grid * 4 * dim * dim + 4 * grid**4 * dim)
    flops = 0.0
    for block in blocks:
        w = block.window_size
        side = grid if w == 0 else -(-grid // w) * w
        n = grid * grid if w == 0 else w * w
        flops += 2 * side * side * 12 * dim * dim + (side * side // n) * 4 * n * n * dim
    return batch * flops


def scores_bytes(encoder, mode: str, size: int, batch: int, dtype) -> int:
    """(N, N) bytes stock (3 live score tensors) or stock-sdpa (the bias and its parts, ~2) hold in a global layer."""
    import torch

    heads = encoder.blocks[0].attn.num_heads
    n = (size // 16) ** 2
    live = {"stock": 3, "stock-sdpa": 2}.get(mode, 0)
    return live * batch * heads * n * n * torch.finfo(dtype).bits // 8


def child_measure(child: Child, step: str) -> int:
    """The grid and samfast cells: build each (model, size, dtype) once, then every batch, scope and mode."""
    import torch

    import sam_blocked

    device = torch.device(child.spec["device"])
    repeat = child.spec["repeat"]
    total = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    rates: dict[tuple, float] = {}  # (scope, mode) -> seconds per FLOP measured
    compiled: set = set()
    built, encoder = None, None
    for cell in child.cells:
        key, scope, mode, size, batch = cell["key"], cell["scope"], cell["mode"], cell["size"], cell["batch"]
        dtype = getattr(torch, cell["dtype"])
        child.emit({"started": key})
        row = {"key": key, "status": "error", "threads": torch.get_num_threads(), "note": ""}
        try:
            if built != (cell["model"], size, cell["dtype"]):
                encoder = None
                _free(device)
                with torch.device(device):  # random weights made on the device: seconds, not a minute for vit_h
                    encoder = sam_blocked.build_sam(cell["model"], img_size=size, seed=0).image_encoder.to(dtype)
                built = (cell["model"], size, cell["dtype"])
                if not rates:
                    rates[("prior",)] = 1 / (0.25 * gemm_rate(cell["dtype"], str(device), (1024, 1024, 1024) if child.spec["dry_run"] else (4096, 4096, 4096)))
            attn = next(b.attn for b in encoder.blocks if b.window_size == 0)
            head_dim = attn.qkv.in_features // attn.num_heads
            grid, window = size // 16, max(b.window_size for b in encoder.blocks)
            shapes = [(grid, grid)] + ([(window, window)] if scope == "encoder" else [])
            if mode == "auto":
                row["backend_used"] = ", ".join(sam_blocked.choose_backend(device, dtype, g, head_dim) for g in shapes)
            elif mode not in ("stock", "stock-sdpa"):
                row["backend_used"] = mode
                reasons = [r for g in shapes for r in sam_blocked.not_supported_reasons(mode, device, dtype, g, head_dim)]
                if reasons:
                    row.update(status="refused", note="; ".join(reasons)[:300])
                    child.emit(row)
                    continue
            need = scores_bytes(encoder, mode, size, batch, dtype)
            if need > 0.9 * total:
                row.update(status="skipped", note=f"needs ~{need / GIB:.0f} GiB of (N, N) scores; the device has {total / GIB:.0f} GiB")
                child.emit(row)
                continue
            flops = cell_flops(encoder, scope, size, batch)
            rate = rates.get((scope, mode)) or 3 * max([v for k, v in rates.items() if k[0] == scope] or [rates[("prior",)]])
            compile_s = child.spec["flex_compile_s"] if "flex" in (row.get("backend_used") or mode) and (mode, tuple(shapes), batch, dtype) not in compiled else 0
            estimate = flops * rate * 2 + compile_s  # a warm-up and one timed call at least
            row["estimate_s"] = round(estimate, 2)
            if estimate > child.left():
                row.update(status="skipped", note=f"over the {child.left():.0f} s left in the step, by estimate ({estimate:.0f} s)")
                child.emit(row)
                continue
            if cell.get("planner", True) and scope == "encoder" and mode != "stock-sdpa":
                plan = sam_blocked.plan_memory(cell["model"], size, cell["dtype"], str(device), batch)
                row["planner_mb"] = round((plan.encoder_stock_tensor_bytes if mode == "stock" else plan.encoder_tensor_bytes) / MIB, 1)
            module = encoder if scope == "encoder" else attn
            set_mode(encoder, mode)
            generator = torch.Generator().manual_seed(0)
            shape = (batch, 3, size, size) if scope == "encoder" else (batch, grid, grid, attn.qkv.in_features)
            row["weights_mb"] = round(sum(p.numel() * p.element_size() for p in module.parameters()) / MIB, 1)
            x = torch.randn(shape, generator=generator).to(device, dtype)
            try:
                with torch.inference_mode():
                    start = time.perf_counter()
                    _timed(lambda: module(x), device)
                    row["first_s"] = round(time.perf_counter() - start, 3)
                    compiled.add((mode, tuple(shapes), batch, dtype))
                    _reset_peak(device)
                    baseline = _memory(device, peak=False)
                    times = [_timed(lambda: module(x), device)]
                    while len(times) < repeat and min(times) * 2 < child.left() and sum(times) < (30 if step == "samfast" else 3):
                        times.append(_timed(lambda: module(x), device))
                    peak = _memory(device, peak=True)
                row.update(status="ok", seconds=round(min(times), 5), mean_s=round(sum(times) / len(times), 5), calls=len(times),
                           img_per_s=round(batch * len(times) / sum(times), 3), peak_mb=round(peak / MIB, 1),
                           peak_extra_mb=round((peak - baseline) / MIB, 1))  # fmt: skip
                rates[(scope, mode)] = min(times) / flops
            except (RuntimeError, MemoryError) as error:
                if not _is_oom(error):
                    raise
                row.update(status="OOM", note=str(error).splitlines()[0][:200])
            finally:
                x = None
                set_mode(encoder, "stock")
                _free(device)
        except Exception as error:  # recorded; one cell must not end the sweep
            row["note"] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:300]
            if "CUDA error" in str(error) or "device-side" in str(error):
                child.emit(row)
                return 3  # the context is poisoned: the parent restarts a fresh child on the cells left
        child.emit(row)
    return 0


def child_tests(child: Child) -> int:
    """verify_equivalence of the whole encoder, per backend and dtype, on the device."""
    import torch

    import sam_blocked

    device = torch.device(child.spec["device"])
    built = None
    for cell in child.cells:
        child.emit({"started": cell["key"]})
        row = {"key": cell["key"], "status": "error"}
        try:
            if built != cell["dtype"]:
                with torch.device(device):
                    model = sam_blocked.build_sam(child.spec["model"], img_size=child.spec["size"], seed=0).to(getattr(torch, cell["dtype"]))
                built = cell["dtype"]
            start = time.perf_counter()
            report = sam_blocked.verify_equivalence(model.image_encoder, backend=cell["backend"])  # a bf16 Sam's predictor feeds float32
            row.update(status="passed" if report.passed else "failed", seconds=round(time.perf_counter() - start, 2),
                       max_rel_error=f"{report.max_rel_error:.3e}", tolerance=f"{report.tolerance:.0e}",
                       note=("mask IoU " + ", ".join(f"{i:.4f}" for i in report.mask_ious)) if report.mask_ious else "")  # fmt: skip
        except ValueError as error:
            row.update(status="refused" if "cannot" in str(error) or "not" in str(error) else "error", note=str(error)[:300])
        except Exception as error:
            row["note"] = f"{type(error).__name__}: {error}"[:300]
        child.emit(row)
    return 0


def mosaic(side: int):
    """(side, side, 3) uint8: scikit-image's photographs, tiled over and over (as tests/test_tiles_run.py's mosaic)."""
    import numpy as np
    from skimage import data

    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket(), data.immunohistochemistry()]
    image = np.zeros((side, side, 3), np.uint8)
    y = i = 0
    while y < side:
        x, height = 0, 0
        while x < side:
            photo = photos[i % len(photos)]
            i += 1
            h, w = min(photo.shape[0], side - y), min(photo.shape[1], side - x)
            image[y : y + h, x : x + w] = photo[:h, :w]
            x, height = x + w, max(height, h)
        y += height
    return image


def _segment(argv: list[str], output: Path) -> dict:
    """Run `sam-blocked segment` (the CLI's main, in this process) and return what its summary says."""
    from sam_blocked import cli

    start = time.perf_counter()
    rc = cli.main(["segment", *argv, "--output", str(output), "--overwrite", "--seed", "0"])
    summary = json.loads((output / "segment-summary.json").read_text())
    done = summary.get("done") or [{}]
    failed = summary.get("failed") or []
    peak = summary.get("peak_memory_bytes")
    return {"status": "ok" if rc == 0 and not failed else "failed", "seconds": round(time.perf_counter() - start, 2),
            "peak_mb": round(peak / MIB, 1) if peak else "", "tiles": done[0].get("tiles", ""),
            "encoder_passes": done[0].get("encoder_passes", ""), "masks": done[0].get("masks", ""),
            "note": "; ".join(str(f.get("reason", f))[:200] for f in failed) + f" (segment's own {summary.get('seconds')} s)"}  # fmt: skip


def child_tiles(child: Child) -> int:
    """`sam-blocked segment --tile` on the mosaic: prompts, then automatic masks, per tile size."""
    import tifffile

    tmp, side = Path(child.spec["tmp"]), child.spec["mosaic"]
    image = tmp / f"mosaic{side}.tif"
    if not image.exists():
        start = time.perf_counter()
        tifffile.imwrite(image, mosaic(side), tile=(512, 512) if side > 1024 else (128, 128), compression="zlib", compressionargs={"level": 1})
        print(f"tiles: wrote {image} in {time.perf_counter() - start:.1f} s", flush=True)
    prompts = tmp / "prompts.json"
    at = lambda fx, fy: [round(fx * (side - 1)), round(fy * (side - 1))]  # noqa: E731
    prompts.write_text(json.dumps({image.name: [
        {"name": "a", "foreground": [at(0.05, 0.05)]}, {"name": "b", "foreground": [at(0.5, 0.5)], "background": [at(0.52, 0.5)]},
        {"name": "c", "box": [*at(0.7, 0.2), *at(0.8, 0.3)]}, {"name": "d", "foreground": [at(1, 1)]},
    ]}))  # fmt: skip
    for cell in child.cells:
        child.emit({"started": cell["key"]})
        job = ["--prompts", str(prompts)] if cell["job"] == "prompts" else ["--auto", "--points-per-side", str(child.spec["points_per_side"])]
        argv = [str(image), *job, "--tile", str(cell["tile"]), "--model-type", cell["model"], "--dtype", cell["dtype"], "--device", child.spec["device"]]
        row = {"key": cell["key"]}
        try:
            row.update(_segment(argv, tmp / f"out_{cell['job']}_{cell['tile']}"))
            row["note"] = (f"{child.spec['points_per_side']} points per tile side; " if cell["job"] == "auto" else "4 prompt sets; ") + row["note"]
        except Exception as error:
            row.update(status="error", note=f"{type(error).__name__}: {error}"[:300])
        child.emit(row)
    return 0


def child_automasks(child: Child) -> int:
    """`segment --auto` on a photo at SAM's default settings, and issue 22's bench_amg.py when it exists."""
    import numpy as np
    from PIL import Image
    from skimage import data

    tmp, side = Path(child.spec["tmp"]), child.spec["image"]
    for cell in child.cells:
        child.emit({"started": cell["key"]})
        row = {"key": cell["key"]}
        try:
            if cell["key"] == "auto whole":
                photo = tmp / "photo.png"
                Image.fromarray(np.asarray(Image.fromarray(data.astronaut()).resize((side, side)))).save(photo)
                argv = [str(photo), "--auto", "--points-per-side", str(child.spec["points"]), "--model-type", cell["model"],
                        "--dtype", cell["dtype"], "--device", child.spec["device"], "--format", "coco", "--img-size", str(side)]  # fmt: skip
                row.update(_segment(argv, tmp / "out_auto_whole"))
            elif not AMG_SCRIPT.exists():
                row.update(status="not landed", note=f"{AMG_SCRIPT.relative_to(ROOT)} (issue 22) does not exist yet")
            else:
                values = {"device": child.spec["device"], "tmp": str(tmp / "amg"), "slug": child.spec["slug"]}
                argv = [a.format(**values) for a in AMG_ARGS] + (["--quick"] if child.spec["dry_run"] else [])
                start = time.perf_counter()
                done = subprocess.run([sys.executable, str(AMG_SCRIPT), *argv], capture_output=True, text=True, timeout=max(1, child.left()))
                print(done.stdout[-4000:], done.stderr[-4000:], flush=True)
                found = sorted((tmp / "amg").glob("*.csv"))
                rows = [r for p in found for r in csv.DictReader(p.open())]
                row.update(status="ok" if done.returncode == 0 else "failed", seconds=round(time.perf_counter() - start, 1),
                           note=(json.dumps(rows)[:2000] if rows else (done.stderr.strip().splitlines() or ["no CSV"])[-1][:300]))  # fmt: skip
        except Exception as error:
            row.update(status="error", note=f"{type(error).__name__}: {error}"[:300])
        child.emit(row)
    return 0


# --- command line ------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "out" / "gpu_check"), help="folder for every file (default $OUT, else out/gpu_check)")
    parser.add_argument("--dry-run", action="store_true", help="the same steps on the CPU with a tiny model and tiny sizes")
    parser.add_argument("--device", default="cuda", help="cuda[:N] (default cuda; --dry-run uses the CPU)")
    parser.add_argument("--budget-s", type=float, default=480, help="wall-clock seconds for all steps (default 480)")
    parser.add_argument("--steps", nargs="+", default=list(STEPS), choices=STEPS, help="steps to run (default all, in order)")
    parser.add_argument("--child", choices=STEPS, help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--rows", help=argparse.SUPPRESS)
    parser.add_argument("--deadline", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.budget_s <= 0:
        build_parser().error("--budget-s must be > 0")
    if not args.child:
        return main_parent(args)
    child = Child(args)
    if child.spec["dry_run"]:
        import torch

        torch.set_num_threads(1)  # tiny shapes; CI's 2 cores are shared
    run = {"tests": child_tests, "grid": lambda c: child_measure(c, "grid"), "samfast": lambda c: child_measure(c, "samfast"),
           "tiles": child_tiles, "automasks": child_automasks}  # fmt: skip
    return run[args.child](child)


if __name__ == "__main__":
    sys.exit(main())
