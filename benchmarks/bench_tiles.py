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
image takes the untiled path). --inputs builds the same pixels as other kinds, each window by
window: a GeoTIFF (the TIFF with EPSG:3857 georeferencing, for the COG writer), a pyramidal
slide (Aperio SVS layout, 512 px JPEG tiles, levels at 1/4, 1/16, read through OpenSlide) and
an OME-Zarr (NGFF 0.4, 1024 px chunks, levels halving). --formats runs one configuration per
entry, each a list of `--format` names (default labels,coco,table, what the rows without an
`input` or `formats` column wrote); `segment_peak_mb` is the peak before any output is written.

    python benchmarks/bench_tiles.py --sizes 8000 32000 --tiles 1024 --threads 1 --inputs slide ome-zarr --formats ome-tiff ngff geojson gpkg
    python benchmarks/bench_tiles.py --sizes 8000 32000 --tiles 1024 --threads 1 --inputs geotiff --formats cog

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
INPUTS = ["tiff", "geotiff", "slide", "ome-zarr"]  # what mosaic_image builds; old rows (no `input`) are tiff
DEFAULT_FORMATS = "labels,coco,table"  # HugeImageOutputs' default; old rows (no `formats`) wrote these
SIZES = ["4000", "8000", "16000", "32000"]
TILES = [1024, 2048, 4096]
QUICK = [("prompts", "vit_b", "4000", 1024), ("prompts", "vit_b", "8000", 1024), ("prompts", "vit_b", "8000", 2048),
         ("auto", "tiny", "2000x1500", 1024), ("auto", "tiny", "4000x3000", 1024)]  # fmt: skip
