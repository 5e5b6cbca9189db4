"""Images per second against workers: the local engine, then Ray with 1 and 2 workers.

Each configuration is one `sam-blocked segment` run in a fresh subprocess, as a user runs
it, over a folder of photographs (examples/*.jpg and scikit-image's, repeated to --images
files) with one prompt set per image (--mode prompts) or automatic masks on a 4 x 4 grid
(--mode auto), seeded random weights. The local engine runs with one torch thread and
OMP_NUM_THREADS=1, as a Ray worker with --cpus-per-worker 1 does; Ray runs without --address, so each run starts
its own Ray instance on this machine and stops it (what a laptop run does).

Measured per run, from its segment-summary.json: run seconds (the run loop: for Ray this
includes starting the workers and loading a model in each, for the local engine not the
model load), the mean seconds a worker spent on one image (the same segment_image in both
engines: Ray's per-image overhead shows here), and the machine's load average when it
started (others' work on a shared machine shows here). Two folder sizes (--images A B)
give the marginal seconds per image, (run(B) - run(A)) / (B - A): fixed costs (Ray start,
model loads) cancel, leaving the steady rate; the same on the run's idle time (run seconds
less the workers' seconds on images) gives what the engine adds per image whatever the
model's speed, the overhead figure that survives a machine loaded by others best. --repeat alternates the configurations that
many times and keeps, per configuration, each figure's minimum.

Writes benchmarks/results/ray_<machine>.csv (one row per run) and a PNG next to it:
steady images per second against workers, per model, the local engine at 1 worker.

    python benchmarks/bench_ray.py --quick                                   # tiny, 2 and 6 images: minutes
    python benchmarks/bench_ray.py --fresh --models tiny --images 4 24 --repeat 3    # ~15 min on 2 cores
    python benchmarks/bench_ray.py --models vit_b --images 2 6 --repeat 3           # ~1 h on 2 cores

One machine cannot show what a cluster is for: with 2 cores there is no scaling past 2
workers, no network between the driver, the workers and the storage, and no GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py, also when imported from elsewhere
from common import RESULTS, machine_info, machine_label, machine_slug, read_rows, write_rows  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [("local", 1), ("ray", 1), ("ray", 2)]
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field")
AUTO = ["--auto", "--points-per-side", "4", "--pred-iou-thresh", "0", "--stability-score-thresh", "0"]
FIELDS = [
    "machine", "model", "mode", "engine", "workers", "images", "repeat", "status", "wall_seconds", "run_seconds",
    "worker_seconds_per_image", "images_per_second", "load_average", "torch_threads", "note",
]  # fmt: skip
# Run the CLI with one torch thread (as a Ray worker with --cpus-per-worker 1): the local engine's model is in this process.
LOCAL = "import sys, torch; torch.set_num_threads(1); from sam_blocked import cli; sys.exit(cli.main(sys.argv[1:]))"


def make_folder(folder: Path, count: int) -> dict:
    """`count` JPEGs cycling through the photos, and their prompt sets (one centre point and a box each)."""
    import numpy as np
    from PIL import Image
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    prompts = {}
    for i in range(count):
        name = PHOTOS[i % len(PHOTOS)]
        path = ROOT / "examples" / f"{name}.jpg"
        image = np.asarray(Image.open(path).convert("RGB")) if path.exists() else getattr(data, name)()
        if image.ndim == 2:
            image = np.stack([image] * 3, axis=-1)
        file = f"{i:03d}-{name}.jpg"
        Image.fromarray(image[..., :3]).save(folder / file, quality=92)
        h, w = image.shape[:2]
        prompts[file] = [{"name": "centre", "foreground": [[w // 2, h // 2]]}, {"name": "box", "box": [w // 4, h // 4, 3 * w // 4, 3 * h // 4]}]
    return prompts


def run_one(folder: Path, prompts: Path, model: str, mode: str, engine: str, workers: int, timeout: float) -> dict:
    """One `sam-blocked segment` run in a subprocess; the row from its summary."""
    out = Path(tempfile.mkdtemp(prefix=f"bench-ray-{engine}{workers}-"))
    what = ["--prompts", str(prompts)] if mode == "prompts" else AUTO
    args = ["segment", str(folder), *what, "--output", str(out), "--model-type", model, "--format", "coco"]
    if engine == "ray":
        command = [sys.executable, "-m", "sam_blocked", *args, "--engine", "ray", "--workers", str(workers), "--cpus-per-worker", "1"]
    else:
        command = [sys.executable, "-c", LOCAL, *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_DISABLE_USAGE_STATS": "1"}
    if engine == "local":
        env["OMP_NUM_THREADS"] = "1"  # what Ray sets for a worker of 1 CPU: no library in either spins threads of its own
    row = {"model": model, "mode": mode, "engine": engine, "workers": workers, "load_average": round(os.getloadavg()[0], 2), "torch_threads": 1}
    started = time.perf_counter()
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
        row["wall_seconds"] = round(time.perf_counter() - started, 3)
        summary = json.loads((out / "segment-summary.json").read_text()) if (out / "segment-summary.json").exists() else None
        if done.returncode != 0 or summary is None:
            return {**row, "status": "error", "note": (done.stderr.strip().splitlines() or ["no output"])[-1][:200]}
        per_image = [entry["seconds"] for entry in summary["done"]]
        return {
            **row,
            "status": "ok",
            "images": len(per_image),
            "run_seconds": summary["seconds"],
            "worker_seconds_per_image": round(sum(per_image) / len(per_image), 4),
            "images_per_second": round(len(per_image) / summary["seconds"], 4),
        }
    except subprocess.TimeoutExpired:
        return {**row, "status": "timeout", "note": f"over {timeout} s"}
    finally:
        shutil.rmtree(out, ignore_errors=True)


def steady(rows: list[dict]) -> dict[tuple, dict]:
    """Per (model, mode, engine, workers): the minimum figures of each folder size, and the
    marginal seconds per image between the smallest and the largest folder: of the run, and
    of its idle time (the run's seconds less the workers' seconds on images, shared among
    the workers: what the engine adds per image, apart from how fast the model ran)."""
    best: dict[tuple, dict[int, dict]] = {}
    for row in rows:
        if row.get("status") != "ok":
            continue
        key = (row["model"], row["mode"], row["engine"], int(row["workers"]))
        kept = best.setdefault(key, {}).setdefault(int(row["images"]), {})
        run, per_image = float(row["run_seconds"]), float(row["worker_seconds_per_image"])
        idle = run - int(row["images"]) * per_image / int(row["workers"])  # the run's time no worker spent on an image
        for field, value in (("run_seconds", run), ("worker_seconds_per_image", per_image), ("idle_seconds", idle)):
            kept[field] = min(kept.get(field, value), value)
    table = {}
    for key, sizes in best.items():
        small, large = min(sizes), max(sizes)
        marginal = (sizes[large]["run_seconds"] - sizes[small]["run_seconds"]) / (large - small) if large > small else None
        idle = (sizes[large]["idle_seconds"] - sizes[small]["idle_seconds"]) / (large - small) if large > small else None
        table[key] = {
            "worker_seconds_per_image": min(s["worker_seconds_per_image"] for s in sizes.values()),
            "marginal_seconds_per_image": marginal,
            "steady_images_per_second": 1 / marginal if marginal and marginal > 0 else None,
            "idle_seconds_per_image": idle,
            "run_seconds": {n: s["run_seconds"] for n, s in sorted(sizes.items())},
        }
    return table


def report(table: dict[tuple, dict]) -> str:
    """A markdown table, with Ray's overhead against the local engine at one worker."""
    lines = [
        "| model | mode | engine | workers | run s (by folder size) | worker s / image | marginal s / image | steady images/s | idle s / image | overhead vs local |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (model, mode, engine, workers), row in sorted(table.items()):
        local = table.get((model, mode, "local", 1))
        overhead = ""
        if engine == "ray" and workers == 1 and local is not None:
            per = row["worker_seconds_per_image"] / local["worker_seconds_per_image"] - 1
            overhead = f"worker {per:+.1%}"
            if row["marginal_seconds_per_image"] and local["marginal_seconds_per_image"]:
                overhead += f", end to end {row['marginal_seconds_per_image'] / local['marginal_seconds_per_image'] - 1:+.1%}"
            if row["idle_seconds_per_image"] is not None and local["idle_seconds_per_image"] is not None:
                added = row["idle_seconds_per_image"] - local["idle_seconds_per_image"]
                overhead += f", idle {added:+.3f} s = {added / local['worker_seconds_per_image']:+.1%} of a local image"
        runs = ", ".join(f"{n}: {s:.1f}" for n, s in row["run_seconds"].items())
        marginal = "" if row["marginal_seconds_per_image"] is None else f"{row['marginal_seconds_per_image']:.3f}"
        rate = "" if row["steady_images_per_second"] is None else f"{row['steady_images_per_second']:.3f}"
        idle = "" if row["idle_seconds_per_image"] is None else f"{row['idle_seconds_per_image']:.3f}"
        lines.append(f"| {model} | {mode} | {engine} | {workers} | {runs} | {row['worker_seconds_per_image']:.3f} | {marginal} | {rate} | {idle} | {overhead} |")
    return "\n".join(lines)


def plot(table: dict[tuple, dict], path: Path, label: str) -> None:
    """Steady images per second against workers, one line per (model, mode) for Ray, the local engine as a point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.5, 4.5))
    for model, mode in sorted({(k[0], k[1]) for k in table}):
        ray = sorted((k[3], v["steady_images_per_second"]) for k, v in table.items() if k[:3] == (model, mode, "ray") and v["steady_images_per_second"])
        if ray:
            line = axis.plot([w for w, _ in ray], [r for _, r in ray], marker="o", label=f"{model} {mode}, ray")[0]
            local = table.get((model, mode, "local", 1))
            if local and local["steady_images_per_second"]:
                axis.plot([1], [local["steady_images_per_second"]], marker="s", linestyle="none", color=line.get_color(), label=f"{model} {mode}, local")
    axis.set_xlabel("workers (1 torch thread each)")
    axis.set_ylabel("steady images per second")
    axis.set_xticks([1, 2])
    axis.set_yscale("log")
    axis.legend(fontsize=8)
    axis.set_title(f"sam-blocked segment, Ray engine (one machine, no network, no GPU)\n{label}", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["tiny"], choices=["tiny", "vit_b", "vit_l", "vit_h"])
    parser.add_argument("--mode", choices=["prompts", "auto"], default="prompts")
    parser.add_argument("--images", nargs="+", type=int, default=[4, 12], help="folder sizes; the smallest and largest give the marginal rate")
    parser.add_argument("--configs", nargs="+", default=[f"{e}{w}" for e, w in CONFIGS], choices=[f"{e}{w}" for e, w in CONFIGS])
    parser.add_argument("--repeat", type=int, default=1, help="alternate the configurations this many times; keep the minima")
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--quick", action="store_true", help="tiny, 2 and 6 images, once")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument("--machine", default=None, help="name for the files (default: this machine's CPU and cores)")
    parser.add_argument("--fresh", action="store_true", help="drop rows of earlier runs on this machine")
    args = parser.parse_args()
    if args.quick:
        args.models, args.images, args.repeat = ["tiny"], [2, 6], 1
    if any(n < 1 for n in args.images):
        parser.error("--images: folder sizes must be >= 1")
    info = machine_info("cpu")
    label = machine_label(info)
    path = args.out_dir / f"ray_{args.machine or machine_slug(info)}.csv"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    rows = [] if args.fresh else read_rows(path)
    configs = [(c[:-1], int(c[-1])) for c in args.configs]
    print(f"machine: {label}; writing {path}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-ray-") as tmp:
        for model in args.models:
            for count in sorted(set(args.images)):
                folder = Path(tmp) / f"photos-{count}"
                if not folder.exists():
                    (Path(tmp) / f"prompts-{count}.json").write_text(json.dumps(make_folder(folder, count)))
                measured = {(model, args.mode, e, w, count) for e, w in configs}
                rows = [r for r in rows if (r["model"], r["mode"], r["engine"], int(r["workers"]), int(r.get("images") or 0)) not in measured]
                for repeat in range(args.repeat):
                    for engine, workers in configs:
                        row = run_one(folder, Path(tmp) / f"prompts-{count}.json", model, args.mode, engine, workers, args.timeout)
                        row.update(machine=label, images=row.get("images", count), repeat=repeat)
                        rows.append(row)
                        write_rows(path, rows, FIELDS)
                        print(f"{model} {args.mode} {engine} x{workers}, {count} images: {row['status']} {row.get('run_seconds', '')} s, load {row['load_average']}", flush=True)
    table = steady(rows)
    loads = [float(r["load_average"]) for r in rows if r.get("load_average") not in (None, "")]
    if loads:  # others' work on the machine while it measured: above the core count, the figures are noise
        label += f"; load average {min(loads):.1f}-{max(loads):.1f} on {info['cores']} cores while measured"
    plot(table, path.with_suffix(".png"), label)
    print(report(table))
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
