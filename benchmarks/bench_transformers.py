"""Time and extra peak memory of transformers' SamVisionModel: eager, SDPA, and patched by sam_blocked.

The model is transformers' own SamVisionModel (the image encoder of SamModel) at vit_b,
vit_l or vit_h sizes (SamVisionConfig as the facebook/sam-vit-* checkpoints have it), with
transformers' random initialisation: time and memory do not depend on the weights.

Modes: eager (attn_implementation="eager": the N x N weights in float32, the full rel-pos
bias), sdpa (transformers' default: F.scaled_dot_product_attention with the full
(B, heads, N, N) bias), patched (the sdpa model after sam_blocked.patch_sam, backend auto),
enabled (the sdpa model built after sam_blocked.enable(), the process-wide switch: the
same computation as patched, reached without the model object).

Every configuration runs in a fresh subprocess: build, one warm-up call, then --repeat
timed calls under inference_mode; `seconds` is the fastest (wall clock), `cpu_s` the
process CPU time of the least costly, `peak_extra_mb` the peak over the memory in use
before the timed calls (CPU: resident high-water mark; CUDA: max_memory_allocated). On the
CPU each child's private data is capped (RLIMIT_DATA), so an out-of-memory is recorded.

Writes benchmarks/results/transformers_<machine>.csv and a PNG next to it.

    python benchmarks/bench_transformers.py                         # vit_b and vit_h, 1024 px, float32, every mode
    python benchmarks/bench_transformers.py --models vit_b --repeat 1
    python benchmarks/bench_transformers.py --table                 # the CSV as a Markdown table
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py
from common import (  # noqa: E402
    MIB,
    RESULTS,
    SweepCSV,
    cap_child_memory,
    cap_mb,
    check_sweep_args,
    default_cap_gb,
    oom_note,
    print_result,
    print_table,
    run_in_child,
)

# name -> SamVisionConfig overrides, as the facebook/sam-vit-* checkpoints' configs
MODEL_CONFIGS = {
    "vit_b": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, global_attn_indexes=[2, 5, 8, 11]),
    "vit_l": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, global_attn_indexes=[5, 11, 17, 23]),
    "vit_h": dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=16, global_attn_indexes=[7, 15, 23, 31]),
}
MODELS = ["vit_b", "vit_h"]
MODES = ["eager", "sdpa", "patched", "enabled"]
FIELDS = [
    "machine", "device", "model", "size", "batch", "dtype", "mode", "status", "seconds", "cpu_s", "first_s",
    "peak_extra_mb", "baseline_mb", "cap_mb", "threads", "torch", "transformers", "note",
]  # fmt: skip


# --- one configuration, in the child ---------------------------------------------------------


def build_model(model: str, size: int, mode: str):
    """transformers' SamVisionModel for one mode, on the CPU in float32, eval mode."""
    import sam_blocked
    from transformers import SamVisionConfig, SamVisionModel

    config = SamVisionConfig(image_size=size, **MODEL_CONFIGS[model])
    if mode == "enabled":
        sam_blocked.enable()
    vision = SamVisionModel._from_config(config, attn_implementation="eager" if mode == "eager" else "sdpa").eval()
    if mode == "patched":
        sam_blocked.patch_sam(vision)
    return vision


