"""Time and extra peak memory of SAM's attention: stock, stock with SDPA and the full bias, and each backend.

Scopes: "layer" is one global Attention of the model at the size's token grid (64 x 64
tokens at 1024 px), x of shape (1, H, W, dim); "window" is one windowed Attention over all
of the image's 14 x 14 windows at once, as the encoder calls it; "encoder" is the whole
image encoder on a (1, 3, size, size) image. All with seeded random weights.

Modes: stock (segment_anything as shipped: three live (B*heads, N, N) tensors), stock-sdpa
(what transformers and timm do: the full (B*heads, N, N) bias materialized, then
F.scaled_dot_product_attention), and patch_sam with backend blocked, sdpa, bands, flashbias,
flex or auto. A backend that cannot run a configuration is recorded as "refused" with
its reason (sam_blocked.attention.dispatch.not_supported_reasons).

Every configuration runs in a fresh subprocess: build, one warm-up call (its time, which
includes any compilation, is recorded as first_s), then reset the peak and time
--repeat calls under inference_mode; the fastest is `seconds` (wall clock; `cpu_s` is the
process's CPU time of the least costly call, steadier on a shared machine), and `peak_extra_mb` is the
peak over the memory in use before the timed calls (CPU: the resident high-water mark,
sam_blocked.memory.measure; CUDA: max_memory_allocated). On the CPU each child's private data is
capped (RLIMIT_DATA), so an out-of-memory is recorded as "OOM" rather than handing the
machine to the kernel's OOM killer.

Writes benchmarks/results/backends_<machine>.csv (rows of earlier runs on the same machine
are kept unless re-measured) and a PNG next to it, titled with the machine.

    python benchmarks/bench_backends.py --quick              # vit_b 1024 px float32, one global layer, every mode
    python benchmarks/bench_backends.py                      # the full grid: vit_b, vit_h; 1024, 2048 px; float32, bfloat16
    python benchmarks/bench_backends.py --device cuda --scopes layer encoder --dtypes bfloat16
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import types
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
    print_table,
    run_in_child,
)

SCOPES = ["layer", "window", "encoder"]
MODELS = ["vit_b", "vit_h"]
SIZES = [1024, 2048]
DTYPES = ["float32", "bfloat16"]
BACKEND_MODES = ["blocked", "sdpa", "bands", "flashbias", "flex", "auto"]
MODES = ["stock", "stock-sdpa", *BACKEND_MODES]
FIELDS = [
    "machine", "device", "scope", "model", "size", "tokens", "batch", "dtype", "mode", "backend_used", "status",
    "seconds", "cpu_s", "first_s", "peak_extra_mb", "baseline_mb", "cap_mb", "threads", "torch", "note",
]  # fmt: skip


# --- what is measured ------------------------------------------------------------------------


def stock_sdpa_forward(self, x):
    """segment_anything's Attention.forward as transformers / timm run it: the full
    (B*heads, N, N) rel-pos bias materialized in the model dtype, then one SDPA call."""
    import torch
    import torch.nn.functional as F
    from segment_anything.modeling.image_encoder import get_rel_pos

    B, H, W, _ = x.shape
    qkv = self.qkv(x).reshape(B, H * W, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.reshape(3, B * self.num_heads, H * W, -1).unbind(0)  # (B*heads, N, C)
    bias = None
    if self.use_rel_pos:
        Rh, Rw = get_rel_pos(H, H, self.rel_pos_h), get_rel_pos(W, W, self.rel_pos_w)
        r_q = q.reshape(B * self.num_heads, H, W, -1)
        rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, Rh)
        rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, Rw)
        bias = (rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]).reshape(B * self.num_heads, H * W, H * W)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
    out = out.view(B, self.num_heads, H, W, -1).permute(0, 2, 3, 1, 4).reshape(B, H, W, -1)
    return self.proj(out)


def build_subject(scope: str, model: str, size: int, mode: str, device, dtype, batch: int = 1):
    """(module, input) for one configuration, patched as `mode` says, on device in dtype; `batch`
    images (encoder) or copies of the layer's input (layer, window)."""
    import torch
    from segment_anything.modeling.image_encoder import Attention

    from sam_blocked.models.registry import ENCODER_CONFIGS, PATCH_SIZE, build_sam
    from sam_blocked.patch import patch_sam

    embed_dim, _, heads, _, window = ENCODER_CONFIGS[model]
    grid = size // PATCH_SIZE
    generator = torch.Generator().manual_seed(0)
    if scope == "encoder":
        module = build_sam(model, img_size=size).image_encoder
        x = torch.randn(batch, 3, size, size, generator=generator)
    else:
        side = grid if scope == "layer" else window
        windows = 1 if scope == "layer" else math.ceil(grid / window) ** 2
        torch.manual_seed(0)
        module = Attention(embed_dim, heads, qkv_bias=True, use_rel_pos=True, input_size=(side, side)).eval()
        with torch.no_grad():
            module.rel_pos_h.normal_(0.0, 0.5)
            module.rel_pos_w.normal_(0.0, 0.5)
        x = torch.randn(batch * windows, side, side, embed_dim, generator=generator)
    if mode == "stock-sdpa":
        for m in module.modules():
            if isinstance(m, Attention):
                m.forward = types.MethodType(stock_sdpa_forward, m)
    elif mode != "stock":
        patch_sam(module, backend=mode)
    return module.to(device=device, dtype=dtype), x.to(device=device, dtype=dtype)


