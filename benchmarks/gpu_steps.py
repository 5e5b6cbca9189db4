"""What benchmarks/gpu_check.py's child processes run: the measurements of each step.

The parent (gpu_check.py) starts `gpu_check.py --child STEP --spec FILE --rows FILE --deadline T`
per step, with the cells left to do in the spec; `run_child` runs them here, appending one JSON
line per row (after a start marker per cell) to the rows file as soon as it has it, so a crash
or a kill at the deadline loses one cell at most.
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py and bench_backends.py
from common import GIB, MIB, gemm_rate  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# issue 22's benchmark, run here once it exists; the session that lands it checks these flags
AMG_SCRIPT = ROOT / "benchmarks" / "bench_amg.py"
AMG_ARGS = ["--device", "{device}", "--out-dir", "{tmp}", "--machine", "{slug}"]


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
                    rates[("prior",)] = 1 / (0.25 * gemm_rate(cell["dtype"], str(device), (256, 256, 256) if child.spec["dry_run"] else (4096, 4096, 4096)))
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


def run_child(args: argparse.Namespace) -> int:
    """`--child STEP`: the step's cells not yet done, within the deadline; its exit code."""
    child = Child(args)
    if child.spec["dry_run"]:
        import torch

        torch.set_num_threads(1)  # tiny shapes; CI's 2 cores are shared
    run = {"tests": child_tests, "grid": lambda c: child_measure(c, "grid"), "samfast": lambda c: child_measure(c, "samfast"),
           "tiles": child_tiles, "automasks": child_automasks}  # fmt: skip
    return run[args.child](child)
