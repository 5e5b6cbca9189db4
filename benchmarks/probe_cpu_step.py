"""Issue 23's first try in the work's shape: larger CPU steps when torch has several threads.

On the CPU every step of the patched encoder (an attention band or group of windows, a
chunk of tokens) is kept within sam_blocked.attention.common.CPU_STEP_BYTES (8 MiB). Beside a
busy process each parallel operator waits at its end for the thread that shares a core with
it, so fewer, larger operators should lose less. This probe sets CPU_STEP_BYTES in a fresh
child (vit_b's encoder, seeded random weights, 1024 px, patched with `auto`), runs one
warm-up and two timed calls under torch.inference_mode beside BUSY spinning Python processes,
and records the best of the two, as bench_contention.py does. Step 0 is the code's default;
mode stock ignores the step.

Writes benchmarks/results/cpu_step_<machine>.csv (appending) and a PNG next to it.

    python benchmarks/probe_cpu_step.py --steps 8 32 128 --busy 1 0
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine_info, machine_label, machine_slug, print_result, read_rows, run_in_child, write_rows  # noqa: E402

FIELDS = ["machine", "model", "img_size", "mode", "step_mib", "threads", "busy", "first_s", "second_s", "third_s", "best_s", "load_avg"]
SPIN = "import time\nend = time.monotonic() + {seconds}\nn = 0\nwhile time.monotonic() < end:\n    n += 1\n"


def child(step_mib: int, threads: int, mode: str) -> dict:
    import torch

    torch.set_num_threads(threads)
    import sam_blocked.attention.bands as bands
    import sam_blocked.attention.common as common

    if step_mib:
        common.CPU_STEP_BYTES = bands.CPU_STEP_BYTES = step_mib * 2**20  # bands.py reads its own import of the name
    from sam_blocked import build_sam, patch_sam

    sam = build_sam("vit_b", img_size=1024, seed=0)
    encoder = patch_sam(sam.image_encoder) if mode == "patched" else sam.image_encoder
    x = torch.randn(1, 3, 1024, 1024)
    times = []
    with torch.inference_mode():
        for _ in range(3):
            start = time.perf_counter()
            encoder(x)
            times.append(time.perf_counter() - start)
    return {"first_s": f"{times[0]:.2f}", "second_s": f"{times[1]:.2f}", "third_s": f"{times[2]:.2f}", "best_s": f"{min(times[1:]):.2f}"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, nargs="+", default=[0, 32, 128], help="CPU_STEP_BYTES in MiB (0: the code's default)")
    parser.add_argument("--busy", type=int, nargs="+", default=[1, 0], help="busy processes beside the child")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--stock", action="store_true", help="also stock once per busy count")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print_result(child(int(args.child[0]), int(args.child[1]), args.child[2]))
        return 0
    import os

    info = machine_info("cpu")
    out = RESULTS / f"cpu_step_{machine_slug(info)}.csv"
    rows = read_rows(out)
    variants = [(busy, "patched", step) for busy in args.busy for step in args.steps] + ([(busy, "stock", 0) for busy in args.busy] if args.stock else [])
    for busy, mode, step in variants:
        spinners = [subprocess.Popen([sys.executable, "-c", SPIN.format(seconds=args.timeout)]) for _ in range(busy)]
        try:
            result = run_in_child(__file__, [str(step), str(args.threads), mode], args.timeout)
        finally:
            for s in spinners:
                s.kill()
        row = {"machine": machine_label(info), "model": "vit_b", "img_size": 1024, "mode": mode, "step_mib": step or 8, "threads": args.threads, "busy": busy,
               "load_avg": f"{os.getloadavg()[0]:.2f}", **result}  # fmt: skip
        print(row, flush=True)
        rows.append(row)
        write_rows(out, rows, FIELDS)
    plot(rows, out.with_suffix(".png"), machine_label(info))
    print(f"wrote {out}")
    return 0


def plot(rows: list[dict], path: Path, machine: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    labels = [f"{r['mode']} {r['step_mib']} MiB\n{r['busy']} busy" for r in rows]
    ax.bar(range(len(rows)), [float(r["best_s"]) if r.get("best_s") else 0 for r in rows], color=["tab:blue" if r["mode"] == "patched" else "tab:gray" for r in rows])
    ax.set_xticks(range(len(rows)), labels, fontsize=6)
    ax.set_ylabel("vit_b encoder at 1024 px, best of 2 calls, s")
    ax.set_title(f"CPU step size beside busy processes, {rows[0]['threads'] if rows else 2} threads — {machine}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
