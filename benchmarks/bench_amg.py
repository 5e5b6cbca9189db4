"""Automatic masks ("segment everything"): stock SamAutomaticMaskGenerator vs sam_blocked's.

For each image size and points-per-side, on one seeded SAM (sam_blocked.build_sam, random
weights: no mask quality is claimed) and a mosaic of scikit-image photographs: the patched
encoder runs once and its embedding is installed in both generators, so the rows time mask
generation after the encoder (the decoder and SAM's post-processing) on the same embedding:

- stock: SamAutomaticMaskGenerator as segment_anything ships it;
- blocked: sam_blocked.automatic.BlockedMaskGenerator (the switch installs the same steps).

Each row has both times split into the mask decoder and the post-processing after it
(DecoderClock), the encoder's time, the extra peak of CPU tensors (the allocator's
view, sam_blocked.memory.measure.tensor_peak_bytes) of the encoder and of each generator, and
whether the records are the same (tests/automatic_oracle.py's rule, without stock's logits:
pixel flips counted, not located). `--stock-batches N` times stock on its first N point
batches only and scales to all of them (the row says so); memory is measured on those too.
`--stock-points-per-batch N` runs stock with smaller batches where 64 would not fit in RAM
(the row says so; its peak is then per N points, and stock's masks are the same).

    python benchmarks/bench_amg.py                                     # 1024 px, 16 points per side, both filter sets
    python benchmarks/bench_amg.py --sizes 512 1024 --points 16 32 --filters zero
    python benchmarks/bench_amg.py --stock-batches 2                   # stock timed on 2 batches
    python benchmarks/bench_amg.py --device cuda --out-dir DIR --machine h200   # the GPU check's call
    python benchmarks/bench_amg.py --quick                             # tiny model, 512 px, 4 x 4 points (a smoke run)
    python benchmarks/bench_amg.py --busy 1 --threads 2 --stock-batches 2   # beside a busy process (issue 23): amg_busy_<machine>.csv

On CUDA the peaks are the allocator's (max_memory_allocated over what was allocated before).
"""

from __future__ import annotations

import argparse
import math
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, gemm_rate, machine_info, machine_label, machine_slug, print_result, read_rows, start_busy, stop_busy, write_rows  # noqa: E402

FIELDS = ["machine", "device", "model", "input_px", "img_size", "points_per_side", "filters", "encoder_s", "stock_s", "blocked_s", "speedup",
          "stock_decoder_s", "stock_post_s", "blocked_decoder_s", "blocked_post_s",
          "stock_points_per_batch", "stock_batches_timed", "batches", "encoder_peak_mib", "stock_peak_mib", "blocked_peak_mib", "peak_vs_encoder",
          "records", "same_records", "flipped_pixels", "gemm_gflops", "floor_s", "blocked_vs_floor", "threads", "busy"]  # fmt: skip
FILTERS = {"default": dict(pred_iou_thresh=0.88, stability_score_thresh=0.95), "zero": dict(pred_iou_thresh=0.0, stability_score_thresh=0.0)}


def mosaic(size: int) -> np.ndarray:
    from skimage import data
    from skimage.transform import resize

    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    half = size // 2
    tiles = [(resize(p, (half, half), anti_aliasing=True) * 255).astype(np.uint8) for p in photos]
    return np.concatenate([np.concatenate(tiles[:2], axis=1), np.concatenate(tiles[2:], axis=1)], axis=0)


def install(generator, embedding: torch.Tensor, size: tuple[int, int], input_size: tuple[int, int]) -> None:
    """The generator's predictor takes the kept embedding instead of encoding again."""
    predictor = generator.predictor

    def set_image(image, image_format="RGB"):
        predictor.reset_image()
        predictor.features = embedding
        predictor.original_size, predictor.input_size = size, input_size
        predictor.is_image_set = True

    predictor.set_image = set_image


