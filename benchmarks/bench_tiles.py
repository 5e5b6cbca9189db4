"""Huge images tile by tile: time, encoder passes and peak memory against image size and tile size.

Each configuration runs in a fresh subprocess, the way `sam-blocked segment --tile` runs
one image: a tiled TIFF opened with open_image (read window by window), the model built
at the tile size with seeded random weights and patched (blocked attention, default
chunks), sam_blocked.tiles.segment_tiled, then the huge-image outputs written
(HugeImageOutputs: uint32 label TIFF, COCO RLE, object table; into a temporary folder,
deleted after). Recorded: wall and CPU seconds of segmenting and of writing, tiles in the
grid, encoder passes, masks, the model's resident size and the process's peak resident
memory (VmHWM, everything included: Python, torch, model, tiles, masks, writers).

Modes:
- prompts: a fixed handful of prompt sets (PROMPTS: five sets at fixed fractions of the
  image, two sharing a tile), so passes = the tiles the prompts need, at most four;
- auto: automatic masks, a point grid of --points-per-side per tile over the whole image;
  records duplicate pairs (two output masks whose mask IoU is above box_nms_thresh,
  counted on crops where boxes meet) and how many masks are cut by a tile edge.

Images: tiled (512 px) TIFFs of a mosaic of scikit-image photographs, deflate-compressed
up to 100 M pixels and uncompressed above (a 32000 px side: 3 GB of pixels, 3 GB on
disk), built once tile by tile and cached in --cache-dir (not committed). A tile size not smaller than the image is skipped (that
image takes the untiled path).

Writes benchmarks/results/tiles_<machine>.csv (rows of earlier runs kept unless
re-measured) and a PNG next to it.

    python benchmarks/bench_tiles.py --quick                    # cheap rows: minutes
    python benchmarks/bench_tiles.py                            # prompt grid: vit_b, 4k-32k px, tiles 1024/2048/4096
    python benchmarks/bench_tiles.py --mode auto --models tiny --sizes 2000x1500 4000x3000 8000x6000 --tiles 1024
    python benchmarks/bench_tiles.py --table                    # the CSV as a Markdown table
    python benchmarks/bench_tiles.py --picture docs/tiles-labels.png   # a stitched label image, rendered
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py, also when imported from elsewhere
from common import (  # noqa: E402
    MIB,
    RESULTS,
    SweepCSV,
    cap_child_memory,
    cap_mb,
    default_cap_gb,
    oom_note,
    print_result,
    print_table,
    run_in_child,
)

MODES = ["prompts", "auto"]
SIZES = ["4000", "8000", "16000", "32000"]
TILES = [1024, 2048, 4096]
QUICK = [("prompts", "vit_b", "4000", 1024), ("prompts", "vit_b", "8000", 1024), ("prompts", "vit_b", "8000", 2048),
         ("auto", "tiny", "2000x1500", 1024), ("auto", "tiny", "4000x3000", 1024)]  # fmt: skip
# Prompt sets at fixed fractions of the image: (kind, x, y); the second shares the first's tile.
PROMPTS = [("point", 0.21, 0.23), ("point", 0.215, 0.235), ("box", 0.77, 0.31), ("point", 0.34, 0.72), ("point", 0.68, 0.81)]
TIFF_TILE = 512
DEFLATE_PIXELS = 10**8  # larger mosaics are written uncompressed: deflate, single-threaded, would take longer than the run
FIELDS = [
    "machine", "device", "mode", "model", "width", "height", "tile", "overlap", "points_per_side", "prompts", "status",
    "tiles", "encoder_passes", "masks", "truncated", "duplicates", "seconds", "cpu_s", "write_s", "model_mb", "peak_mb",
    "cap_mb", "threads", "torch", "note",
]  # fmt: skip


# --- the images --------------------------------------------------------------------------


def parse_size(text: str) -> tuple[int, int]:
    """"S" or "WxH" -> (width, height)."""
    parts = text.lower().split("x")
    if len(parts) not in (1, 2) or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"size {text!r}: give a side in pixels (8000) or WIDTHxHEIGHT (8000x6000)")
    return (int(parts[0]), int(parts[-1]))


def mosaic_unit(side: int = 4096, row: int = 512) -> np.ndarray:
    """(side, side, 3) uint8: rows of scikit-image photographs, `row` px high, each row shifted so rows differ."""
    from PIL import Image
    from skimage import data

    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket(), data.immunohistochemistry(),
              data.hubble_deep_field(), data.retina()]  # fmt: skip
    resized = [np.asarray(Image.fromarray(p).resize((round(p.shape[1] * row / p.shape[0]), row))) for p in photos]
    out = np.zeros((side, side, 3), np.uint8)
    for r in range(side // row):
        x, k = 0, 3 * r
        while x < side:
            p = resized[k % len(resized)][:, : side - x]
            out[r * row : (r + 1) * row, x : x + p.shape[1]] = p
            x, k = x + p.shape[1], k + 1
    return out


def mosaic_tiff(cache: Path, width: int, height: int) -> Path:
    """The cached tiled TIFF of (width, height), built tile by tile (memory: the mosaic unit, 48 MiB)."""
    import tifffile

    path = cache / f"mosaic_{width}x{height}.tif"
    if path.exists():
        return path
    cache.mkdir(parents=True, exist_ok=True)
    unit = mosaic_unit()
    side = unit.shape[0]

    def tiles():
        for y in range(0, height, TIFF_TILE):
            for x in range(0, width, TIFF_TILE):
                # shifted by the unit's row: a 32k image repeats the unit, but not tile for tile
                yield unit[y % side : y % side + TIFF_TILE, (x + 7 * (y // side) * TIFF_TILE) % side :][:, :TIFF_TILE]

    partial = path.with_name(f"{path.stem}.{os.getpid()}.part")  # its own: two sweeps building the same image never share a file
    deflate = width * height <= DEFLATE_PIXELS
    tifffile.imwrite(partial, tiles(), shape=(height, width, 3), dtype=np.uint8, tile=(TIFF_TILE, TIFF_TILE), photometric="rgb",
                     compression="zlib" if deflate else None, compressionargs={"level": 1} if deflate else None,
                     bigtiff=width * height * 3 > 2**31)  # fmt: skip
    os.replace(partial, path)
    return path


def prompt_sets(width: int, height: int):
    """PROMPTS in pixels of a (width, height) image: a point is a foreground click, a box 240 x 180 px."""
    from sam_blocked.inputs.prompts import Prompt

    out = []
    for i, (kind, fx, fy) in enumerate(PROMPTS):
        x, y = fx * width, fy * height
        if kind == "point":
            out.append(Prompt(f"p{i}", foreground=((x, y),)))
        else:
            out.append(Prompt(f"p{i}", box=(x - 120, y - 90, x + 120, y + 90)))
    return out


# --- one configuration, in the child ---------------------------------------------------------


def duplicates(masks, threshold: float) -> int:
    """Pairs of masks whose mask IoU is above `threshold`, counted on crops where their boxes meet."""
    from sam_blocked.tiles.geometry import boxes_meeting
    from sam_blocked.tiles.stitch import intersection

    boxes = np.array([m.box for m in masks], dtype=np.int64).reshape(-1, 4)
    found = 0
    for i, a in enumerate(masks):
        for j in np.flatnonzero(boxes_meeting(a.box, boxes[i + 1 :])) + i + 1:
            b = masks[j]
            inter = intersection(a, b)
            found += inter / (a.record["area"] + b.record["area"] - inter) > threshold
    return int(found)


def run_child(args: argparse.Namespace) -> int:
    """Segment one image in one configuration and print one RESULT line of JSON."""
    cap_child_memory(args.mem_cap_gb, args.device)
    row = {"status": "error", "note": ""}
    try:
        import torch
        from segment_anything import SamPredictor

        from sam_blocked.inputs.images import ImageItem
        from sam_blocked.memory.measure import current_bytes, peak_bytes
        from sam_blocked.models.registry import build_sam
        from sam_blocked.patch import patched
        from sam_blocked.outputs.huge import HugeImageOutputs
        from sam_blocked.tiles.plan import Tiling
        from sam_blocked.inputs.sources import open_image
        from sam_blocked.tiles.loop import segment_tiled
        from sam_blocked.tiles.tile import DecodeSettings

        if args.threads:
            torch.set_num_threads(args.threads)
        row["threads"] = torch.get_num_threads()
        before = current_bytes()
        sam = build_sam(args.model, img_size=args.tile)
        row["model_mb"] = round((current_bytes() - before) / MIB, 1)
        tiling = Tiling(args.tile, args.overlap)
        settings = DecodeSettings(pred_iou_thresh=args.pred_iou_thresh, stability_score_thresh=args.stability_score_thresh)
        try:
            with open_image(args.image) as source, patched(sam), torch.inference_mode():
                prompts = prompt_sets(source.width, source.height) if args.mode == "prompts" else None
                start, cpu = time.perf_counter(), time.process_time()
                result = segment_tiled(SamPredictor(sam), source, source.height, source.width, tiling, prompts=prompts,
                                       points_per_side=args.points_per_side, settings=settings)  # fmt: skip
                row["seconds"], row["cpu_s"] = round(time.perf_counter() - start, 2), round(time.process_time() - cpu, 2)
                with tempfile.TemporaryDirectory(prefix="bench_tiles_") as folder:
                    start = time.perf_counter()
                    HugeImageOutputs(Path(folder), ImageItem(Path(args.image), Path(args.image).name)).commit(
                        result.masks, source.height, source.width, geo=source.geo
                    )
                    row["write_s"] = round(time.perf_counter() - start, 2)
            masks = result.masks
            row.update(tiles=result.tiles, encoder_passes=result.encoder_passes, masks=len(masks), status="ok",
                       truncated=sum(bool(m.record["truncated"]) for m in masks))  # fmt: skip
            if args.mode == "auto":
                row["duplicates"] = duplicates(masks, settings.box_nms_thresh)
        except (RuntimeError, MemoryError) as error:
            row.update(note=oom_note(error), status="OOM")
        row["peak_mb"] = round(peak_bytes() / MIB, 1)  # the process's high-water mark since it started
    except Exception as error:  # recorded, not raised: one bad configuration must not end the sweep
        row["note"] = f"{type(error).__name__}: {str(error)[:200]}"
    print_result(row)
    return 0


# --- the sweep, in the parent ------------------------------------------------------------


def configurations(args: argparse.Namespace) -> list[tuple[str, str, str, int]]:
    if args.quick:
        return QUICK
    return [(args.mode, model, size, tile) for model in args.models for size in args.sizes for tile in args.tiles]


def sweep(args: argparse.Namespace) -> Path:
    out = SweepCSV.open(args, "tiles", _key, FIELDS, _order)
    for mode, model, size, tile in configurations(args):
        width, height = parse_size(size)
        side = args.points_per_side if mode == "auto" else ""
        overlap = args.overlap if args.overlap is not None else tile // 4
        row = {"machine": out.label, "device": args.device, "mode": mode, "model": model, "width": width, "height": height,
               "tile": tile, "overlap": overlap, "points_per_side": side, "prompts": len(PROMPTS) if mode == "prompts" else "",
               "cap_mb": cap_mb(args.mem_cap_gb, args.device), "torch": out.info["torch"]}  # fmt: skip
        if tile >= max(width, height):
            print(f"{mode} {model} {width} x {height} tile {tile}: skipped, the image fits in one tile (untiled path)", flush=True)
            continue
        image = mosaic_tiff(args.cache_dir, width, height)
        command = ["--image", str(image), "--mode", mode, "--model", model, "--tile", str(tile), "--overlap", str(overlap),
                   "--points-per-side", str(args.points_per_side), "--pred-iou-thresh", str(args.pred_iou_thresh),
                   "--stability-score-thresh", str(args.stability_score_thresh), "--device", args.device,
                   "--mem-cap-gb", str(args.mem_cap_gb), "--threads", str(args.threads)]  # fmt: skip
        row.update(run_in_child(__file__, command, args.timeout))
        print(f"{mode:7s} {model:5s} {width:5d} x {height:5d} tile {tile:4d}: {row['status']:6s} {row.get('seconds', '')} s "
              f"(write {row.get('write_s', '')} s), {row.get('encoder_passes', '')} passes of {row.get('tiles', '')} tiles, "
              f"{row.get('masks', '')} masks, peak {row.get('peak_mb', '')} MiB {row.get('note', '')}", flush=True)  # fmt: skip
        out.add(row)
    return out.finish(plot)


def _key(row: dict) -> tuple:
    return (row["device"], row["mode"], row["model"], int(row["width"]), int(row["height"]), int(row["tile"]), str(row["points_per_side"]))


def _order(row: dict) -> tuple:
    return (row["device"], MODES.index(row["mode"]), row["model"], int(row["width"]) * int(row["height"]), int(row["tile"]))


# --- the plot and the README table -----------------------------------------------------------


def plot(rows: list[dict], path: Path, label: str) -> None:
    """Prompt mode: time and peak memory against image side, a line per tile size (and model);
    automatic mode: time against the number of tiles, a line per model and points per side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok"]
    fig, (ax_time, ax_mem, ax_auto) = plt.subplots(1, 3, figsize=(16, 4.8))
    prompts = [r for r in ok if r["mode"] == "prompts"]
    for model, tile in sorted({(r["model"], int(r["tile"])) for r in prompts}):
        line = sorted((r for r in prompts if r["model"] == model and int(r["tile"]) == tile), key=lambda r: int(r["width"]))
        sides = [int(r["width"]) for r in line]
        ax_time.plot(sides, [float(r["seconds"]) for r in line], "o-", label=f"{model}, tile {tile}")
        ax_mem.plot(sides, [float(r["peak_mb"]) for r in line], "o-", label=f"{model}, tile {tile}")
    ax_time.set(xscale="log", yscale="log", xlabel="image side, px", ylabel="s to segment (wall clock)",
                title=f"prompt mode ({len(PROMPTS)} prompt sets): time")  # fmt: skip
    ax_mem.set(xscale="log", xlabel="image side, px", ylabel="process peak MiB (VmHWM)", title="prompt mode: peak memory, outputs included")
    ax_mem.axhline(2048, color="gray", ls=":", lw=1)
    ax_mem.set_ylim(bottom=0)
    auto = [r for r in ok if r["mode"] == "auto"]
    for model, side, tile in sorted({(r["model"], r["points_per_side"], int(r["tile"])) for r in auto}):
        line = sorted((r for r in auto if (r["model"], r["points_per_side"], int(r["tile"])) == (model, side, tile)), key=lambda r: int(r["tiles"]))
        ax_auto.plot([int(r["tiles"]) for r in line], [float(r["seconds"]) for r in line], "o-", label=f"{model}, tile {tile}, {side} pts/side")
    ax_auto.set(xlabel="tiles", ylabel="s to segment (wall clock)", title="automatic masks: time against tiles")
    for ax in (ax_time, ax_mem, ax_auto):
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(f"sam_blocked tiles: huge images at native resolution, random weights\n{label}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def markdown_table(rows: list[dict]) -> str:
    """A Markdown table, a row per configuration: size, tile, tiles, passes, masks, times, peak memory."""
    lines = ["| mode | model | image px | tile px | tiles | encoder passes | masks | segment s | write s | peak MiB | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in sorted(rows, key=_order):
        mode = f"prompts ({r['prompts']} sets)" if r["mode"] == "prompts" else f"auto ({r['points_per_side']} pts/side)"
        note = r["note"]
        if r["mode"] == "auto" and r["status"] == "ok":
            note = f"{r['duplicates']} duplicates, {r['truncated']} cut by a tile edge" + (f"; {note}" if note else "")
        if r["status"] != "ok":
            cells = [r["status"]] + [""] * 5
        else:
            cells = [r["tiles"], r["encoder_passes"], r["masks"], f"{float(r['seconds']):.1f}", f"{float(r['write_s']):.1f}", f"{float(r['peak_mb']):.0f}"]
        lines.append(f"| {mode} | {r['model']} | {r['width']} x {r['height']} | {r['tile']} | " + " | ".join(map(str, cells)) + f" | {note} |")
    return "\n".join(lines)


def picture(path: Path, args: argparse.Namespace) -> None:
    """Automatic masks on a mosaic (tiny, random weights, filters at 0), the label image as a colour overlay, reduced."""
    import torch
    from PIL import Image, ImageDraw
    from segment_anything import SamPredictor

    from sam_blocked.models.registry import build_sam
    from sam_blocked.patch import patched
    from sam_blocked.tiles.plan import Tiling
    from sam_blocked.inputs.sources import open_image
    from sam_blocked.tiles.loop import segment_tiled
    from sam_blocked.tiles.tile import DecodeSettings

    width, height = parse_size(args.picture_size)
    tile = args.tiles[0]
    image = mosaic_tiff(args.cache_dir, width, height)
    sam = build_sam("tiny", img_size=tile)
    tiling = Tiling(tile)
    with open_image(image) as source, patched(sam), torch.inference_mode():
        pixels = source.read((0, 0, width, height))
        result = segment_tiled(SamPredictor(sam), source, height, width, tiling, points_per_side=args.points_per_side,
                               settings=DecodeSettings(pred_iou_thresh=0.0, stability_score_thresh=0.0))  # fmt: skip
    step = max(1, -(-max(width, height) // 1000))  # shown at most 1000 px a side
    labels = np.zeros((height, width), np.uint32)  # (H, W): the picture's image is small; the library never makes one
    for i in sorted(range(len(result.masks)), key=lambda i: -result.masks[i].record["area"]):  # smaller masks on top, as tiles.labels
        m = result.masks[i]
        x0, y0, x1, y1 = m.box
        labels[y0:y1, x0:x1][m.mask] = i + 1
    small, reduced = labels[::step, ::step], pixels[::step, ::step].astype(np.float32)
    colors = np.random.default_rng(1).integers(40, 256, size=(len(result.masks) + 1, 3)).astype(np.float32)
    painted = small > 0
    reduced[painted] = 0.35 * reduced[painted] + 0.65 * colors[small[painted]]
    out = Image.fromarray(reduced.astype(np.uint8))
    draw = ImageDraw.Draw(out)
    for x0, y0, x1, y1 in tiling.boxes(height, width):
        draw.rectangle((x0 / step, y0 / step, (x1 - 1) / step, (y1 - 1) / step), outline=(0, 0, 0), width=2)
    out = out.quantize(256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
    path.parent.mkdir(parents=True, exist_ok=True)
    out.save(path, optimize=True)
    cut = sum(bool(m.record["truncated"]) for m in result.masks)
    print(f"wrote {path}: {width} x {height} mosaic, tiny, tile {tile}, {args.points_per_side} points a tile side, "
          f"{result.tiles} tiles, {len(result.masks)} masks ({cut} cut by a tile edge), shown at 1/{step}")  # fmt: skip


# --- command line ------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", default="prompts", choices=MODES, help="prompts (a fixed handful) or auto (automatic masks; default %(default)s)")
    parser.add_argument("--models", nargs="+", default=["vit_b"], choices=["vit_b", "vit_l", "vit_h", "tiny"], help="default vit_b")
    parser.add_argument("--sizes", nargs="+", default=SIZES, help=f"image sizes, a side or WIDTHxHEIGHT (default {' '.join(SIZES)})")
    parser.add_argument("--tiles", type=int, nargs="+", default=TILES, help=f"tile sizes, multiples of 16 (default {TILES})")
    parser.add_argument("--overlap", type=int, default=None, help="overlap in px (default a quarter of the tile)")
    parser.add_argument("--points-per-side", type=int, default=16, help="auto: grid points per tile side (default %(default)s)")
    parser.add_argument("--pred-iou-thresh", type=float, default=0.0, help="auto: (default 0: random weights' scores are low)")
    parser.add_argument("--stability-score-thresh", type=float, default=0.0, help="auto: (default 0)")
    parser.add_argument("--quick", action="store_true", help="the cheap rows: vit_b prompts on 4000 and 8000 px, tiny auto on 2000x1500 and 4000x3000")
    parser.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "sam_blocked_bench_tiles",
                        help="where the mosaic TIFFs are built and kept (default %(default)s)")  # fmt: skip
    parser.add_argument("--device", default="cpu", help="cpu only for now (peak memory is the process's VmHWM)")
    parser.add_argument("--mem-cap-gb", type=float, default=None, help="private-memory cap per child (default: 20, or 85%% of RAM)")
    parser.add_argument("--timeout", type=int, default=4 * 3600, help="seconds per configuration (default %(default)s)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS, help="where the CSV and PNG go (default benchmarks/results)")
    parser.add_argument("--machine", default=None, help="name in the file names (default: from the CPU model)")
    parser.add_argument("--fresh", action="store_true", help="drop earlier rows of the same CSV instead of keeping them")
    parser.add_argument("--table", action="store_true", help="print the CSV of --machine (or this machine) as a Markdown table and exit")
    parser.add_argument("--picture", type=Path, default=None, help="render a stitched label image (automatic masks, tiny) to this PNG and exit")
    parser.add_argument("--picture-size", default="3000x2000", help="the picture's mosaic, WIDTHxHEIGHT (default %(default)s; tile: first of --tiles)")
    # One configuration, as the sweep runs it in a subprocess.
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--image", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--tile", type=int, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.mem_cap_gb is None:
        args.mem_cap_gb = default_cap_gb()
    if args.child:
        return run_child(args)
    if args.device != "cpu":
        parser.error("--device: this benchmark measures the CPU (the process's resident peak); use --device cpu")
    if args.table:
        return print_table(parser, args, "tiles", markdown_table)
    try:
        for size in args.sizes + [args.picture_size]:
            parse_size(size)
    except ValueError as error:
        parser.error(f"--sizes: {error}")
    bad = [t for t in args.tiles if t <= 0 or t % 16]
    if bad:
        parser.error(f"--tiles {' '.join(map(str, bad))}: tile sizes must be positive multiples of 16")
    if args.mem_cap_gb <= 0 or args.timeout <= 0 or args.points_per_side < 1:
        parser.error("--mem-cap-gb, --timeout and --points-per-side must be > 0")
    if args.picture is not None:
        picture(args.picture, args)
        return 0
    sweep(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
