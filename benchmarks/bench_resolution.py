"""Extra peak memory and time of SAM's image encoder against input size, stock vs patched.

Every (model, size, mode) runs in a fresh subprocess, so one configuration's peak and
allocator state never leak into the next. In the child: build the model (seeded random
weights) at 1024 px, `set_image_size` it, build a random (1, 3, size, size) input, reset
the peak, time one encoder forward under inference_mode, read the peak. On the CPU the
child's private data (RLIMIT_DATA: heap and anonymous mappings, the memory that costs RAM)
is capped, so an out-of-memory is a torch RuntimeError recorded as "OOM" rather than the
kernel's OOM killer taking the machine's other work with it; a child still killed by a
signal is recorded as "killed", one past --timeout as "timeout".

Modes: stock (segment_anything as shipped), chunks (patched, fixed --chunks, 16 = 4 x 4),
budget (patched, --max-block-mb for the largest score block, chosen per layer and size).

Beside each measurement: the planner's prediction for it (sam_blocked.plan_memory: the
encoder's extra peak, stock or patched) and the floor ratio, the time over the encoder's
FLOPs (sam_blocked.memory.flops.encoder_flops) at the rate of a plain GEMM measured in the same
child after the encode (common.gemm_rate), in the run's dtype. `--table` prints the CSV as
the README's Markdown table.

Writes benchmarks/results/resolution_<machine>.csv (rows of earlier runs on the same
machine are kept unless re-measured) and a PNG next to it: extra peak memory against
tokens and time against size, log-log, titled with the machine.

    python benchmarks/bench_resolution.py --quick                  # vit_b at 1024 and 1536
    python benchmarks/bench_resolution.py                          # everything: hours on a CPU
    python benchmarks/bench_resolution.py --models vit_h --sizes 4096 --modes budget
    python benchmarks/bench_resolution.py --dtypes bfloat16 --sizes 1024 1536 2048 --modes budget
    python benchmarks/bench_resolution.py --table
    python benchmarks/bench_resolution.py --replan                 # the planner's columns again, after the planner changed
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py, also when imported from elsewhere
from common import (  # noqa: E402
    MIB,
    RESULTS,
    SweepCSV,
    cap_child_memory,
    cap_mb,
    check_sweep_args,
    default_cap_gb,
    gemm_rate,
    oom_note,
    print_result,
    print_table,
    run_in_child,
)

SIZES = [1024, 1536, 2048, 3072, 4096]
MODELS = ["vit_b", "vit_h"]
MODES = ["stock", "chunks", "budget"]
DTYPES = ["float32"]
FIELDS = [
    "machine", "device", "model", "size", "tokens", "dtype", "mode", "chunks", "max_block_mb", "blocks", "status", "seconds",
    "baseline_mb", "peak_extra_mb", "planned_mb", "tensor_peak_mb", "planned_tensor_mb", "gflop", "gemm_gflops", "floor_ratio", "cap_mb", "threads", "torch", "note",
]  # fmt: skip


# --- one configuration, in the child ---------------------------------------------------------


def run_child(args: argparse.Namespace) -> int:
    """Measure one configuration and print one RESULT line of JSON."""
    cap_child_memory(args.mem_cap_gb, args.device)  # before anything large exists

    import torch

    from sam_blocked.memory.flops import encoder_flops
    from sam_blocked.memory.measure import current_bytes, peak_bytes, reset_peak, tensor_peak_bytes
    from sam_blocked.models.registry import build_sam
    from sam_blocked.patch import patch_sam
    from sam_blocked.resolution import set_image_size

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    budget = args.max_block_mb if args.mode == "budget" else None
    flops = encoder_flops(args.model, args.size)
    row = {
        "status": "error", "seconds": "", "baseline_mb": "", "peak_extra_mb": "", "tensor_peak_mb": "", "note": "", "gemm_gflops": "",
        "floor_ratio": "", **planned(args.model, args.size, args.dtype, args.device, args.mode, args.chunks, budget),
        "gflop": round(flops / 1e9, 3), "threads": torch.get_num_threads(),
    }  # fmt: skip
    try:
        sam = set_image_size(build_sam(args.model), args.size)
        if args.blocks:  # every block has the same shapes: the peak is one block's over the residual stream
            sam.image_encoder.blocks = sam.image_encoder.blocks[: args.blocks]
        if args.mode == "chunks":
            patch_sam(sam, chunks=args.chunks)
        elif args.mode == "budget":
            patch_sam(sam, max_block_mb=args.max_block_mb)
        dtype = getattr(torch, args.dtype)
        encoder = sam.image_encoder.to(device, dtype)
        x = torch.randn(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(0)).to(device, dtype)
        reset_peak(device)
        baseline = current_bytes(device)
        row["baseline_mb"] = round(baseline / MIB, 1)  # CPU: resident set; CUDA: allocated

        def encode() -> None:
            with torch.inference_mode():
                encoder(x)  # the output is dropped at once, as in the peak's accounting
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        try:
            times = []
            for _ in range(args.repeat):
                start = time.perf_counter()
                encode()
                times.append(time.perf_counter() - start)
            row["seconds"] = round(min(times), 2)
            row["status"] = "ok"
        except (RuntimeError, MemoryError) as error:
            row.update(note=oom_note(error), status="OOM")
        row["peak_extra_mb"] = round((peak_bytes(device) - baseline) / MIB, 1)
        if row["status"] == "ok" and not args.blocks:  # the FLOP count is the whole encoder's
            # After the encode (its peak is measured without the GEMM's operands) and before
            # the profiler runs: a GEMM after a profiled encode ran 20-25% slower here.
            rate = gemm_rate(args.dtype, args.device, (args.gemm_size,) * 3)
            row["gemm_gflops"] = round(rate / 1e9, 1)
            row["floor_ratio"] = round(min(times) * rate / flops, 2)
        if row["status"] == "ok":
            # The tensors alone: CUDA's allocator peak, or on the CPU one more encode under the
            # profiler's memory events (after the resident peak is read: the profiler's own
            # records of every op would add to it).
            tensors = peak_bytes(device) - baseline if device.type == "cuda" else tensor_peak_bytes(encode)[1]
            row["tensor_peak_mb"] = round(tensors / MIB, 1)
    except Exception as error:  # recorded, not raised: one bad configuration must not end the sweep
        row["note"] = f"{type(error).__name__}: {str(error)[:160]}"
    print_result(row)
    return 0


def planned(model: str, size: int, dtype: str, device: str, mode: str, chunks: int, budget) -> dict:
    """The planner's figures for one row, in MiB: planned_tensor_mb (the tensors, a prediction)
    and planned_mb (its extra peak: on the CPU a bound on the resident set)."""
    from sam_blocked.memory.planner import plan_memory

    plan = plan_memory(model, size, dtype, device, 1, chunks, budget)
    peak = plan.encoder_stock_bytes if mode == "stock" else plan.encoder_patched_bytes
    tensors = plan.encoder_stock_tensor_bytes if mode == "stock" else plan.encoder_tensor_bytes
    return {"planned_mb": round(peak / MIB, 1), "planned_tensor_mb": round(tensors / MIB, 1)}


def replan(args: argparse.Namespace) -> int:
    """--replan: the planner's columns of every row of the machine's CSV recomputed by the
    planner as it is now (predictions, not measurements), and the PNG redrawn."""
    out = SweepCSV.open(args, "resolution", _key, FIELDS, _order)
    for row in list(out.rows.values()):
        budget = float(row["max_block_mb"]) if row["mode"] == "budget" else None
        chunks = int(row.get("chunks") or 16)
        row.update(planned(row["model"], int(row["size"]), row.get("dtype") or "float32", row["device"], row["mode"], chunks, budget))
        out.add(row)
    out.finish(plot)
    return 0


# --- the sweep, in the parent ------------------------------------------------------------


def run_one(args: argparse.Namespace, model: str, size: int, dtype: str, mode: str) -> dict:
    command = [
        "--model", model, "--size", str(size), "--dtype", dtype, "--mode", mode, "--device", args.device,
        "--chunks", str(args.chunks), "--max-block-mb", str(args.max_block_mb),
        "--mem-cap-gb", str(args.mem_cap_gb), "--threads", str(args.threads), "--repeat", str(args.repeat),
        "--blocks", str(args.blocks or 0), "--gemm-size", str(args.gemm_size),
    ]  # fmt: skip
    return run_in_child(__file__, command, args.timeout)


def sweep(args: argparse.Namespace) -> Path:
    out = SweepCSV.open(args, "resolution", _key, FIELDS, _order)
    for model, size, dtype, mode in ((m, s, d, o) for m in args.models for s in args.sizes for d in args.dtypes for o in args.modes):
        result = run_one(args, model, size, dtype, mode)
        row = {
            "machine": out.label, "device": args.device, "model": model, "size": size, "tokens": (size // 16) ** 2,
            "dtype": dtype, "mode": mode, "chunks": args.chunks if mode == "chunks" else "",
            "max_block_mb": args.max_block_mb if mode == "budget" else "",
            "blocks": f"0-{args.blocks - 1} + neck" if args.blocks else "",
            "cap_mb": cap_mb(args.mem_cap_gb, args.device),
            "torch": out.info["torch"], **result,
        }  # fmt: skip
        print(
            f"{model:6s} {size:5d} px {dtype:8s} {mode:7s} {row['status']:8s} {_fmt(row.get('seconds'), 's'):>10s} "
            f"extra peak {_fmt(row.get('peak_extra_mb'), 'MiB'):>12s} (planned {_fmt(row.get('planned_mb'), 'MiB')}) "
            f"floor ratio {row.get('floor_ratio') or '-'}  {row.get('note', '')}",
            flush=True,
        )
        out.add(row)
    return out.finish(plot)


def _key(row: dict) -> tuple:
    return (row["device"], row["model"], int(row["size"]), row.get("dtype") or "float32", row["mode"], row.get("blocks") or "")


def _order(row: dict) -> tuple:
    return (row["device"], row["model"], int(row["size"]), row.get("dtype") or "float32", MODES.index(row["mode"]), row.get("blocks") or "")


def _fmt(value, unit: str) -> str:
    return "" if value in (None, "") else f"{float(value):.1f} {unit}"


# --- the plot ----------------------------------------------------------------------------


def plot(rows: list[dict], path: Path, label: str) -> None:
    """Extra peak memory vs tokens and time vs size, log-log; OOM and timeouts marked, the
    planner's predictions as open markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    colors = {"stock": "tab:red", "chunks": "tab:blue", "budget": "tab:green"}
    styles = {"vit_b": ("o", "-"), "vit_l": ("s", "-."), "vit_h": ("D", "--"), "tiny": ("v", ":")}
    fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(13, 5.2))
    series: dict[tuple, list[dict]] = {}
    for row in rows:
        series.setdefault((row["model"], row.get("dtype") or "float32", row["mode"], row.get("blocks") or ""), []).append(row)
    for (model, dtype, mode, blocks), group in sorted(series.items(), key=lambda kv: (kv[0][:2], MODES.index(kv[0][2]), kv[0][3])):
        group.sort(key=lambda r: int(r["size"]))
        marker, line = styles.get(model, ("o", "-"))
        name = _series_name(model, mode, group[0]) + ("" if dtype == "float32" else f", {dtype}") + (f", blocks {blocks}" if blocks else "")
        line = line if dtype == "float32" else ":"
        ok = [r for r in group if r["status"] == "ok"]
        ax_mem.plot([int(r["tokens"]) for r in ok], [float(r["peak_extra_mb"]) for r in ok],
                    marker=marker, linestyle=line, color=colors[mode], label=name)  # fmt: skip
        planned = [r for r in ok if r.get("planned_mb")]
        ax_mem.plot([int(r["tokens"]) for r in planned], [float(r["planned_mb"]) for r in planned],
                    marker=marker, linestyle="none", markerfacecolor="none", markersize=9, color=colors[mode], alpha=0.6)  # fmt: skip
        ax_time.plot([int(r["size"]) for r in ok], [float(r["seconds"]) for r in ok],
                     marker=marker, linestyle=line, color=colors[mode], label=name)  # fmt: skip
        for r in group:
            if r["status"] == "ok":
                continue
            # Failed runs sit where they would have needed to be: OOM at the estimate, timeout at the limit.
            need = r.get("planned_mb") or r.get("est_attention_mb")  # rows before the planner had an attention estimate
            if r["status"] == "OOM" and need:
                ax_mem.plot(int(r["tokens"]), float(need), marker="x", markersize=11, mew=2.5, color=colors[mode])
                ax_mem.annotate("OOM", (int(r["tokens"]), float(need)), textcoords="offset points",
                                xytext=(6, -3), fontsize=8, color=colors[mode])  # fmt: skip
            elif r["status"] == "timeout" and r.get("seconds"):
                ax_time.plot(int(r["size"]), float(r["seconds"]), marker="^", markersize=10, color=colors[mode])
                ax_time.annotate("timeout", (int(r["size"]), float(r["seconds"])), textcoords="offset points",
                                 xytext=(6, -3), fontsize=8, color=colors[mode])  # fmt: skip
    caps = {r["cap_mb"] for r in rows if r.get("cap_mb")}
    for cap in caps:
        ax_mem.axhline(float(cap), color="grey", linewidth=0.8, linestyle=":")
        ax_mem.annotate(f"memory cap {float(cap) / 1024:.0f} GiB", (0.01, float(cap)), xycoords=("axes fraction", "data"),
                        textcoords="offset points", xytext=(0, 3), fontsize=8, color="grey")  # fmt: skip
    _guides(ax_mem, [r for r in rows if r["status"] == "ok"])
    ax_mem.set(xscale="log", yscale="log", xlabel="tokens (input px / 16)$^2$",
               ylabel="extra peak memory over the loaded model (MiB)", title="Memory: extra peak vs tokens")  # fmt: skip
    tokens = sorted({int(r["tokens"]) for r in rows})
    ax_mem.set_xticks(tokens, [f"{t}\n{int(round(t**0.5)) * 16} px" for t in tokens])
    ax_mem.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax_mem.text(0.99, 0.01, "open markers: the planner's prediction; x = OOM, drawn at the planned need", transform=ax_mem.transAxes,
                ha="right", va="bottom", fontsize=7, color="grey")  # fmt: skip
    sizes = sorted({int(r["size"]) for r in rows})
    ax_time.set(xscale="log", yscale="log", xlabel="input size (px per side)", ylabel="encoder time, one image (s)",
                title="Time vs input size")  # fmt: skip
    ax_time.set_xticks(sizes, [str(s) for s in sizes])
    ax_time.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    for ax in (ax_mem, ax_time):
        low, high = ax.get_ylim()
        plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
        ax.yaxis.set_major_formatter(plain)
        # Label the 2, 3, 4, 6 ticks too when the axis spans less than two decades.
        ax.yaxis.set_minor_formatter(plain if high / low < 100 else matplotlib.ticker.NullFormatter())
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"SAM image encoder at high resolution: stock vs sam_blocked\n{label}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _guides(ax, ok: list[dict]) -> None:
    """Faint slopes through the smallest measured point: memory linear and quadratic in tokens."""
    if not ok:
        return
    first = min(ok, key=lambda r: (int(r["tokens"]), float(r["peak_extra_mb"])))
    x0, y0 = int(first["tokens"]), float(first["peak_extra_mb"])
    x1 = max(int(r["tokens"]) for r in ok)
    if x1 == x0:
        return
    for power, name in ((1, "∝ tokens"), (2, "∝ tokens²")):
        ax.plot([x0, x1], [y0, y0 * (x1 / x0) ** power], color="grey", linewidth=0.7, alpha=0.5, linestyle="-")
        ax.annotate(name, (x1, y0 * (x1 / x0) ** power), fontsize=7, color="grey", textcoords="offset points", xytext=(-30, 4))