def decoder_flops(points: int, tokens: int) -> float:
    """FLOPs of the blocked decoder per run (3 masks a point): reassociated cross attentions
    (7 products of (H*T=56) x tokens x 256, counted 2 per multiply-add) and the upscaling GEMMs."""
    attention = 7 * 2 * 56 * tokens * 256
    upscale = 2 * tokens * 256 * 256 + 2 * 4 * tokens * 64 * 128 + 2 * 16 * tokens * 32 * 4
    return points * (attention + upscale)


class DecoderClock:
    """Seconds spent in the mask decoder during a generate() call: stock's MaskDecoder module
    (forward hooks) and sam_blocked.automatic's predict_masks (wrapped where batch.py calls it).
    The rest of mask generation after the encoder is the post-processing (prompt encoding,
    upsampling, filters, boxes, RLE, NMS). Where chunks of points run on several threads at
    once (attention.threads), the decoder's time is the wall time some thread spent in it
    (the union of the calls' intervals)."""

    def __init__(self, sam, device: str):
        self.sam, self.device, self.intervals, self._local = sam, device, [], threading.local()

    @property
    def seconds(self) -> float:
        total, end = 0.0, float("-inf")
        for a, b in sorted(self.intervals):
            if b > end:
                total += b - max(a, end)
                end = b
        return total

    def _sync(self):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)

    def __enter__(self):
        from sam_blocked.automatic import batch

        def pre(*_):
            self._sync()
            self._local.start = time.perf_counter()

        def post(*_):
            self._sync()
            self.intervals.append((self._local.start, time.perf_counter()))

        self._hooks = [self.sam.mask_decoder.register_forward_pre_hook(pre), self.sam.mask_decoder.register_forward_hook(post)]
        self._batch, self._predict = batch, batch.predict_masks

        def timed_predict(*args, **kwargs):
            pre()
            result = self._predict(*args, **kwargs)
            post()
            return result

        batch.predict_masks = timed_predict
        return self

    def __exit__(self, *exc):
        for hook in self._hooks:
            hook.remove()
        self._batch.predict_masks = self._predict


def tensor_peak(device: str, fn) -> tuple[object, int]:
    """(fn(), the peak bytes of tensors alive during it over those before): the profiler's view
    on the CPU, the allocator's on CUDA."""
    from sam_blocked.memory.measure import tensor_peak_bytes

    if not device.startswith("cuda"):
        return tensor_peak_bytes(fn)
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = fn()
    torch.cuda.synchronize(device)
    return result, max(0, torch.cuda.max_memory_allocated(device) - before)


def timed(device: str, fn) -> tuple[object, float]:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
    return result, time.perf_counter() - start


