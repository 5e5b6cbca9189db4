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

Writes benchmarks/results/resolution_<machine>.csv (rows of earlier runs on the same
machine are kept unless re-measured) and a PNG next to it: extra peak memory against
tokens and time against size, log-log, titled with the machine.

    python benchmarks/bench_resolution.py --quick                  # vit_b at 1024 and 1536
    python benchmarks/bench_resolution.py                          # everything: hours on a CPU
    python benchmarks/bench_resolution.py --models vit_h --sizes 4096 --modes budget
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
    oom_note,
    print_result,
    run_in_child,
)

SIZES = [1024, 1536, 2048, 3072, 4096]
MODELS = ["vit_b", "vit_h"]
MODES = ["stock", "chunks", "budget"]
FIELDS = [
    "machine", "device", "model", "size", "tokens", "mode", "chunks", "max_block_mb", "status", "seconds",
    "baseline_mb", "peak_extra_mb", "est_attention_mb", "cap_mb", "threads", "torch", "note",
]  # fmt: skip


# --- one configuration, in the child ---------------------------------------------------------


def run_child(args: argparse.Namespace) -> int:
    """Measure one configuration and print one RESULT line of JSON."""
    cap_child_memory(args.mem_cap_gb, args.device)  # before anything large exists

    import torch

    from sam_blocked.memory import blocked_attention_bytes, current_bytes, peak_bytes, reset_peak, stock_attention_bytes
    from sam_blocked.models import ENCODER_CONFIGS, build_sam
    from sam_blocked.patch import patch_sam
    from sam_blocked.resolution import set_image_size

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    embed_dim, _, heads, _, _ = ENCODER_CONFIGS[args.model]
    grid = args.size // 16
    if args.mode == "stock":
        estimate = stock_attention_bytes(1, heads, (grid, grid), embed_dim // heads)
    else:
        budget = args.max_block_mb if args.mode == "budget" else None
        estimate = blocked_attention_bytes(1, heads, (grid, grid), embed_dim // heads, args.chunks, budget)
    row = {
        "status": "error", "seconds": "", "baseline_mb": "", "peak_extra_mb": "", "note": "",
        "est_attention_mb": round(estimate / MIB, 1), "threads": torch.get_num_threads(),
    }  # fmt: skip
    try:
        sam = set_image_size(build_sam(args.model), args.size)
        if args.mode == "chunks":
            patch_sam(sam, chunks=args.chunks)
        elif args.mode == "budget":
            patch_sam(sam, max_block_mb=args.max_block_mb)
        encoder = sam.image_encoder.to(device)
        x = torch.randn(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(0)).to(device)
        reset_peak(device)
        baseline = current_bytes(device)
        row["baseline_mb"] = round(baseline / MIB, 1)  # CPU: resident set; CUDA: allocated
        try:
            times = []
            for _ in range(args.repeat):
                start = time.perf_counter()
                with torch.inference_mode():
                    out = encoder(x)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times.append(time.perf_counter() - start)
                del out
            row["seconds"] = round(min(times), 2)
            row["status"] = "ok"
        except (RuntimeError, MemoryError) as error:
            row.update(note=oom_note(error), status="OOM")
        row["peak_extra_mb"] = round((peak_bytes(device) - baseline) / MIB, 1)
    except Exception as error:  # recorded, not raised: one bad configuration must not end the sweep
        row["note"] = f"{type(error).__name__}: {str(error)[:160]}"
    print_result(row)
    return 0


# --- the sweep, in the parent ------------------------------------------------------------


def run_one(args: argparse.Namespace, model: str, size: int, mode: str) -> dict:
    command = [
        "--model", model, "--size", str(size), "--mode", mode, "--device", args.device,
        "--chunks", str(args.chunks), "--max-block-mb", str(args.max_block_mb),
        "--mem-cap-gb", str(args.mem_cap_gb), "--threads", str(args.threads), "--repeat", str(args.repeat),
    ]  # fmt: skip
    return run_in_child(__file__, command, args.timeout)


def sweep(args: argparse.Namespace) -> Path:
    out = SweepCSV.open(args, "resolution", _key, FIELDS, _order)
    for model in args.models:
        for size in args.sizes:
            for mode in args.modes:
                result = run_one(args, model, size, mode)
                row = {
                    "machine": out.label, "device": args.device, "model": model, "size": size, "tokens": (size // 16) ** 2,
                    "mode": mode, "chunks": args.chunks if mode == "chunks" else "",
                    "max_block_mb": args.max_block_mb if mode == "budget" else "",
                    "cap_mb": cap_mb(args.mem_cap_gb, args.device),
                    "torch": out.info["torch"], **result,
                }  # fmt: skip
                print(
                    f"{model:6s} {size:5d} px {mode:7s} {row['status']:8s} {_fmt(row.get('seconds'), 's'):>10s} "
                    f"extra peak {_fmt(row.get('peak_extra_mb'), 'MiB'):>12s}  {row.get('note', '')}",
                    flush=True,
                )
                out.add(row)
    return out.finish(plot)


def _key(row: dict) -> tuple:
    return (row["device"], row["model"], int(row["size"]), row["mode"])


def _order(row: dict) -> tuple:
    return (row["device"], row["model"], int(row["size"]), MODES.index(row["mode"]))


def _fmt(value, unit: str) -> str:
    return "" if value in (None, "") else f"{float(value):.1f} {unit}"


# --- the plot ----------------------------------------------------------------------------


def plot(rows: list[dict], path: Path, label: str) -> None:
    """Extra peak memory vs tokens and time vs size, log-log; OOM and timeouts marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    colors = {"stock": "tab:red", "chunks": "tab:blue", "budget": "tab:green"}
    styles = {"vit_b": ("o", "-"), "vit_l": ("s", "-."), "vit_h": ("D", "--"), "tiny": ("v", ":")}
    fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(13, 5.2))
    series: dict[tuple, list[dict]] = {}
    for row in rows:
        series.setdefault((row["model"], row["mode"]), []).append(row)
    for (model, mode), group in sorted(series.items(), key=lambda kv: (kv[0][0], MODES.index(kv[0][1]))):
        group.sort(key=lambda r: int(r["size"]))
        marker, line = styles.get(model, ("o", "-"))
        name = _series_name(model, mode, group[0])
        ok = [r for r in group if r["status"] == "ok"]
        ax_mem.plot([int(r["tokens"]) for r in ok], [float(r["peak_extra_mb"]) for r in ok],
                    marker=marker, linestyle=line, color=colors[mode], label=name)  # fmt: skip
        ax_time.plot([int(r["size"]) for r in ok], [float(r["seconds"]) for r in ok],
                     marker=marker, linestyle=line, color=colors[mode], label=name)  # fmt: skip
        for r in group:
            if r["status"] == "ok":
                continue
            # Failed runs sit where they would have needed to be: OOM at the estimate, timeout at the limit.
            if r["status"] == "OOM" and r.get("est_attention_mb"):
                ax_mem.plot(int(r["tokens"]), float(r["est_attention_mb"]), marker="x", markersize=11, mew=2.5, color=colors[mode])
                ax_mem.annotate("OOM", (int(r["tokens"]), float(r["est_attention_mb"])), textcoords="offset points",
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
    ax_mem.text(0.99, 0.01, "x = OOM, drawn at the estimated attention need", transform=ax_mem.transAxes,
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


# --- command line ------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help=f"input sizes in px (default {SIZES})")
    parser.add_argument("--models", nargs="+", default=None, choices=["vit_b", "vit_l", "vit_h", "tiny"], help=f"default {MODELS}")
    parser.add_argument("--modes", nargs="+", default=None, choices=MODES, help=f"default {MODES}")
    parser.add_argument("--quick", action="store_true", help="smoke run: vit_b at 1024 and 1536 px, 10-minute timeout")
    parser.add_argument("--chunks", type=int, default=16, help="blocks per score matrix in mode 'chunks' (default %(default)s)")
    parser.add_argument("--max-block-mb", type=float, default=32.0, help="score-block budget in MiB in mode 'budget' (default %(default)s)")
    parser.add_argument("--mem-cap-gb", type=float, default=None, help="private-memory cap per child on the CPU (default: 20, or 85%% of RAM)")
    parser.add_argument("--timeout", type=int, default=None, help="seconds per configuration (default 10800; --quick 600)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    parser.add_argument("--repeat", type=int, default=1, help="forwards per configuration; the fastest is recorded (default %(default)s)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice, one per core)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS, help="where the CSV and PNG go (default benchmarks/results)")
    parser.add_argument("--machine", default=None, help="name in the file names (default: from the CPU or GPU model)")
    parser.add_argument("--fresh", action="store_true", help="drop earlier rows of the same CSV instead of keeping them")
    # One configuration, as the sweep runs it in a subprocess.
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
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
    args.timeout = args.timeout or (600 if args.quick else 10800)
    check_sweep_args(parser, args.sizes, args.device)
    if args.mem_cap_gb <= 0 or args.max_block_mb <= 0 or args.timeout <= 0 or args.chunks < 1 or args.repeat < 1:
        parser.error("--mem-cap-gb, --max-block-mb and --timeout must be > 0; --chunks and --repeat >= 1")
    sweep(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