def backend_used(scope: str, model: str, size: int, mode: str, device, dtype, cpu_flex: bool = False) -> tuple[str, str]:
    """(backend that runs the attention, per kind of layer for "auto" on the encoder; refusal reason or "")."""
    from sam_blocked.attention.dispatch import BACKENDS, choose_backend, not_supported_reasons
    from sam_blocked.models.registry import ENCODER_CONFIGS, PATCH_SIZE

    if mode not in BACKENDS and mode != "auto":
        return "", ""
    embed_dim, _, heads, _, window = ENCODER_CONFIGS[model]
    side = window if scope == "window" else size // PATCH_SIZE
    if mode == "flex" and cpu_flex:
        return "flex (forced on the CPU)", ""
    if mode == "auto":
        chosen = choose_backend(device, dtype, (side, side), embed_dim // heads)
        if scope == "encoder":
            chosen = f"global {chosen}, windows {choose_backend(device, dtype, (window, window), embed_dim // heads)}"
        return chosen, ""
    reasons = not_supported_reasons(mode, device, dtype, (side, side), embed_dim // heads)
    if not reasons and scope == "encoder":
        reasons = not_supported_reasons(mode, device, dtype, (window, window), embed_dim // heads)
    return mode, "; ".join(reasons)


# --- one configuration, in the child ---------------------------------------------------------


def run_child(args: argparse.Namespace) -> int:
    """Measure one configuration and print one RESULT line of JSON."""
    cap_child_memory(args.mem_cap_gb, args.device)  # before anything large exists

    import torch

    from sam_blocked.memory.measure import current_bytes, peak_bytes, reset_peak

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    row = {"status": "error", "seconds": "", "cpu_s": "", "first_s": "", "baseline_mb": "", "peak_extra_mb": "", "note": "",
           "threads": torch.get_num_threads()}  # fmt: skip
    try:
        used, refusal = backend_used(args.scope, args.model, args.size, args.mode, device, dtype, args.cpu_flex)
        if args.cpu_flex and args.mode == "flex" and device.type == "cpu":
            import sam_blocked.attention.dispatch

            sam_blocked.attention.dispatch.flex_reasons = lambda device: []  # measure what FLEX_CPU_REASON describes
        row["backend_used"] = used
        if refusal:
            row.update(status="refused", note=refusal[:300])
            print_result(row)
            return 0
        module, x = build_subject(args.scope, args.model, args.size, args.mode, device, dtype, args.batch)
        try:
            with torch.inference_mode():
                start = time.perf_counter()
                out = module(x)
                _sync(device)
                row["first_s"] = round(time.perf_counter() - start, 3)
                del out
                reset_peak(device)
                baseline = current_bytes(device)
                row["baseline_mb"] = round(baseline / MIB, 1)
                times, cpu_times = [], []
                for _ in range(args.repeat):
                    start, cpu_start = time.perf_counter(), time.process_time()
                    out = module(x)
                    _sync(device)
                    times.append(time.perf_counter() - start)
                    cpu_times.append(time.process_time() - cpu_start)
                    del out
            row["seconds"] = round(min(times), 4)
            row["cpu_s"] = round(min(cpu_times), 4)
            row["status"] = "ok"
            row["peak_extra_mb"] = round((peak_bytes(device) - baseline) / MIB, 1)
        except (RuntimeError, MemoryError) as error:
            row.update(note=oom_note(error), status="OOM")
    except Exception as error:  # recorded, not raised: one bad configuration must not end the sweep
        row["note"] = f"{type(error).__name__}: {str(error)[:200]}"
    print_result(row)
    return 0


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- the sweep, in the parent ------------------------------------------------------------


def run_one(args: argparse.Namespace, scope: str, model: str, size: int, dtype: str, mode: str) -> dict:
    command = [
        "--scope", scope, "--model", model, "--size", str(size), "--dtype", dtype, "--mode", mode,
        "--device", args.device, "--mem-cap-gb", str(args.mem_cap_gb), "--threads", str(args.threads),
        "--repeat", str(args.repeat), "--batch", str(args.batch), *(["--cpu-flex"] if args.cpu_flex else []),
    ]  # fmt: skip
    return run_in_child(__file__, command, args.timeout)


def sweep(args: argparse.Namespace) -> Path:
    out = SweepCSV.open(args, "backends", _key, FIELDS, _order)
    for scope in args.scopes:
        for model in args.models:
            for size in args.sizes:
                for dtype in args.dtypes:
                    for mode in args.modes:
                        result = run_one(args, scope, model, size, dtype, mode)
                        row = {
                            "machine": out.label, "device": args.device, "scope": scope, "model": model, "size": size,
                            "tokens": (size // 16) ** 2, "batch": args.batch, "dtype": dtype, "mode": mode, "backend_used": "",
                            "cap_mb": cap_mb(args.mem_cap_gb, args.device),
                            "torch": out.info["torch"], **result,
                        }  # fmt: skip
                        print(
                            f"{scope:7s} {model:6s} {size:5d} px x{args.batch} {dtype:8s} {mode:10s} {row['status']:8s} "
                            f"{_fmt(row.get('seconds'), 's'):>10s} cpu {_fmt(row.get('cpu_s'), 's'):>10s} extra peak {_fmt(row.get('peak_extra_mb'), 'MiB'):>12s} "
                            f"{row.get('backend_used') or ''} {row.get('note', '')}",
                            flush=True,
                        )
                        out.add(row)
    return out.finish(plot)


def _key(row: dict) -> tuple:
    return (row["device"], row["scope"], row["model"], int(row["size"]), _batch(row), row["dtype"], row["mode"])


def _batch(row: dict) -> int:
    return int(row.get("batch") or 1)  # rows written before the column existed had batch 1


def _fmt(value, unit: str) -> str:
    return "" if value in (None, "") else f"{float(value):.3g} {unit}"


def _order(row: dict) -> tuple:
    return (row["device"], SCOPES.index(row["scope"]), row["model"], int(row["size"]), _batch(row), row["dtype"], MODES.index(row["mode"]))


# --- the plot ----------------------------------------------------------------------------


def plot(rows: list[dict], path: Path, label: str) -> None:
    """Per scope, two panels (time, extra peak memory); in each, per configuration (model, size,
    batch, dtype) a bar per mode, and a status label where a mode did not run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"stock": "tab:red", "stock-sdpa": "tab:orange", "blocked": "tab:blue", "sdpa": "tab:green", "bands": "tab:olive",
              "flashbias": "tab:purple", "flex": "tab:brown", "auto": "black"}  # fmt: skip
    scopes = [s for s in SCOPES if any(r["scope"] == s for r in rows)]
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    by_key = {_key(r): r for r in rows}
    configs = {s: sorted({_key(r)[:-1] for r in rows if r["scope"] == s}) for s in scopes}  # _key less the mode
    widest = max(len(c) for c in configs.values())
    fig, axes = plt.subplots(2 * len(scopes), 1, figsize=(max(8, 0.22 * widest * len(modes) + 2), 4.2 * len(scopes)), squeeze=False)
    width = 0.8 / max(1, len(modes))
    forced = any("forced" in (r.get("backend_used") or "") for r in rows)  # --cpu-flex
    for k, scope in enumerate(scopes):
        ax_time, ax_mem = axes[2 * k, 0], axes[2 * k + 1, 0]
        for i, mode in enumerate(modes):
            for j, config in enumerate(configs[scope]):
                row = by_key.get((*config, mode))
                if row is None:
                    continue
                x = j + (i - (len(modes) - 1) / 2) * width
                if row["status"] == "ok":
                    hatch = "//" if "forced" in (row.get("backend_used") or "") else None
                    ax_time.bar(x, float(row["seconds"]), width, color=colors[mode], hatch=hatch)
                    ax_mem.bar(x, max(float(row["peak_extra_mb"]), 0.1), width, color=colors[mode], hatch=hatch)
                else:
                    for ax in (ax_time, ax_mem):
                        ax.annotate(row["status"], (x, 0), xycoords=("data", "axes fraction"), xytext=(0, 3),
                                    textcoords="offset points", rotation=90, fontsize=7, ha="center", color=colors[mode])  # fmt: skip
        ticks = [f"{m} {z} px\n{d}" + (f", batch {b}" if b > 1 else "") for _, _, m, z, b, d in configs[scope]]
        for ax in (ax_time, ax_mem):
            ax.set_xlim(-0.5, widest - 0.5)
            ax.set_xticks(range(len(ticks)), ticks, fontsize=8)
            ax.grid(True, axis="y", which="major", alpha=0.3)
        ax_time.set(yscale="log", ylabel="s per call", title=f"{scope}: time (wall clock, best of repeats)"
                    + (", hatched: flex forced onto the CPU with --cpu-flex" if forced else ""))  # fmt: skip
        ax_mem.set(yscale="log", ylabel="extra peak MiB", title=f"{scope}: memory, peak over what was in use before the call")
    for mode in modes:
        axes[0, 0].bar(0, 0, 0, color=colors[mode], label=mode)
    fig.legend(*axes[0, 0].get_legend_handles_labels(), fontsize=9, ncol=len(modes), loc="upper center", bbox_to_anchor=(0.5, 0.952))
    threads = ", ".join(sorted({str(r.get("threads")) for r in rows if r.get("threads")}))
    fig.suptitle(f"SAM attention backends: stock, stock + SDPA with the full bias, sam_blocked backends\n{label}; "
                 f"torch threads: {threads or '?'}; layer: one global Attention, window: one windowed Attention over "
                 "all windows, encoder: the whole image encoder", fontsize=10)  # fmt: skip
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- the README table ------------------------------------------------------------------------


def markdown_table(rows: list[dict]) -> str:
    """A Markdown table, a row per configuration and a column per mode: CPU seconds of the
    least costly call / extra peak MiB, "OOM" or "refused", empty where not measured; auto's
    cell names its choice, and flex run with --cpu-flex says so."""
    configs = sorted({_key(r)[:-1] for r in rows}, key=lambda c: (c[0], SCOPES.index(c[1]), *c[2:]))  # _key less the mode
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    by_key = {_key(r): r for r in rows}
    lines = ["| scope | model | size | batch | dtype | " + " | ".join(modes) + " |", "|---" * (5 + len(modes)) + "|"]
    for config in configs:
        cells = []
        for mode in modes:
            row = by_key.get((*config, mode))
            if row is None:
                cells.append("")
            elif row["status"] != "ok":
                cells.append(row["status"])
            else:
                seconds = float(row["cpu_s"] or row["seconds"])
                cell = f"{seconds:.2f}" if seconds >= 0.1 else f"{seconds:.3g}"  # 3 digits below 0.1 s too
                cell += f" / {float(row['peak_extra_mb']):.0f}"
                if mode == "auto":
                    cell += f" ({row['backend_used']})"
                elif "forced" in (row.get("backend_used") or ""):
                    cell += " (forced, --cpu-flex)"
                cells.append(cell)
        _, scope, model, size, batch, dtype = config
        lines.append(f"| {scope} | {model} | {size} | {batch} | {dtype} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --- command line ------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scopes", nargs="+", default=None, choices=SCOPES, help=f"default {SCOPES}")
    parser.add_argument("--models", nargs="+", default=None, choices=["vit_b", "vit_l", "vit_h"], help=f"default {MODELS}")
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help=f"input sizes in px, multiples of 16 (default {SIZES})")
    parser.add_argument("--dtypes", nargs="+", default=None, choices=["float32", "bfloat16", "float16"], help=f"default {DTYPES}")
    parser.add_argument("--modes", nargs="+", default=None, choices=MODES, help=f"default {MODES}")
    parser.add_argument("--quick", action="store_true", help="smoke run: one vit_b global layer at 1024 px in float32, every mode")
    parser.add_argument("--batch", type=int, default=1, help="images per encoder call, inputs per layer call (default 1)")
    parser.add_argument("--repeat", type=int, default=None, help="timed calls after the warm-up; the fastest is recorded (default 3, --quick 2)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    parser.add_argument("--mem-cap-gb", type=float, default=None, help="private-memory cap per child on the CPU (default: 20, or 85%% of RAM)")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per configuration (default %(default)s)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice, one per core)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS, help="where the CSV and PNG go (default benchmarks/results)")
    parser.add_argument("--machine", default=None, help="name in the file names (default: from the CPU or GPU model)")
    parser.add_argument("--fresh", action="store_true", help="drop earlier rows of the same CSV instead of keeping them")
    parser.add_argument("--table", action="store_true", help="print the CSV of --machine (or this machine) as a Markdown table and exit")
    parser.add_argument("--cpu-flex", action="store_true",
                        help="run mode flex on the CPU although the backend refuses it there (re-checks its reason; "
                             "compiles for a minute per shape)")  # fmt: skip
    # One configuration, as the sweep runs it in a subprocess.
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    for name in ("--scope", "--model", "--dtype", "--mode"):
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
        return print_table(parser, args, "backends", markdown_table)
    args.scopes = args.scopes or (["layer"] if args.quick else SCOPES)
    args.models = args.models or (["vit_b"] if args.quick else MODELS)
    args.sizes = args.sizes or ([1024] if args.quick else SIZES)
    args.dtypes = args.dtypes or (["float32"] if args.quick else DTYPES)
    args.modes = args.modes or MODES
    args.repeat = args.repeat or (2 if args.quick else 3)
    check_sweep_args(parser, args.sizes, args.device)
    if args.mem_cap_gb <= 0 or args.timeout <= 0 or args.repeat < 1 or args.batch < 1:
        parser.error("--mem-cap-gb and --timeout must be > 0, --repeat and --batch >= 1")
    sweep(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