def run(args, size: int, points: int, filters: str, info: dict) -> dict:
    from segment_anything import SamAutomaticMaskGenerator

    from sam_blocked import build_sam, patch_sam
    from sam_blocked import stock as stock_layers
    from segment_anything import SamPredictor

    from sam_blocked.automatic import BlockedMaskGenerator
    from sam_blocked.memory.flops import encoder_flops

    device = args.device
    torch.manual_seed(0)
    sam = patch_sam(build_sam(args.model_type, img_size=args.img_size, seed=0).to(device))
    image = mosaic(size)
    predictor = SamPredictor(sam)
    with torch.inference_mode():
        predictor.set_image(image)  # warm-up
        _, encoder_s = timed(device, lambda: predictor.set_image(image))
        _, encoder_peak = tensor_peak(device, lambda: predictor.set_image(image))
    embedding, input_size = predictor.features, predictor.input_size
    settings = dict(points_per_side=points, points_per_batch=64, output_mode="uncompressed_rle", **FILTERS[filters])
    stock_ppb = args.stock_points_per_batch
    batches = math.ceil(points * points / stock_ppb)  # stock's
    stock_batches = min(batches, args.stock_batches or batches)

    def generate(cls, limit=None):
        ppb = stock_ppb if cls is SamAutomaticMaskGenerator else 64
        generator = cls(sam, **{**settings, "points_per_batch": ppb})
        install(generator, embedding, image.shape[:2], input_size)
        if limit is not None and limit < batches:  # stock's first `limit` batches' points
            generator.point_grids = [generator.point_grids[0][: stock_ppb * limit]]
        if cls is SamAutomaticMaskGenerator:  # stock's decoder too: patch_sam also patched the MaskDecoder
            with stock_layers(sam):
                return generator.generate(image)
        return generator.generate(image)

    with torch.inference_mode():
        with DecoderClock(sam, device) as stock_clock:
            stock, stock_s = timed(device, lambda: generate(SamAutomaticMaskGenerator, stock_batches))
        stock_s *= batches / stock_batches
        stock_decoder_s = stock_clock.seconds * batches / stock_batches
        with DecoderClock(sam, device) as blocked_clock:
            blocked, blocked_s = timed(device, lambda: generate(BlockedMaskGenerator))
        _, stock_peak = tensor_peak(device, lambda: generate(SamAutomaticMaskGenerator, 1))
        blocked_same, blocked_peak = tensor_peak(device, lambda: generate(BlockedMaskGenerator, stock_batches))
    same, flipped = compare(stock, blocked if stock_batches == batches else blocked_same)
    rate = gemm_rate(device=device)
    tokens = (sam.image_encoder.img_size // 16) ** 2
    floor = (encoder_flops(args.model_type, sam.image_encoder.img_size) + decoder_flops(points * points, tokens)) / rate
    row = {
        "machine": machine_label(info), "device": device, "model": args.model_type, "input_px": sam.image_encoder.img_size, "img_size": size, "points_per_side": points, "filters": filters,
        "encoder_s": f"{encoder_s:.2f}", "stock_s": f"{stock_s:.2f}", "blocked_s": f"{blocked_s:.2f}", "speedup": f"{stock_s / blocked_s:.2f}",
        "stock_decoder_s": f"{stock_decoder_s:.2f}", "stock_post_s": f"{stock_s - stock_decoder_s:.2f}",
        "blocked_decoder_s": f"{blocked_clock.seconds:.2f}", "blocked_post_s": f"{blocked_s - blocked_clock.seconds:.2f}",
        "stock_points_per_batch": stock_ppb, "stock_batches_timed": stock_batches, "batches": batches,
        "encoder_peak_mib": f"{encoder_peak / 2**20:.0f}", "stock_peak_mib": f"{stock_peak / 2**20:.0f}", "blocked_peak_mib": f"{blocked_peak / 2**20:.0f}",
        "peak_vs_encoder": f"{blocked_peak / encoder_peak:.2f}", "records": len(stock), "same_records": same, "flipped_pixels": flipped,
        "gemm_gflops": f"{rate / 1e9:.0f}", "floor_s": f"{floor:.2f}", "blocked_vs_floor": f"{(encoder_s + blocked_s) / floor:.2f}",
    }  # fmt: skip
    return row


def compare(stock: list[dict], blocked: list[dict]) -> tuple[bool, int]:
    """Records matched by point and score (rel 1e-5, abs 1e-5: the IoU head's order-one scale); pixels that differ counted."""
    from segment_anything.utils.amg import rle_to_mask

    if len(stock) != len(blocked):
        return False, -1
    flipped = 0
    key = lambda r: (tuple(r["point_coords"][0]), round(r["predicted_iou"], 4))  # noqa: E731
    for s, b in zip(sorted(stock, key=key), sorted(blocked, key=key)):
        if s["point_coords"] != b["point_coords"] or not math.isclose(s["predicted_iou"], b["predicted_iou"], rel_tol=1e-5, abs_tol=1e-5):
            return False, -1
        flipped += int(np.count_nonzero(rle_to_mask(s["segmentation"]) != rle_to_mask(b["segmentation"])))
    return True, flipped


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024])
    parser.add_argument("--points", type=int, nargs="+", default=[16])
    parser.add_argument("--filters", nargs="+", choices=list(FILTERS), default=list(FILTERS))
    parser.add_argument("--model-type", default="vit_b")
    parser.add_argument("--img-size", type=int, default=1024, help="the model's input size (SAM's: 1024)")
    parser.add_argument("--stock-batches", type=int, default=None, help="time stock on this many point batches and scale (default: all)")
    parser.add_argument("--stock-points-per-batch", type=int, default=64,
                        help="stock's points_per_batch (default: SAM's 64, as sam_blocked's). Its masks do not depend on it; "
                             "fewer let stock fit in RAM at 4096 px (a batch of 64 upsamples 192 float masks to the image: ~13 GB)")  # fmt: skip
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None, help="the CSV (default: benchmarks/results/amg_<machine>.csv)")
    parser.add_argument("--out-dir", type=Path, default=None, help="write amg_<machine>.csv here instead")
    parser.add_argument("--machine", default=None, help="the machine's name in the file name (default: from the CPU or GPU)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: tiny model at 256 px, a 512 px image, 4 x 4 points, filters at 0")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--busy", type=int, default=0,
                        help="busy processes (each spinning a Python loop) beside the measurement (issue 23); rows go to amg_busy_<machine>.csv")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.points, args.filters, args.model_type, args.img_size, args.stock_batches = [512], [4], ["zero"], "tiny", 256, 1
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    info = machine_info(args.device)
    name = f"amg{'_busy' if args.busy else ''}_{args.machine or machine_slug(info)}.csv"
    out = args.out or (args.out_dir / name if args.out_dir else RESULTS / name)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = read_rows(out) if out.exists() else []

    def row_key(r: dict) -> tuple:
        busy = int(r.get("busy") or 0)  # quiet rows (and those from before the column) by their settings alone
        return (r["device"], r["model"], int(r["input_px"]), int(r["img_size"]), int(r["points_per_side"]), r["filters"], busy, int(r.get("threads") or 0) if busy else 0)

    for size in args.sizes:
        for points in args.points:
            for filters in args.filters:
                busy = start_busy(args.busy, 3600)
                try:
                    row = run(args, size, points, filters, info)
                finally:
                    stop_busy(busy)
                row.update(threads=torch.get_num_threads(), busy=args.busy)
                print_result(row)
                rows = [r for r in rows if row_key(r) != row_key(row)] + [row]
                write_rows(out, rows, FIELDS, order=row_key)
    plot(rows, out.with_suffix(".png"), machine_label(info))
    print(f"wrote {out}")
    return 0