def run_child(args: argparse.Namespace) -> int:
    """Measure one configuration and print one RESULT line of JSON."""
    cap_child_memory(args.mem_cap_gb, args.device)

    import torch
    import transformers

    from sam_blocked.memory.measure import current_bytes, peak_bytes, reset_peak

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    row = {"status": "error", "note": "", "threads": torch.get_num_threads(), "transformers": transformers.__version__}
    try:
        vision = build_model(args.model, args.size, args.mode).to(device=device, dtype=dtype)
        x = torch.randn(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(0)).to(device, dtype)
        try:
            with torch.inference_mode():
                start = time.perf_counter()
                vision(pixel_values=x)
                _sync(device)
                row["first_s"] = round(time.perf_counter() - start, 3)
                reset_peak(device)
                baseline = current_bytes(device)
                row["baseline_mb"] = round(baseline / MIB, 1)
                times, cpu_times = [], []
                for _ in range(args.repeat):
                    start, cpu_start = time.perf_counter(), time.process_time()
                    out = vision(pixel_values=x)
                    _sync(device)
                    times.append(time.perf_counter() - start)
                    cpu_times.append(time.process_time() - cpu_start)
                    del out
            row.update(status="ok", seconds=round(min(times), 3), cpu_s=round(min(cpu_times), 3))
            row["peak_extra_mb"] = round((peak_bytes(device) - baseline) / MIB, 1)
        except (RuntimeError, MemoryError) as error:
            row.update(note=oom_note(error), status="OOM")
        if args.mode in ("patched", "enabled"):
            import sam_blocked

            if args.mode == "enabled" and not sam_blocked.switch.report().layers:
                row.update(status="error", note="the switch was on but no layer ran blocked")
    except Exception as error:  # recorded: one configuration must not end the sweep
        row["note"] = f"{type(error).__name__}: {str(error)[:200]}"
    print_result(row)
    return 0


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- the sweep, in the parent ------------------------------------------------------------


def sweep(args: argparse.Namespace) -> Path:
    out = SweepCSV.open(args, "transformers", _key, FIELDS, _order)
    for model in args.models:
        for size in args.sizes:
            for dtype in args.dtypes:
                for mode in args.modes:
                    command = [
                        "--model", model, "--size", str(size), "--dtype", dtype, "--mode", mode, "--device", args.device,
                        "--mem-cap-gb", str(args.mem_cap_gb), "--threads", str(args.threads), "--repeat", str(args.repeat),
                        "--batch", str(args.batch),
                    ]  # fmt: skip
                    result = run_in_child(__file__, command, args.timeout)
                    row = {"machine": out.label, "device": args.device, "model": model, "size": size, "batch": args.batch,
                           "dtype": dtype, "mode": mode, "cap_mb": cap_mb(args.mem_cap_gb, args.device),
                           "torch": out.info["torch"], **result}  # fmt: skip
                    print(
                        f"{model:6s} {size:5d} px x{args.batch} {dtype:8s} {mode:8s} {row['status']:6s} "
                        f"{_fmt(row.get('seconds'), 's'):>9s} cpu {_fmt(row.get('cpu_s'), 's'):>9s} "
                        f"extra peak {_fmt(row.get('peak_extra_mb'), 'MiB'):>10s} {row.get('note', '')}",
                        flush=True,
                    )
                    out.add(row)
    return out.finish(plot)


def _key(row: dict) -> tuple:
    return (row["device"], row["model"], int(row["size"]), int(row["batch"]), row["dtype"], row["mode"])


def _order(row: dict) -> tuple:
    return (*_key(row)[:-1], MODES.index(row["mode"]))


def _fmt(value, unit: str) -> str:
    return "" if value in (None, "") else f"{float(value):.3g} {unit}"


