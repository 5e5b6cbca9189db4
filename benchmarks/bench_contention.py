"""Stock vs patched image encoder on a busy machine: 1 and 2 torch threads, quiet and beside busy processes.

Issue 23: on 2 cores, with another process using one of them, the patched encoder was
reported 4-6x slower with two threads than with one. This sweep measures it: for each
variant (mode x torch threads x busy processes beside it), a fresh child process builds the
encoder (seeded random weights, sam_blocked.build_sam), patches it (mode "patched":
patch_sam(encoder), `auto` backend, default chunks), and under torch.inference_mode runs one
warm-up call and two timed calls; the variant's time is the best of the two (the issue's bar).
A busy process is a Python subprocess spinning a pure-Python loop, started before the child,
bounded in time, and killed when the child is done.

The sweep runs in rounds (every variant once per round, in the same order), so a variant's
--repeat measurements are spread over the run; each row is written as soon as it is measured,
and --max-minutes stops starting new rounds after that long. The summary (and --table) gives
each variant's median and range (min-max) over its repeats, and the patched/stock ratio of
the medians.

Writes benchmarks/results/contention_<machine>.csv (rows of earlier runs kept unless
re-measured, or --fresh) and a PNG next to it.

    python benchmarks/bench_contention.py                       # vit_b 1024 px, threads 1 2, busy 0 1 2
    python benchmarks/bench_contention.py --repeat 3 --max-minutes 20
    python benchmarks/bench_contention.py --threads 2 --busy 1 --repeat 2 --first-round 2  # two more rounds of one pair
    python benchmarks/bench_contention.py --modes patched --threads 2 --busy 1 --wait-policy passive
    python benchmarks/bench_contention.py --table               # the CSV's medians as a Markdown table
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py, also when imported from elsewhere
from common import RESULTS, SweepCSV, print_result, print_table, read_rows, run_in_child, start_busy, stop_busy, sweep_csv_path  # noqa: E402

MODES = ["stock", "patched"]
WAIT_POLICIES = ["default", "passive", "active"]  # OMP_WAIT_POLICY in the child: unset, PASSIVE, ACTIVE
FIELDS = ["machine", "model", "img_size", "mode", "threads", "busy", "wait_policy", "round", "status", "seconds",
          "first_s", "second_s", "third_s", "cpu_s", "omp", "load_avg", "note"]  # fmt: skip


def variant(row: dict) -> tuple:
    return (row["model"], int(row["img_size"]), row["wait_policy"], int(row["threads"]), int(row["busy"]), row["mode"])


def key(row: dict) -> tuple:
    return (*variant(row), int(row["round"]))


def order(row: dict) -> tuple:
    model, size, policy, threads, busy, mode = variant(row)
    return (model, size, WAIT_POLICIES.index(policy), threads, busy, MODES.index(mode), int(row["round"]))


# --- one variant, in the child -----------------------------------------------------------


def run_child(config: dict) -> dict:
    """Build, patch, warm up once, time two calls; the best of the two counts."""
    import torch

    from sam_blocked import build_sam, patch_sam

    torch.set_num_threads(config["threads"])
    encoder = build_sam(config["model"], img_size=config["img_size"], seed=0).image_encoder.eval()
    if config["mode"] == "patched":
        patch_sam(encoder)
    x = torch.randn(1, 3, config["img_size"], config["img_size"], generator=torch.Generator().manual_seed(0))
    wall, cpu = [], []
    with torch.inference_mode():
        for _ in range(3):  # the first is the warm-up
            start, start_cpu = time.perf_counter(), time.process_time()
            encoder(x)
            wall.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
    omp = next((line.strip() for line in torch.__config__.parallel_info().splitlines() if line.startswith("OpenMP")), "")
    return {
        "status": "ok",
        "seconds": round(min(wall[1:]), 3),
        "first_s": round(wall[0], 3),
        "second_s": round(wall[1], 3),
        "third_s": round(wall[2], 3),
        "cpu_s": round(min(cpu[1:]), 3),
        "threads": torch.get_num_threads(),
        "omp": omp,
        "load_avg": round(os.getloadavg()[0], 2),
    }


# --- the sweep, in the parent ------------------------------------------------------------


def measure(config: dict, timeout: float) -> dict:
    """One variant in a fresh child, beside config["busy"] busy processes (killed after, whatever happens)."""
    env_policy = {"default": None, "passive": "PASSIVE", "active": "ACTIVE"}[config["wait_policy"]]
    saved = os.environ.get("OMP_WAIT_POLICY")
    busy = []
    try:
        if env_policy:
            os.environ["OMP_WAIT_POLICY"] = env_policy  # the child inherits it; torch reads it at start
        else:
            os.environ.pop("OMP_WAIT_POLICY", None)
        busy = start_busy(config["busy"], timeout + 60)
        return run_in_child(__file__, [json.dumps(config)], timeout)
    finally:
        stop_busy(busy)
        if saved is None:
            os.environ.pop("OMP_WAIT_POLICY", None)
        else:
            os.environ["OMP_WAIT_POLICY"] = saved


def summarize(rows: list[dict]) -> list[dict]:
    """Per variant: repeats, median, min and max of `seconds` over the rows with status ok."""
    groups: dict[tuple, list[float]] = {}
    for row in rows:
        if row.get("status") == "ok":
            groups.setdefault(variant(row), []).append(float(row["seconds"]))
    out = []
    for (model, size, policy, threads, busy, mode), times in groups.items():
        out.append({"model": model, "img_size": size, "wait_policy": policy, "threads": threads, "busy": busy, "mode": mode,
                    "n": len(times), "median": statistics.median(times), "min": min(times), "max": max(times)})  # fmt: skip
    medians = {(s["model"], s["img_size"], s["wait_policy"], s["threads"], s["busy"], s["mode"]): s["median"] for s in out}
    for s in out:
        stock = medians.get((s["model"], s["img_size"], s["wait_policy"], s["threads"], s["busy"], "stock"))
        s["vs_stock"] = s["median"] / stock if stock and s["mode"] != "stock" else None
    return sorted(out, key=lambda s: (s["model"], s["img_size"], WAIT_POLICIES.index(s["wait_policy"]), s["threads"], s["busy"], MODES.index(s["mode"])))


def busy_label(busy: int) -> str:
    return "quiet" if busy == 0 else f"{busy} busy"


def markdown_table(rows: list[dict]) -> str:
    lines = ["| model | px | OMP_WAIT_POLICY | threads | load | mode | runs | median s | range s | x stock |", "|---|---|---|---|---|---|---|---|---|---|"]
    for s in summarize(rows):
        ratio = f"{s['vs_stock']:.2f}x" if s["vs_stock"] else ""
        lines.append(f"| {s['model']} | {s['img_size']} | {s['wait_policy']} | {s['threads']} | {busy_label(s['busy'])} | {s['mode']} | "
                     f"{s['n']} | {s['median']:.2f} | {s['min']:.2f}-{s['max']:.2f} | {ratio} |")  # fmt: skip
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, machine: str) -> None:
    """Median time per variant with its range as an error bar, stock and patched side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarize(rows)
    groups = sorted({(s["wait_policy"], s["threads"], s["busy"]) for s in summary}, key=lambda g: (WAIT_POLICIES.index(g[0]), g[1], g[2]))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(groups) + 2), 4.8))
    width = 0.38
    colors = {"stock": "tab:red", "patched": "tab:blue"}
    for offset, mode in zip((-width / 2, width / 2), MODES):
        for i, group in enumerate(groups):
            s = next((s for s in summary if (s["wait_policy"], s["threads"], s["busy"]) == group and s["mode"] == mode), None)
            if s is None:
                continue
            err = [[s["median"] - s["min"]], [s["max"] - s["median"]]]
            labelled = mode in ax.get_legend_handles_labels()[1]
            ax.bar(i + offset, s["median"], width, color=colors[mode], yerr=err, capsize=3, label=None if labelled else mode)
            points = [float(r["seconds"]) for r in rows if r.get("status") == "ok" and variant(r)[2:] == (*group, mode)]
            ax.plot([i + offset] * len(points), points, "k.", markersize=4)
            text = f"{s['median']:.1f}" + (f"\n{s['vs_stock']:.2f}x" if s["vs_stock"] else "")
            ax.text(i + offset, s["max"], text, ha="center", va="bottom", fontsize=7)
    labels = [f"{t} thread{'s' if t > 1 else ''}\n{busy_label(b)}" + (f"\nOMP {p}" if p != "default" else "") for p, t, b in groups]
    ax.set_xticks(range(len(groups)), labels, fontsize=8)
    ax.set_ylabel("encoder time, best of 2 after a warm-up (s)")
    ax.set_ylim(0, ax.get_ylim()[1] * 1.12)
    ax.legend(fontsize=8)
    first = summary[0] if summary else {"model": "?", "img_size": "?"}
    n = sorted({s["n"] for s in summary})
    ax.set_title(f"{first['model']} image encoder, {first['img_size']} px: stock vs patched (auto, defaults) beside busy processes\n"
                 f"bars: median of {'/'.join(map(str, n))} fresh processes, whiskers: range, dots: each run\n{machine}", fontsize=8)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-type", default="vit_b", help="sam_model_registry name, or tiny (default %(default)s)")
    parser.add_argument("--img-size", type=int, default=1024, help="input size, a multiple of 16 (default %(default)s)")
    parser.add_argument("--modes", nargs="+", default=MODES, choices=MODES)
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2], help="torch threads (default 1 2)")
    parser.add_argument("--busy", nargs="+", type=int, default=[0, 1, 2], help="busy processes beside the child (default 0 1 2)")
    parser.add_argument("--wait-policy", default="default", choices=WAIT_POLICIES, help="OMP_WAIT_POLICY in the child: unset, PASSIVE or ACTIVE")
    parser.add_argument("--repeat", type=int, default=3, help="rounds: fresh processes per variant (default %(default)s)")
    parser.add_argument("--first-round", type=int, default=1, help="number of the first round (more rounds beside an earlier run's)")
    parser.add_argument("--max-minutes", type=float, default=0, help="start no new round after this many minutes (0: no limit)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per child (default %(default)s)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument("--machine", help="name for the files instead of this machine's (tests)")
    parser.add_argument("--fresh", action="store_true", help="drop the rows of earlier runs in the CSV")
    parser.add_argument("--table", action="store_true", help="print the CSV's medians as a Markdown table")
    parser.add_argument("--replot", action="store_true", help="only redraw the PNG from the CSV")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.device = "cpu"
    if args.child:
        print_result(run_child(json.loads(args.child)))
        return 0
    if args.img_size <= 0 or args.img_size % 16:
        parser.error(f"--img-size {args.img_size}: must be a positive multiple of 16")
    if args.table:
        return print_table(parser, args, "contention", markdown_table)
    if args.replot:
        path = sweep_csv_path(args, "contention")
        rows = read_rows(path)
        if not rows:
            parser.error(f"--replot: no results at {path}")
        plot(rows, path.with_suffix(".png"), rows[0]["machine"])
        return 0

    args.mem_cap_gb = 0  # no cap here: SweepCSV.open prints it
    sweep = SweepCSV.open(args, "contention", key, FIELDS, order)
    start = time.monotonic()
    for round_ in range(args.first_round, args.first_round + args.repeat):
        if args.max_minutes and time.monotonic() - start > 60 * args.max_minutes:
            print(f"--max-minutes {args.max_minutes:g}: stopping before round {round_}")
            break
        for threads in args.threads:
            for busy in args.busy:
                for mode in args.modes:
                    config = {"model": args.model_type, "img_size": args.img_size, "mode": mode, "threads": threads, "busy": busy,
                              "wait_policy": args.wait_policy}  # fmt: skip
                    row = {**config, "round": round_, "machine": sweep.label, **measure(config, args.timeout)}
                    sweep.add(row)
                    print(f"round {round_}  {threads} thread(s)  {busy_label(busy):7} {mode:8} {row['status']:7} "
                          f"best {row.get('seconds', '')!s:>8} s  (calls {row.get('first_s', '')}, {row.get('second_s', '')}, "
                          f"{row.get('third_s', '')})  {row.get('note', '')}", flush=True)  # fmt: skip
    sweep.finish(plot)
    print(markdown_table(list(sweep.rows.values())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
