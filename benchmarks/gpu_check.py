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

This file is the parent (steps, budgets, child processes, files) and the command line;
benchmarks/gpu_steps.py holds what the children measure and run (`--child STEP`).

    bash benchmarks/gpu_check.sh                    # on the GPU machine: wheels, then this, into $OUT
    python benchmarks/gpu_check.py --dry-run --out /tmp/check   # the same code on the CPU, tiny sizes: a minute
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py and bench_backends.py
from common import machine_info, machine_label, machine_slug, write_rows  # noqa: E402
from gpu_steps import run_child  # noqa: E402

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
    return run_child(args)


if __name__ == "__main__":
    sys.exit(main())