def plot(rows: list[dict], path: Path, label: str) -> None:
    """Two panels, time and extra peak memory: per configuration a bar per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"eager": "tab:red", "sdpa": "tab:orange", "patched": "tab:blue", "enabled": "tab:cyan"}
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    configs = sorted({_key(r)[:-1] for r in rows})
    by_key = {_key(r): r for r in rows}
    fig, (ax_time, ax_mem) = plt.subplots(2, 1, figsize=(max(6, 1.6 * len(configs) * len(modes) / 2 + 2), 7))
    width = 0.8 / max(1, len(modes))
    for i, mode in enumerate(modes):
        for j, config in enumerate(configs):
            row = by_key.get((*config, mode))
            if row is None:
                continue
            x = j + (i - (len(modes) - 1) / 2) * width
            if row["status"] == "ok":
                seconds = float(row["cpu_s"] or row["seconds"])
                ax_time.bar(x, seconds, width, color=colors[mode], label=mode if j == 0 else None)
                ax_mem.bar(x, max(float(row["peak_extra_mb"]), 0.1), width, color=colors[mode])
                ax_mem.annotate(f"{float(row['peak_extra_mb']):.0f}", (x, max(float(row["peak_extra_mb"]), 0.1)),
                                ha="center", va="bottom", fontsize=7)  # fmt: skip
            else:
                for ax in (ax_time, ax_mem):
                    ax.annotate(row["status"], (x, 0), xycoords=("data", "axes fraction"), xytext=(0, 3),
                                textcoords="offset points", rotation=90, fontsize=7, ha="center")  # fmt: skip
    ticks = [f"{m} {s} px\n{d}" + (f", batch {b}" if b > 1 else "") for _, m, s, b, d in configs]
    for ax in (ax_time, ax_mem):
        ax.set_xticks(range(len(ticks)), ticks, fontsize=8)
        ax.grid(True, axis="y", alpha=0.3)
    ax_time.set(ylabel="CPU s per call", title="time: process CPU seconds of the least costly call (steadier than wall clock when shared)")
    ax_mem.set(yscale="log", ylabel="extra peak MiB", title="memory: peak over what was in use before the call")
    ax_time.legend(fontsize=8)
    threads = ", ".join(sorted({str(r.get("threads")) for r in rows if r.get("threads")}))
    fig.suptitle(f"transformers SamVisionModel: eager, sdpa, sam_blocked\n{label}; torch threads: {threads or '?'}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown_table(rows: list[dict]) -> str:
    """One row per configuration, a column per mode: CPU seconds of the least costly call (steadier than
    the wall clock on a shared machine) / extra peak MiB."""
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    by_key = {_key(r): r for r in rows}
    lines = ["| model | size | batch | dtype | " + " | ".join(modes) + " |", "|---" * (4 + len(modes)) + "|"]
    for config in sorted({_key(r)[:-1] for r in rows}):
        cells = []
        for mode in modes:
            row = by_key.get((*config, mode))
            ok = row is not None and row["status"] == "ok"
            seconds = float(row["cpu_s"] or row["seconds"]) if ok else 0.0
            cells.append(f"{seconds:.1f} s / {float(row['peak_extra_mb']):.0f} MiB" if ok else (row or {}).get("status", ""))
        _, model, size, batch, dtype = config
        lines.append(f"| {model} | {size} | {batch} | {dtype} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --- command line ------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=MODELS, choices=list(MODEL_CONFIGS), help=f"default {MODELS}")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024], help="input sizes in px (default 1024)")
    parser.add_argument("--dtypes", nargs="+", default=["float32"], choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--modes", nargs="+", default=MODES, choices=MODES, help=f"default {MODES}")
    parser.add_argument("--batch", type=int, default=1, help="images per call (default 1)")
    parser.add_argument("--repeat", type=int, default=2, help="timed calls after the warm-up (default %(default)s)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    parser.add_argument("--mem-cap-gb", type=float, default=None, help="private-memory cap per child on the CPU (default: 20, or 85%% of RAM)")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per configuration (default %(default)s)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS, help="where the CSV and PNG go (default benchmarks/results)")
    parser.add_argument("--machine", default=None, help="name in the file names (default: from the CPU or GPU model)")
    parser.add_argument("--fresh", action="store_true", help="drop earlier rows of the same CSV")
    parser.add_argument("--table", action="store_true", help="print the CSV as a Markdown table and exit")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    for name in ("--model", "--dtype", "--mode"):
        parser.add_argument(name, help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.mem_cap_gb is None:
        args.mem_cap_gb = default_cap_gb()
    if args.child:
        return run_child(args)
    if args.table:
        return print_table(parser, args, "transformers", markdown_table)
    check_sweep_args(parser, args.sizes, args.device)
    if args.mem_cap_gb <= 0 or args.timeout <= 0 or args.repeat < 1 or args.batch < 1:
        parser.error("--mem-cap-gb and --timeout must be > 0, --repeat and --batch >= 1")
    sweep(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