def _series_name(model: str, mode: str, row: dict) -> str:
    if mode == "chunks":
        return f"{model} patched, {row.get('chunks') or 16} chunks"
    if mode == "budget":
        return f"{model} patched, {float(row.get('max_block_mb') or 0):g} MiB blocks"
    return f"{model} stock"


def markdown_table(rows: list[dict]) -> str:
    """A Markdown table, a row per configuration: status; the extra peak (resident set on the
    CPU) beside the planner's figure (on the CPU a bound) and their ratio; the tensors' peak
    beside the planner's prediction and their ratio; seconds and the floor ratio."""
    lines = [
        "| model | size | dtype | mode | blocks run | status | extra peak MiB | planned (CPU: bound) | ratio | tensors' peak MiB | planned | ratio "
        "| time s | floor ratio |",
        "|---" * 14 + "|",
    ]
    for r in sorted(rows, key=_order):
        ok = r["status"] == "ok"
        status = r["status"] if ok else f"{r['status']}: {r.get('note', '')}"
        cells = []
        for measured, planned in (("peak_extra_mb", "planned_mb"), ("tensor_peak_mb", "planned_tensor_mb")):
            got, want = (r.get(measured) or "") if ok else "", r.get(planned) or ""
            cells += [got, want, f"{float(got) / float(want):.2f}" if got and want else ""]
        lines.append(
            f"| {r['model']} | {r['size']} | {r.get('dtype') or 'float32'} | {_mode_name(r)} | {r.get('blocks') or 'all'} | {status} | "
            + " | ".join(str(c) for c in cells)
            + f" | {r.get('seconds') or ''} | {r.get('floor_ratio') or ''} |"
        )
    return "\n".join(lines)


