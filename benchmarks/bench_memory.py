"""Extra peak memory and time: stock SAM attention vs the patched (blocked) one.

Targets: one global attention layer with vit_b shapes at 64 x 64 tokens, and the whole
vit_b image encoder at 1024 px; stock vs patched with chunks 1, 4, 16, 64. Every
configuration runs in a fresh process. CPU: the resident high-water mark is reset
(/proc/self/clear_refs) after the model and input exist and one warm-up run, then read
after the measured run; CUDA: max_memory_allocated after reset_peak_memory_stats.
Every row also has the floor ratio: the time over the target's FLOPs (sam_blocked.memory.flops)
at the rate of a plain GEMM measured in the same process (common.gemm_rate).

    python benchmarks/bench_memory.py                 # CSV + PNG under benchmarks/results/
    python benchmarks/bench_memory.py --targets layer --chunks 16
    python benchmarks/bench_memory.py --ab --repeat 5 # speed A/B of the vit_b encoder in one process

--ab times, in one process and alternating round by round (so a loaded machine slows all
alike), the vit_b encoder at --img-size: stock, "attention" (patched attention inside stock
blocks: the path before the token-chunked blocks) and "patched" (max_block_mb=32), with a
plain GEMM's rate measured in every round; it prints and writes ab_<device>.csv with each
mode's fastest time and its floor ratio (fastest time x fastest GEMM rate / FLOPs).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py, also when imported from elsewhere
from common import MIB, RESULTS, cpu_model, gemm_rate, read_rows, write_rows  # noqa: E402


def machine_name(device: str) -> str:
    """CPU model and cores, or the GPU name, with the torch version."""
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return f"{cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def run_child(config: dict) -> dict:
    """Build the target and warm up once; then the first measured run gives the extra peak
    memory, and the fastest of `repeat` runs the wall and CPU (process) seconds."""
    from segment_anything.modeling.image_encoder import Attention

    from sam_blocked import build_sam, patch_sam, set_image_size
    from sam_blocked.memory.flops import attention_flops, encoder_flops
    from sam_blocked.memory.measure import current_bytes, peak_bytes, reset_peak

    device = torch.device(config["device"])
    if config["threads"]:
        torch.set_num_threads(config["threads"])
    torch.manual_seed(0)
    grid, size = config["grid"], config["img_size"]
    if config["target"] == "layer":
        model = Attention(768, num_heads=12, use_rel_pos=True, input_size=(grid, grid))
        with torch.no_grad():
            model.rel_pos_h.normal_(0, 0.5)
            model.rel_pos_w.normal_(0, 0.5)
        x = torch.randn(1, grid, grid, 768)
        flops = attention_flops(768, 12, grid)
    else:
        model = set_image_size(build_sam("vit_b"), size).image_encoder
        x = torch.randn(1, 3, size, size)
        flops = encoder_flops("vit_b", size)
    model, x = model.to(device).eval(), x.to(device)
    if config["mode"] == "patched":
        patch_sam(model, chunks=config["chunks"], backend=config["backend"])
    wall, cpu = [], []
    with torch.no_grad():
        model(x)  # warm-up: allocator caches, thread pools
        reset_peak(device)
        base = current_bytes(device)
        for i in range(config["repeat"]):
            start, start_cpu = time.perf_counter(), time.process_time()
            out = model(x)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            wall.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
            if i == 0:
                peak = peak_bytes(device)
            del out
    rate = gemm_rate("float32", config["device"])
    return {
        "extra_peak_mib": round((peak - base) / MIB, 1),
        "time_s": round(min(wall), 3),
        "cpu_s": round(min(cpu), 3),
        "gflop": round(flops / 1e9, 1),
        "gemm_gflops": round(rate / 1e9, 1),
        "floor_ratio": round(min(wall) * rate / flops, 2),
        "threads": torch.get_num_threads(),
        "load_avg": round(os.getloadavg()[0], 2),
    }


def ab(args) -> list[dict]:
    """Stock, attention-only and patched vit_b encoder, alternating in this process; the fastest of each."""
    from sam_blocked import build_sam, patch_sam, set_image_size
    from sam_blocked.adapters.base import ATTENTION
    from sam_blocked.adapters import find
    from sam_blocked.memory.flops import encoder_flops

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    encoder = set_image_size(build_sam("vit_b"), args.img_size).image_encoder.to(device).eval()
    x = torch.randn(1, 3, args.img_size, args.img_size, generator=torch.Generator().manual_seed(0)).to(device)
    flops = encoder_flops("vit_b", args.img_size)

    def mode(name: str) -> None:
        from sam_blocked import unpatch_sam

        unpatch_sam(encoder)
        if name != "stock":
            patch_sam(encoder, max_block_mb=32)
        if name == "attention":  # the blocks back to their stock class, around the patched attention
            for _, module, patch in find(encoder)[0]:
                if patch.kind != ATTENTION:
                    module.__class__ = patch.stock

    modes = ["stock", "attention", "patched"]
    best = {m: float("inf") for m in modes}
    rate = 0.0
    with torch.inference_mode():
        for name in modes:  # warm-up
            mode(name)
            encoder(x)
        for round_ in range(args.repeat):
            for name in modes:
                mode(name)
                start = time.perf_counter()
                encoder(x)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                best[name] = min(best[name], time.perf_counter() - start)
            rate = max(rate, gemm_rate("float32", args.device))
            print(f"round {round_ + 1}: " + ", ".join(f"{m} {best[m]:.2f} s" for m in modes) + f"; GEMM {rate / 1e9:.0f} GFLOP/s", flush=True)
    return [
        {"device": args.device, "img_size": args.img_size, "mode": m, "time_s": round(best[m], 3), "gflop": round(flops / 1e9, 1),
         "gemm_gflops": round(rate / 1e9, 1), "floor_ratio": round(best[m] * rate / flops, 2), "threads": torch.get_num_threads(),
         "repeat": args.repeat, "load_avg": round(os.getloadavg()[0], 2)}
        for m in modes
    ]  # fmt: skip


def configurations(args) -> list[dict]:
    configs = []
    for target in args.targets:
        configs.append({"target": target, "mode": "stock", "chunks": "", "backend": ""})
        configs += [
            {"target": target, "mode": "patched", "chunks": c, "backend": b} for b in args.backends for c in args.chunks
        ]
    for c in configs:
        c.update(device=args.device, threads=args.threads, repeat=args.repeat, grid=args.grid, img_size=args.img_size)
    return configs


def plot(rows: list[dict], machine: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = sorted({r["target"] for r in rows}, key=["layer", "encoder"].index)
    fig, axes = plt.subplots(2, len(targets), figsize=(5.5 * len(targets), 7), squeeze=False)
    first = rows[0]
    grid, size = first.get("grid") or 64, first.get("img_size") or 1024
    titles = {"layer": f"one vit_b global attention layer, {grid}x{grid} tokens", "encoder": f"vit_b image encoder, {size} px"}
    for col, target in enumerate(targets):
        sel = [r for r in rows if r["target"] == target]
        labels = ["stock" if r["mode"] == "stock" else f"{r['backend']} {r['chunks']}" for r in sel]
        colors = ["tab:red" if r["mode"] == "stock" else "tab:blue" for r in sel]
        for row, (key, unit) in enumerate([("extra_peak_mib", "extra peak memory (MiB, log)"), ("time_s", "time (s)")]):
            ax = axes[row][col]
            values = [float(r[key]) for r in sel]
            ax.bar(labels, values, color=colors)
            for i, value in enumerate(values):
                ax.text(i, value, f"{value:g}", ha="center", va="bottom", fontsize=8)
            ax.set_ylabel(unit)
            ax.tick_params(axis="x", labelrotation=45, labelsize=8)
            if key == "extra_peak_mib":
                ax.set_yscale("log")
                ax.set_title(titles[target], fontsize=10)
    fig.suptitle(f"sam_blocked (backend, chunks) vs stock SAM attention\n{machine}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", nargs="+", default=["layer", "encoder"], choices=["layer", "encoder"])
    parser.add_argument("--chunks", nargs="+", type=int, default=[1, 4, 16, 64])
    parser.add_argument("--backends", nargs="+", default=["auto"], help="patch_sam backends to measure (default auto)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: one per core)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per configuration; the fastest counts")
    parser.add_argument("--grid", type=int, default=64, help="tokens per side of the layer target (default %(default)s)")
    parser.add_argument("--img-size", type=int, default=1024, help="input size of the encoder target, a multiple of 16 (default %(default)s)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--replot", action="store_true", help="only redraw the PNG from the CSV in --out")
    parser.add_argument("--ab", action="store_true", help="speed A/B of the vit_b encoder in one process (module doc)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_child(json.loads(args.child))))
        return 0
    if args.ab:
        rows = ab(args)
        machine = machine_name(args.device)
        for row in rows:
            row["machine"] = machine
            print(f"{row['mode']:9} {row['time_s']:8.2f} s   floor ratio {row['floor_ratio']}")
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"ab_{'cuda' if args.device.startswith('cuda') else 'cpu'}.csv"
        write_rows(path, rows, ["machine", "device", "img_size", "mode", "time_s", "gflop", "gemm_gflops", "floor_ratio", "threads", "repeat", "load_avg"])
        print(f"wrote {path}")
        return 0
    if args.replot:
        tag = "cuda" if args.device.startswith("cuda") else "cpu"
        rows = [r for r in read_rows(args.out / f"memory_{tag}.csv") if r["time_s"] != ""]
        plot(rows, rows[0]["machine"], args.out / f"memory_{tag}.png")
        return 0

    machine = machine_name(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    tag = "cuda" if args.device.startswith("cuda") else "cpu"
    rows = []
    for config in configurations(args):
        done = subprocess.run(
            [sys.executable, __file__, "--child", json.dumps(config)], capture_output=True, text=True, env=os.environ
        )
        if done.returncode != 0:
            result = {"extra_peak_mib": "", "time_s": "", "error": done.stderr.strip().splitlines()[-1:]}
            print(f"{config}: failed: {result['error']}", file=sys.stderr)
        else:
            result = json.loads(done.stdout.strip().splitlines()[-1])
        row = {**config, **result, "machine": machine}
        rows.append(row)
        print(f"{config['target']:8} {config['mode']:8} {config['backend']:9} chunks={config['chunks']!s:3} "
              f"extra peak {row['extra_peak_mib']!s:>8} MiB   time {row['time_s']!s:>7} s   cpu {row.get('cpu_s', '')!s:>7} s   "
              f"floor ratio {row.get('floor_ratio', '')!s:>5}",
              flush=True)
    csv_path = args.out / f"memory_{tag}.csv"
    fields = ["machine", "device", "target", "grid", "img_size", "mode", "backend", "chunks", "extra_peak_mib", "time_s", "cpu_s", "gflop",
              "gemm_gflops", "floor_ratio", "threads", "load_avg"]  # fmt: skip
    write_rows(csv_path, rows, fields)
    plot([r for r in rows if r["time_s"] != ""], machine, args.out / f"memory_{tag}.png")
    print(f"wrote {csv_path} and {csv_path.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