def plot(rows: list[dict], path: Path, machine: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
    labels = [f"{r['img_size']} px {r['points_per_side']}² pts {r['filters']}" + (f"\n{r['threads']} thr, {r['busy']} busy" if r.get("busy") not in (None, "", "0", 0) else "") for r in rows]
    x = np.arange(len(rows))
    ax_t.bar(x - 0.2, [float(r["stock_s"]) for r in rows], 0.4, label="stock")
    ax_t.bar(x + 0.2, [float(r["blocked_s"]) for r in rows], 0.4, label="sam_blocked")
    ax_t.set_ylabel("mask generation after the encoder, s")
    ax_m.bar(x - 0.27, [float(r["encoder_peak_mib"]) for r in rows], 0.27, label="patched encoder")
    ax_m.bar(x, [float(r["stock_peak_mib"]) for r in rows], 0.27, label="stock generator")
    ax_m.bar(x + 0.27, [float(r["blocked_peak_mib"]) for r in rows], 0.27, label="sam_blocked generator")
    ax_m.set_ylabel("extra peak of tensors, MiB")
    for ax in (ax_t, ax_m):
        ax.set_xticks(x, labels, fontsize=7)
        ax.legend(fontsize=8)
    fig.suptitle(f"Automatic masks, {rows[0]['model'] if rows else ''}, seeded weights — {machine}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