def _mode_name(row: dict) -> str:
    if row["mode"] == "budget":
        return f"budget {float(row.get('max_block_mb') or 0):g} MiB"
    if row["mode"] == "chunks":
        return f"chunks {row.get('chunks') or 16}"
    return "stock"


# --- command line ------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help=f"input sizes in px (default {SIZES})")
    parser.add_argument("--models", nargs="+", default=None, choices=["vit_b", "vit_l", "vit_h", "tiny"], help=f"default {MODELS}")
    parser.add_argument("--modes", nargs="+", default=None, choices=MODES, help=f"default {MODES}")
    parser.add_argument("--dtypes", nargs="+", default=None, choices=["float32", "bfloat16", "float16"], help=f"encoder dtypes (default {DTYPES})")
    parser.add_argument("--table", action="store_true", help="print the CSV of --machine (or this machine) as a Markdown table and exit")
    parser.add_argument("--replan", action="store_true", help="recompute the planner's columns of the CSV's rows with the planner as it is now, redraw the PNG, and exit")
    parser.add_argument("--quick", action="store_true", help="smoke run: vit_b at 1024 and 1536 px, 10-minute timeout")
    parser.add_argument("--chunks", type=int, default=16, help="blocks per score matrix in mode 'chunks' (default %(default)s)")
    parser.add_argument("--max-block-mb", type=float, default=32.0, help="score-block budget in MiB in mode 'budget' (default %(default)s)")
    parser.add_argument("--mem-cap-gb", type=float, default=None, help="private-memory cap per child on the CPU (default: 20, or 85%% of RAM)")
    parser.add_argument("--timeout", type=int, default=None, help="seconds per configuration (default 10800; --quick 600)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    parser.add_argument("--blocks", type=int, default=None, help="run only the encoder's first N blocks and the neck (memory of long runs: "
                        "every block has the same shapes, so the peak is a block's; rows say 'blocks 0-(N-1) + neck', no floor ratio)")
    parser.add_argument("--repeat", type=int, default=1, help="forwards per configuration; the fastest is recorded (default %(default)s)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice, one per core)")
    parser.add_argument("--gemm-size", type=int, default=2048, help="side of the square GEMM whose rate sets the floor ratio (default %(default)s; "
                        "smaller runs faster and gives a lower rate, so a looser floor: for smoke runs)")  # fmt: skip
    parser.add_argument("--out-dir", type=Path, default=RESULTS, help="where the CSV and PNG go (default benchmarks/results)")
    parser.add_argument("--machine", default=None, help="name in the file names (default: from the CPU or GPU model)")
    parser.add_argument("--fresh", action="store_true", help="drop earlier rows of the same CSV instead of keeping them")
    # One configuration, as the sweep runs it in a subprocess.
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.mem_cap_gb is None:
        args.mem_cap_gb = default_cap_gb()
    if args.child:
        return run_child(args)
    args.sizes = args.sizes or ([1024, 1536] if args.quick else SIZES)
    args.models = args.models or (["vit_b"] if args.quick else MODELS)
    args.modes = args.modes or MODES
    args.dtypes = args.dtypes or DTYPES
    if args.table:
        return print_table(parser, args, "resolution", markdown_table)
    args.timeout = args.timeout or (600 if args.quick else 10800)
    if args.replan:
        return replan(args)
    check_sweep_args(parser, args.sizes, args.device)
    if args.mem_cap_gb <= 0 or args.max_block_mb <= 0 or args.timeout <= 0 or args.chunks < 1 or args.repeat < 1:
        parser.error("--mem-cap-gb, --max-block-mb and --timeout must be > 0; --chunks and --repeat >= 1")
    sweep(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
