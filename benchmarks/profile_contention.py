"""What one encoder call is made of: the operators doing work (each one parallel region at most) and their sizes.

Issue 23 asks why the patched encoder slows down beside a busy process: the guess is many
small parallel regions, each ending in a barrier that waits for the thread sharing its core.
This script counts, with torch.profiler, the aten operators of one encoder call (after a
warm-up) that spend 10 us or more in themselves (each runs a kernel: one parallel region at
most, OpenMP's or MKL's/oneDNN's), and sorts them by that self time, stock and patched (`auto`, defaults), in this process.

    python benchmarks/profile_contention.py                      # vit_b 1024 px, 2 threads
    python benchmarks/profile_contention.py --threads 1 --top 12

torch's profiler sees the calling thread only: since the patched steps are shared out among
threads (sam_blocked/attention/threads.py, 2026-12-05), the profiled call runs them in this
thread (steps_on_threads(1)), each operator on torch's threads as before the change.

It prints one line per mode (such ops, how many last under 0.1 ms / 0.1-1 ms / 1-10 ms / over
10 ms and the time in each class) and the top operators by self time; --json writes the same.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time

BINS = [(0, 1e2), (1e2, 1e3), (1e3, 1e4), (1e4, float("inf"))]  # microseconds
BIN_NAMES = ["<0.1ms", "0.1-1ms", "1-10ms", ">10ms"]
MIN_SELF_US = 10


def profile(mode: str, model: str, img_size: int, top: int) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile as torch_profile

    from sam_blocked import build_sam, patch_sam, unpatch_sam
    from sam_blocked.attention.threads import steps_on_threads

    encoder = build_sam(model, img_size=img_size, seed=0).image_encoder.eval()
    unpatch_sam(encoder)
    if mode == "patched":
        patch_sam(encoder)
    x = torch.randn(1, 3, img_size, img_size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        encoder(x)  # warm-up
        start = time.perf_counter()
        with steps_on_threads(1), torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            encoder(x)
        wall = time.perf_counter() - start
    # an operator doing work of its own (self time over 10 us: not a view, an empty, a dispatch wrapper)
    leaves = [e for e in prof.events() if e.name.startswith("aten::") and e.self_cpu_time_total >= MIN_SELF_US]
    counts, times = [0] * len(BINS), [0.0] * len(BINS)
    by_name: dict[str, list[float]] = collections.defaultdict(list)
    for e in leaves:
        us = e.self_cpu_time_total
        i = next(i for i, (lo, hi) in enumerate(BINS) if lo <= us < hi)
        counts[i] += 1
        times[i] += us / 1e6
        by_name[e.name].append(us)
    names = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:top]
    return {
        "mode": mode,
        "threads": torch.get_num_threads(),
        "wall_s": round(wall, 2),
        "work_ops": len(leaves),
        "work_s": round(sum(times), 2),
        "count_by_duration": dict(zip(BIN_NAMES, counts)),
        "seconds_by_duration": {k: round(v, 2) for k, v in zip(BIN_NAMES, times)},
        "top_ops": [{"name": n, "count": len(t), "total_s": round(sum(t) / 1e6, 3), "median_ms": round(sorted(t)[len(t) // 2] / 1e3, 3)} for n, t in names],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-type", default="vit_b")
    parser.add_argument("--img-size", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--modes", nargs="+", default=["stock", "patched"], choices=["stock", "patched"])
    parser.add_argument("--top", type=int, default=8, help="operators listed per mode, by their self time")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    results = [profile(mode, args.model_type, args.img_size, args.top) for mode in args.modes]
    for r in results:
        print(f"{r['mode']:8} {r['threads']} threads  wall {r['wall_s']} s (profiled)  ops doing work {r['work_ops']}  in them {r['work_s']} s")
        print("   count by duration: " + "  ".join(f"{k} {v}" for k, v in r["count_by_duration"].items()))
        print("   seconds by duration: " + "  ".join(f"{k} {v}" for k, v in r["seconds_by_duration"].items()))
        for op in r["top_ops"]:
            print(f"   {op['name']:32} x{op['count']:6}  {op['total_s']:8.3f} s  median {op['median_ms']} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