# Prompt sets at fixed fractions of the image: (kind, x, y); the second shares the first's tile.
PROMPTS = [("point", 0.21, 0.23), ("point", 0.215, 0.235), ("box", 0.77, 0.31), ("point", 0.34, 0.72), ("point", 0.68, 0.81)]
TIFF_TILE = 512
ZARR_CHUNK = 1024
SLIDE_MPP = 0.5  # the slide's and the OME-Zarr's level-0 pixel size, micrometres
GEO_TRANSFORM = (1.0, 0.0, 1_000_000.0, 0.0, -1.0, 6_000_000.0)  # the GeoTIFF's affine: 1 m pixels, EPSG:3857
DEFLATE_PIXELS = 10**8  # larger mosaics are written uncompressed: deflate, single-threaded, would take longer than the run
FIELDS = [
    "machine", "device", "mode", "model", "width", "height", "tile", "overlap", "points_per_side", "prompts", "status",
    "tiles", "encoder_passes", "masks", "truncated", "duplicates", "seconds", "cpu_s", "write_s", "model_mb", "peak_mb",
    "cap_mb", "threads", "torch", "note", "input", "formats", "segment_peak_mb",
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


def mosaic_tiff(cache: Path, width: int, height: int, geo: bool = False) -> Path:
    """The cached tiled TIFF of (width, height), built tile by tile (memory: the mosaic unit, 48 MiB);
    with `geo`, a GeoTIFF (EPSG:3857, 1 m pixels: GEO_TRANSFORM)."""
    import tifffile

    path = cache / f"mosaic_{width}x{height}{'.geo' if geo else ''}.tif"
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
    if geo:
        from rasterio.crs import CRS

        from sam_blocked.inputs.geo import GeoInfo, stamp_geo

        stamp_geo(partial, GeoInfo(CRS.from_epsg(3857).to_wkt(), GEO_TRANSFORM))  # GDAL adds the GeoTIFF tags in place
    os.replace(partial, path)
    return path


def mosaic_pixels(unit: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """(len(ys), len(xs), 3) uint8: the mosaic TIFF's pixels at rows `ys` and columns `xs` (any
    stride: a pyramid level is the level-0 pixels at every 2**k-th row and column)."""
    side = unit.shape[0]
    shift = 7 * (ys // side) * TIFF_TILE  # the unit's shift per block of rows, as in mosaic_tiff
    return unit[(ys % side)[:, None], (xs[None, :] + shift[:, None]) % side]  # (len(ys), len(xs), 3)


def level_sizes(width: int, height: int, factor: int, smallest: int) -> list[int]:
    """Downsample factors 1, factor, factor**2, ... while the level is at least `smallest` px a side."""
    out = [1]
    while max(width, height) // (out[-1] * factor) >= smallest:
        out.append(out[-1] * factor)
    return out


def mosaic_slide(cache: Path, width: int, height: int) -> Path:
    """The cached pyramidal slide (Aperio SVS layout, as OpenSlide reads it): level 0 in 512 px JPEG
    tiles, a thumbnail, then levels at 1/4, 1/16, ... (nearest: every 4**k-th pixel), each built
    tile by tile from the mosaic's pixels (memory: the mosaic unit)."""
    import tifffile

    path = cache / f"mosaic_{width}x{height}.svs"
    if path.exists():
        return path
    cache.mkdir(parents=True, exist_ok=True)
    unit = mosaic_unit()

    def tiles(step: int):
        h, w = -(-height // step), -(-width // step)
        for y in range(0, h, TIFF_TILE):
            for x in range(0, w, TIFF_TILE):
                ys, xs = np.arange(y, min(y + TIFF_TILE, h)) * step, np.arange(x, min(x + TIFF_TILE, w)) * step
                tile = np.zeros((TIFF_TILE, TIFF_TILE, 3), np.uint8)  # edge tiles padded, as tifffile wants whole tiles
                tile[: len(ys), : len(xs)] = mosaic_pixels(unit, ys, xs)
                yield tile

    description = (f"Aperio Image Library v12.0.15 \r\n{width}x{height} [0,0 {width}x{height}] ({TIFF_TILE}x{TIFF_TILE}) "
                   f"JPEG/RGB Q=80|AppMag = 20|MPP = {SLIDE_MPP}")  # fmt: skip
    partial = path.with_name(f"{path.stem}.{os.getpid()}.part.svs")
    steps = level_sizes(width, height, 4, TIFF_TILE)
    thumb = -(-max(width, height) // 1024)  # a thumbnail at most 1024 px a side
    with tifffile.TiffWriter(partial, bigtiff=width * height * 3 > 2**32) as tif:
        for i, step in enumerate(steps):
            shape = (-(-height // step), -(-width // step), 3)
            tif.write(tiles(step), shape=shape, dtype=np.uint8, tile=(TIFF_TILE, TIFF_TILE), photometric="rgb", compression="jpeg",
                      compressionargs={"level": 80}, description=description if i == 0 else "Aperio Image Library level", metadata=None)  # fmt: skip
            if i == 0:
                ys, xs = np.arange(0, height, thumb), np.arange(0, width, thumb)
                tif.write(mosaic_pixels(unit, ys, xs), photometric="rgb", compression="jpeg", compressionargs={"level": 80},
                          description="Aperio Image Library thumbnail", metadata=None)  # fmt: skip
    os.replace(partial, path)
    return path


def mosaic_ome_zarr(cache: Path, width: int, height: int) -> Path:
    """The cached OME-Zarr (NGFF 0.4, zarr v2): axes c, y, x, levels halving down to ~2000 px (nearest:
    every 2**k-th pixel), 1024 x 1024 chunks of 3 channels, each chunk written on its own (memory: the
    mosaic unit and one chunk)."""
    import zarr
    from ome_zarr.format import FormatV04
    from ome_zarr.writer import write_multiscales_metadata

    path = cache / f"mosaic_{width}x{height}.ome.zarr"
    if path.exists():
        return path
    cache.mkdir(parents=True, exist_ok=True)
    unit = mosaic_unit()
    partial = path.with_name(f"{path.stem}.{os.getpid()}.part.zarr")
    group = zarr.open_group(str(partial), mode="w", zarr_format=2)
    steps = level_sizes(width, height, 2, 2000)
    for k, step in enumerate(steps):
        h, w = -(-height // step), -(-width // step)
        array = group.create_array(f"s{k}", shape=(3, h, w), chunks=(3, ZARR_CHUNK, ZARR_CHUNK), dtype=np.uint8)
        for y in range(0, h, ZARR_CHUNK):
            for x in range(0, w, ZARR_CHUNK):
                ys, xs = np.arange(y, min(y + ZARR_CHUNK, h)) * step, np.arange(x, min(x + ZARR_CHUNK, w)) * step
                array[:, y : y + len(ys), x : x + len(xs)] = mosaic_pixels(unit, ys, xs).transpose(2, 0, 1)  # (3, h, w)
    datasets = [{"path": f"s{k}", "coordinateTransformations": [{"type": "scale", "scale": [1.0, SLIDE_MPP * s, SLIDE_MPP * s]}]}
                for k, s in enumerate(steps)]  # fmt: skip
    write_multiscales_metadata(group, datasets, fmt=FormatV04(), axes=[{"name": "c", "type": "channel"},
                               {"name": "y", "type": "space", "unit": "micrometer"}, {"name": "x", "type": "space", "unit": "micrometer"}])  # fmt: skip
    os.replace(partial, path)
    return path


def mosaic_image(kind: str, cache: Path, width: int, height: int) -> Path:
    """The cached input of `kind` (INPUTS), built window by window."""
    if kind == "tiff":
        return mosaic_tiff(cache, width, height)
    if kind == "geotiff":
        return mosaic_tiff(cache, width, height, geo=True)
    if kind == "slide":
        return mosaic_slide(cache, width, height)
    return mosaic_ome_zarr(cache, width, height)


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
        from sam_blocked.outputs.frame import Frame
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
                row["segment_peak_mb"] = round(peak_bytes() / MIB, 1)  # before any output is written
                with tempfile.TemporaryDirectory(prefix="bench_tiles_", dir=args.write_dir) as folder:
                    start = time.perf_counter()
                    outputs = HugeImageOutputs(Path(folder), ImageItem(Path(args.image), Path(args.image).name), args.formats[0].split(","))
                    outputs.commit(result.masks, source.height, source.width, geo=source.geo, frame=Frame.of(source))
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


def configurations(args: argparse.Namespace) -> list[tuple[str, str, str, int, str, str]]:
    """(mode, model, size, tile, input, formats) for each run."""
    if args.quick:
        return [(*c, "tiff", DEFAULT_FORMATS) for c in QUICK]
    return [(args.mode, model, size, tile, kind, formats) for kind in args.inputs for formats in args.formats
            for model in args.models for size in args.sizes for tile in args.tiles]  # fmt: skip


def sweep(args: argparse.Namespace) -> Path:
    out = SweepCSV.open(args, "tiles", _key, FIELDS, _order)
    for mode, model, size, tile, kind, formats in configurations(args):
        width, height = parse_size(size)
        side = args.points_per_side if mode == "auto" else ""
        overlap = args.overlap if args.overlap is not None else tile // 4
        row = {"machine": out.label, "device": args.device, "mode": mode, "model": model, "width": width, "height": height,
               "tile": tile, "overlap": overlap, "points_per_side": side, "prompts": len(PROMPTS) if mode == "prompts" else "",
               "cap_mb": cap_mb(args.mem_cap_gb, args.device), "torch": out.info["torch"], "input": kind, "formats": formats}  # fmt: skip
        if tile >= max(width, height):
            print(f"{mode} {model} {width} x {height} tile {tile}: skipped, the image fits in one tile (untiled path)", flush=True)
            continue
        start = time.perf_counter()
        image = mosaic_image(kind, args.cache_dir, width, height)
        if time.perf_counter() - start > 1:
            print(f"built {image} in {time.perf_counter() - start:.0f} s", flush=True)
        command = ["--image", str(image), "--formats", formats, "--mode", mode, "--model", model, "--tile", str(tile), "--overlap", str(overlap),
                   "--points-per-side", str(args.points_per_side), "--pred-iou-thresh", str(args.pred_iou_thresh),
                   "--stability-score-thresh", str(args.stability_score_thresh), "--device", args.device,
                   "--mem-cap-gb", str(args.mem_cap_gb), "--threads", str(args.threads)]  # fmt: skip
        if args.write_dir is not None:
            command += ["--write-dir", str(args.write_dir)]
        row.update(run_in_child(__file__, command, args.timeout))
        print(f"{kind} -> {formats}: {mode:7s} {model:5s} {width:5d} x {height:5d} tile {tile:4d}: {row['status']:6s} {row.get('seconds', '')} s "
              f"(write {row.get('write_s', '')} s), {row.get('encoder_passes', '')} passes of {row.get('tiles', '')} tiles, "
              f"{row.get('masks', '')} masks, peak {row.get('peak_mb', '')} MiB {row.get('note', '')}", flush=True)  # fmt: skip
        out.add(row)
    return out.finish(plot)


def _input(row: dict) -> str:
    return row.get("input") or "tiff"


def _formats(row: dict) -> str:
    return row.get("formats") or DEFAULT_FORMATS


def _key(row: dict) -> tuple:
    return (row["device"], row["mode"], row["model"], int(row["width"]), int(row["height"]), int(row["tile"]), str(row["points_per_side"]),
            _input(row), _formats(row))  # fmt: skip


def _order(row: dict) -> tuple:
    return (row["device"], INPUTS.index(_input(row)), _formats(row) != DEFAULT_FORMATS, _formats(row), MODES.index(row["mode"]), row["model"],
            int(row["width"]) * int(row["height"]), int(row["tile"]))  # fmt: skip


# --- the plot and the README table -----------------------------------------------------------


def plot(rows: list[dict], path: Path, label: str) -> None:
    """Prompt mode: time and peak memory against image side, a line per tile size (and model);
    automatic mode: time against the number of tiles, a line per model and points per side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok"]
    writers = [r for r in ok if (_input(r), _formats(r)) != ("tiff", DEFAULT_FORMATS)]
    fig, axes = plt.subplots(1, 4 if writers else 3, figsize=(21 if writers else 16, 4.8))
    ax_time, ax_mem, ax_auto = axes[:3]
    if writers:
        writers_panel(axes[3], writers)
    prompts = [r for r in ok if r["mode"] == "prompts" and _input(r) == "tiff" and _formats(r) == DEFAULT_FORMATS]
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
    auto = [r for r in ok if r["mode"] == "auto" and _input(r) == "tiff" and _formats(r) == DEFAULT_FORMATS]
    for model, side, tile in sorted({(r["model"], r["points_per_side"], int(r["tile"])) for r in auto}):
        line = sorted((r for r in auto if (r["model"], r["points_per_side"], int(r["tile"])) == (model, side, tile)), key=lambda r: int(r["tiles"]))
        ax_auto.plot([int(r["tiles"]) for r in line], [float(r["seconds"]) for r in line], "o-", label=f"{model}, tile {tile}, {side} pts/side")
    ax_auto.set(xlabel="tiles", ylabel="s to segment (wall clock)", title="automatic masks: time against tiles")
    for ax in axes:
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(f"sam_blocked tiles: huge images at native resolution, random weights\n{label}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def writers_panel(ax, rows: list[dict]) -> None:
    """Peak memory against image side, a line per (input, formats, model, tile): flat means bounded by the tile."""
    for line_key in sorted({(_input(r), _formats(r), r["model"], int(r["tile"])) for r in rows}):
        line = sorted((r for r in rows if (_input(r), _formats(r), r["model"], int(r["tile"])) == line_key), key=lambda r: int(r["width"]))
        kind, formats, model, tile = line_key
        ax.plot([int(r["width"]) for r in line], [float(r["peak_mb"]) for r in line], "o-", label=f"{kind} -> {formats} ({model}, tile {tile})")
    ax.set(xscale="log", xlabel="image side, px", ylabel="process peak MiB (VmHWM)", title="inputs and writers: peak memory")
    ax.set_ylim(bottom=0)


def markdown_table(rows: list[dict]) -> str:
    """Markdown tables, a row per configuration: the tiled TIFF with the default outputs (size, tile,
    tiles, passes, masks, times, peak memory), then, if measured, the other inputs and writers."""
    default = [r for r in rows if (_input(r), _formats(r)) == ("tiff", DEFAULT_FORMATS)]
    lines = ["| mode | model | image px | tile px | tiles | encoder passes | masks | segment s | write s | peak MiB | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in sorted(default, key=_order):
        mode = f"prompts ({r['prompts']} sets)" if r["mode"] == "prompts" else f"auto ({r['points_per_side']} pts/side)"
        note = r["note"]
        if r["mode"] == "auto" and r["status"] == "ok":
            note = f"{r['duplicates']} duplicates, {r['truncated']} cut by a tile edge" + (f"; {note}" if note else "")
        if r["status"] != "ok":
            cells = [r["status"]] + [""] * 5
        else:
            cells = [r["tiles"], r["encoder_passes"], r["masks"], f"{float(r['seconds']):.1f}", f"{float(r['write_s']):.1f}", f"{float(r['peak_mb']):.0f}"]
        lines.append(f"| {mode} | {r['model']} | {r['width']} x {r['height']} | {r['tile']} | " + " | ".join(map(str, cells)) + f" | {note} |")
    writers = [r for r in rows if (_input(r), _formats(r)) != ("tiff", DEFAULT_FORMATS)]
    if writers:
        lines += ["", "| input | formats | mode | model | image px | tile px | encoder passes | masks | segment s | write s | peak before writing MiB | peak MiB | note |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in sorted(writers, key=_order):
            mode = f"prompts ({r['prompts']} sets)" if r["mode"] == "prompts" else f"auto ({r['points_per_side']} pts/side)"
            if r["status"] != "ok":
                cells = [r["status"]] + [""] * 5
            else:
                cells = [r["encoder_passes"], r["masks"], f"{float(r['seconds']):.1f}", f"{float(r['write_s']):.1f}",
                         f"{float(r['segment_peak_mb']):.0f}", f"{float(r['peak_mb']):.0f}"]  # fmt: skip
            lines.append(f"| {_input(r)} | {_formats(r)} | {mode} | {r['model']} | {r['width']} x {r['height']} | {r['tile']} | "
                         + " | ".join(map(str, cells)) + f" | {r['note']} |")  # fmt: skip
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
    parser.add_argument("--inputs", nargs="+", default=["tiff"], choices=INPUTS,
                        help="input kinds, each a mosaic built window by window: tiled TIFF, GeoTIFF, pyramidal SVS slide, OME-Zarr (default tiff)")
    parser.add_argument("--formats", nargs="+", default=[DEFAULT_FORMATS],
                        help=f"the outputs, one run per entry, each one or more comma-separated --format names (default {DEFAULT_FORMATS})")
    parser.add_argument("--write-dir", type=Path, default=None, help="where outputs are written, then deleted (default: the system's temporary folder)")
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
    from sam_blocked.outputs.huge import TILED_FORMATS

    unknown = [f for formats in args.formats for f in formats.split(",") if f not in TILED_FORMATS]
    if unknown:
        parser.error(f"--formats {' '.join(unknown)}: each must be one of {', '.join(TILED_FORMATS)}")
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
