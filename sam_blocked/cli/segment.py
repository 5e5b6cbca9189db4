"""`sam-blocked segment`: SAM masks for files, folders and globs of (large) images."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from sam_blocked.cli import FLAGS
from sam_blocked.cli.common import add_model_args, add_read_args, blocking_from_args, busy_cpu_note, model_from_args, settings_from_args
from sam_blocked.inputs.base import ReadSettings
from sam_blocked.inputs.images import DEFAULT_MAX_PIXELS, collect_images
from sam_blocked.memory import planner
from sam_blocked.engines.options import AMG_SETTINGS, SegmentOptions
from sam_blocked.inputs.prompts import load_prompts
from sam_blocked.memory.measure import available_bytes
from sam_blocked.segment import segment_images
from sam_blocked.summary import LOG_NAME, SUMMARY_NAME
from sam_blocked.tiles.plan import Tiling

EPILOG = f"""\
prompt files (--prompts), coordinates in pixels of the original image as displayed:
  JSON  {{"photo.jpg": [{{"name": "cat", "foreground": [[120, 80]], "background": [[5, 5]],
                        "box": [10, 20, 300, 240]}}]}}
  CSV   image,name,kind,x0,y0,x1,y1      (kind: foreground | background | box;
        photo.jpg,cat,foreground,120,80,,  points use x0,y0; rows sharing image
        photo.jpg,cat,box,10,20,300,240    and name form one prompt set)

outputs in --output, per image <stem>: <stem>/N.png + metadata.csv (png), <stem>.json
(coco), <stem>.overlay.png (--overlay), <stem>.labels.tif (labels: uint32 label image, tiled
TIFF, GeoTIFF for georeferenced inputs), <stem>.objects.csv (table: id, bbox, area, score,
tile, truncated), <stem>.labels.ome.tif (ome-tiff), <stem>.labels.cog.tif (cog),
<stem>.ome.zarr (ngff), <stem>.geojson (geojson), <stem>.gpkg (gpkg); for the run:
{SUMMARY_NAME}, {LOG_NAME}. Ids agree across all of them.
A rerun skips images whose outputs are complete; exit code 1 when any image failed.

huge images (--tile): the tile is the model's input size, so pixels go in at scale 1 and
masks come out at native resolution: --tile 2048 runs the model at 2048 px (--img-size, if
given, must agree). Images larger than a tile are segmented tile by tile, one encoder pass
per tile (prompt mode: only the tiles its prompts need), and stitched: automatic masks found
in several tiles are kept once, from a tile that sees them whole; a mask that touches a tile
edge inside the image is marked truncated. TIFF/BigTIFF, OME-Zarr and zarr stores (folders),
and whole-slide images (.svs .ndpi .mrxs .scn .bif: OpenSlide, pip install "sam-blocked[slide]")
are read window by window. Default --format with --tile, by input: labels,coco,table (plain
images), ome-tiff,geojson,table (slides), ngff,geojson,table (OME-Zarr), cog,gpkg,table
(GeoTIFF); png refused for huge images.

pyramids and channels: --level N reads pyramid level N of a pyramidal TIFF, OME-Zarr or slide
(0 = full resolution); --mpp M the level nearest M microns per pixel, resampled to exactly M.
Prompts, masks and boxes are then in that level's pixels; each image's summary entry gives its
scale (level, downsample, mpp): level-0 x = x * downsample. --channels 2,1,0 shows three
channels of a multichannel image as R,G,B, --channels 1 one as gray; values that are not 8-bit
are stretched from each channel's min..max.

on a Ray cluster (--engine ray, pip install 'sam-blocked[ray]'): one model per worker, loaded
once; each image (or, with --tile, each tile) goes to a worker. Inputs, outputs and the
checkpoint must be on storage every node sees, at the same paths. Workers write the
images' outputs themselves; tiles come back to this process, which stitches and writes.
Same outputs, resume and failures as the local engine; a worker that dies is restarted and
its images redone. The summary says which node and worker did each image.

examples:
  sam-blocked segment examples/*.jpg --prompts examples/prompts.json --output masks \\
      --model-type vit_b --checkpoint sam_vit_b_01ec64.pth --format both --overlay
  sam-blocked segment slide.tif --auto --tile 1024 --output masks --checkpoint sam_vit_b_01ec64.pth
  sam-blocked segment slide.svs --auto --tile 1024 --mpp 1.0 --output masks --checkpoint sam_vit_b_01ec64.pth
  sam-blocked segment cells.ome.zarr --auto --tile 1024 --level 1 --channels 1 --output masks
  sam-blocked segment /shared/photos --auto --output /shared/masks --checkpoint /shared/sam_vit_b_01ec64.pth \\
      --engine ray --address auto --workers 8 --gpus-per-worker 1
"""

AMG_HELP = {
    "points_per_side": "points sampled along each side of the image (SAM: 32); with --tile, along each tile side: "
    "a grid every tile/N px over the whole image, each point decoded once, in the tile that owns it",
    "points_per_batch": "points decoded together, each as 3 full-size masks (with --tile, tile-size); lower it for large images (SAM: 64)",
    "pred_iou_thresh": "drop masks whose predicted IoU is below this (SAM: 0.88)",
    "stability_score_thresh": "drop masks whose stability score is below this (SAM: 0.95)",
    "stability_score_offset": "logit offset of the stability score (SAM: 1.0)",
    "box_nms_thresh": "box IoU above which duplicate masks are dropped (SAM: 0.7)",
    "crop_n_layers": "if > 0, also run on crops, this many layers (SAM: 0)",
    "crop_nms_thresh": "box IoU for duplicates across crops (SAM: 0.7)",
    "crop_overlap_ratio": "overlap of the crops (SAM: 512/1500)",
    "crop_n_points_downscale_factor": "points per side shrink by this per crop layer (SAM: 1)",
    "min_mask_region_area": "remove islands and holes below this area in pixels; needs opencv (SAM: 0)",
}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "segment",
        help="segment files or folders of images: prompted or automatic masks",
        description="Segment images with SAM, one encoder pass per image, writing masks as "
        "segment-anything's scripts/amg.py does. Resumable; a bad image fails alone.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders, or quoted globs ('scans/**/*.tif')")
    parser.add_argument("--output", required=True, metavar="DIR", help="output folder (created)")
    parser.add_argument(
        "--pattern",
        default=None,
        help="glob for the files of folder INPUTs, e.g. '*.tif' or '**/*.png' (recursive); "
        "default: files directly in the folder with an image extension",
    )
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--prompts", metavar="FILE", help="JSON or CSV prompt file: points and boxes per image (format below)")
    mode.add_argument("--auto", action="store_true", help="automatic masks (SamAutomaticMaskGenerator)")
    parser.add_argument("--multimask", action="store_true", help="with --prompts, keep all three masks per prompt set, not the best one")
    parser.add_argument(
        "--format",
        default=None,
        help="png (masks + metadata.csv), coco (RLE JSON), both (= png,coco), labels (label TIFF), table (object CSV), "
        "ome-tiff (pyramidal OME-TIFF labels), cog (Cloud-Optimized GeoTIFF labels), ngff (OME-Zarr labels), "
        "geojson (polygons, QuPath's layout), gpkg (GeoPackage polygons), or a comma list such as ome-tiff,ngff,geojson; "
        "default png, or with --tile by input: labels,coco,table (images), ome-tiff,geojson,table (slides), "
        "ngff,geojson,table (OME-Zarr), cog,gpkg,table (GeoTIFF)",
    )
    parser.add_argument(
        "--simplify", type=float, default=0.0, metavar="PX",
        help="geojson/gpkg: simplify polygons by this tolerance in pixels, topology kept (default 0: exact pixel edges)",
    )
    parser.add_argument(
        "--labels-into-input", action="store_true",
        help="ngff: write the labels into the OME-Zarr input itself (<input>/labels/sam), not as <stem>.ome.zarr in --output",
    )  # fmt: skip
    parser.add_argument("--overlay", action="store_true", help="also write <stem>.overlay.png, a preview with the masks and prompts (png/coco only)")
    parser.add_argument("--overwrite", action="store_true", help="redo images whose outputs are already complete")
    parser.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        help="images decoded whole with more pixels fail unread, a guard against decompression bombs (default "
        "%(default)s = 16384 x 16384); with --tile, TIFF/BigTIFF are read window by window with no pixel limit: the limit is the disk",
    )
    tiles = parser.add_argument_group("huge images, tile by tile at native resolution")
    tiles.add_argument(
        "--tile",
        default=None,
        metavar="SIZE|auto",
        help="tile size in px = the model's input size (a multiple of 16, e.g. 1024, 2048), or auto: the largest "
        "input size whose memory fits --max-memory-mb; images that fit in one tile are segmented whole",
    )
    tiles.add_argument(
        "--overlap",
        type=int,
        default=None,
        metavar="PX",
        help="pixels neighbouring tiles share (default a quarter of the tile); objects up to half of it are always seen whole",
    )
    tiles.add_argument("--max-memory-mb", type=float, default=None, metavar="MB", help="--tile auto: memory budget (default: the memory free now)")
    add_read_args(parser, "pyramid levels and channels (pyramidal TIFF, OME-Zarr, slides, multichannel images)")
    engine = parser.add_argument_group("engine: where the work runs")
    engine.add_argument(
        "--engine",
        choices=["local", "ray"],
        default="local",
        help="local: in this process (default); ray: over a Ray cluster, one model per worker (pip install 'sam-blocked[ray]')",
    )
    engine.add_argument(
        "--address",
        default=None,
        metavar="auto|HOST:PORT",
        help="--engine ray: the cluster to join (auto: the one this node belongs to, see `ray start`); default: a new local Ray instance",
    )
    engine.add_argument("--workers", type=int, default=None, metavar="N", help="--engine ray: workers, one model each (default: one per GPU of the cluster, else 1)")
    engine.add_argument(
        "--gpus-per-worker",
        type=float,
        default=None,
        metavar="F",
        help="--engine ray: GPUs per worker, 0.5 to share one between two (default: 1 when the cluster has GPUs, else 0)",
    )
    engine.add_argument("--cpus-per-worker", type=float, default=None, metavar="N", help="--engine ray: CPUs per worker, also its torch threads (default 1)")
    add_model_args(parser)
    amg = parser.add_argument_group("automatic masks (--auto only; scripts/amg.py's settings, SAM's defaults)")
    for key, (kind, _, _) in AMG_SETTINGS.items():
        amg.add_argument("--" + key.replace("_", "-"), dest=key, type=kind, default=None, help=AMG_HELP[key])
    parser.set_defaults(main=main)


def main(args: argparse.Namespace) -> int:
    amg = {key: getattr(args, key) for key in AMG_SETTINGS if getattr(args, key) is not None}
    if args.prompts and amg:
        flags = ", ".join("--" + k.replace("_", "-") for k in amg)
        raise ValueError(f"{flags}: automatic-mask settings apply to --auto only, not to --prompts")
    if args.auto and args.multimask:
        raise ValueError("--multimask applies to --prompts; --auto keeps every mask that passes its filters")
    if args.engine != "ray":
        given = [flag for flag in ("address", "workers", "gpus_per_worker", "cpus_per_worker") if getattr(args, flag) is not None]
        if given:
            raise ValueError(f"{', '.join('--' + g.replace('_', '-') for g in given)} go with --engine ray: add it, or drop them")
    tile = _tile_flag(args)
    read = ReadSettings(args.level, args.mpp, args.channels)  # refuses a bad --level, --mpp or --channels before anything is read
    options = SegmentOptions(
        formats=_formats(args.format),
        multimask=args.multimask,
        overlay=args.overlay,
        overwrite=args.overwrite,
        max_pixels=args.max_pixels,
        amg=amg,
        tiling=Tiling(tile, args.overlap) if isinstance(tile, int) else None,
        read=read,
        simplify=args.simplify,
        labels_into_input=args.labels_into_input,
    )
    prompts = load_prompts(args.prompts) if args.prompts else None
    output = Path(args.output)
    engine = _ray_engine(args, tile) if args.engine == "ray" else None  # refuses bad engine flags before anything is read
    images, problems = collect_images(args.inputs, args.pattern, exclude=output, names=FLAGS)
    if not images:
        raise ValueError("no images to segment: " + "; ".join(f"{arg}: {reason}" for arg, reason in problems))
    flags = {k: v for k, v in vars(args).items() if k != "main"}
    if engine is not None:
        model = engine.settings.checkpoint
        print(f"model: {model}, loaded by each Ray worker" if model else "warning: no checkpoint found: every Ray worker builds the same seeded random weights", file=sys.stderr)
        run_on, recorded = engine, {"model": None, "random_weights": None}  # the workers report the model they loaded
    else:
        loaded = model_from_args(args)
        print(f"{'warning' if loaded.random_weights else 'model'}: {loaded.description}", file=sys.stderr)
        note = busy_cpu_note(next(loaded.sam.parameters()).device)
        if note:
            print(note, file=sys.stderr)
        if tile == "auto":
            tile = _auto_tile(args, loaded, amg)
            print(f"tile: {tile} px, the largest input size that fits {args.max_memory_mb:.0f} MiB", file=sys.stderr)
            from sam_blocked.resolution import set_image_size

            set_image_size(loaded.sam, tile)
            options.tiling = Tiling(tile, args.overlap)
        run_on, recorded = loaded.sam, {"model": loaded.description, "random_weights": loaded.random_weights}
    # A batch scheduler's SIGTERM stops the run as Ctrl-C does: partial files removed, summary written.
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if on_main_thread else None
    try:
        summary = segment_images(
            run_on, images, output, prompts=prompts, options=options, problems=problems, settings={**recorded, "flags": flags}, names=FLAGS
        )
    finally:
        if on_main_thread:
            signal.signal(signal.SIGTERM, previous)
    print(summary.line(), file=sys.stderr)
    return 1 if summary.failed else 0


def _ray_engine(args: argparse.Namespace, tile: int | str | None):
    """The RayEngine the flags describe (sam_blocked.engines.ray); --tile auto is refused."""
    if tile == "auto":
        raise ValueError("--tile auto sizes the tile to this machine's memory, not the workers': with --engine ray give --tile SIZE (e.g. 1024)")
    from sam_blocked.engines.ray import RayEngine

    return RayEngine(
        settings_from_args(args),
        blocking_from_args(args),
        address=args.address,
        workers=args.workers,
        gpus_per_worker=args.gpus_per_worker,
        cpus_per_worker=1.0 if args.cpus_per_worker is None else args.cpus_per_worker,
    )


def _formats(value: str | None) -> tuple[str, ...] | None:
    """--format as a tuple: "both" is png,coco; None keeps the default (SegmentOptions picks it)."""
    if value is None:
        return None
    names = [v.strip() for v in value.split(",") if v.strip()]
    return tuple(f for name in names for f in (("png", "coco") if name == "both" else (name,)))


def _tile_flag(args: argparse.Namespace) -> int | str | None:
    """--tile as a size (the model then loads at that input size) or "auto"; refuses a conflicting --img-size."""
    if args.tile is None:
        if args.overlap is not None or args.max_memory_mb is not None:
            raise ValueError("--overlap and --max-memory-mb go with --tile: add --tile SIZE or --tile auto")
        return None
    if args.max_memory_mb is not None and args.tile != "auto":
        raise ValueError(f"--max-memory-mb picks the tile size for --tile auto; --tile {args.tile} is fixed: drop one")
    if args.tile == "auto":
        if args.img_size is not None:
            raise ValueError(f"--tile auto picks the model's input size from --max-memory-mb: drop --img-size {args.img_size}, or give --tile {args.img_size}")
        return "auto"
    try:
        tile = int(args.tile)
    except ValueError:
        raise ValueError(f"--tile {args.tile!r}: give a size in px (a multiple of 16, e.g. 1024 or 2048) or auto") from None
    Tiling(tile, args.overlap)  # refuse a bad size or overlap before loading anything
    if args.img_size is not None and args.img_size != tile:
        raise ValueError(
            f"--tile {tile} is the model's input size (pixels go in at scale 1), but --img-size is {args.img_size}: drop --img-size, or make them equal"
        )
    args.img_size = tile
    return tile


def _auto_tile(args: argparse.Namespace, loaded, amg: dict) -> int:
    """The largest input size (a multiple of 16) whose memory fits --max-memory-mb, from sam_blocked.memory.planner."""
    device = next(loaded.sam.parameters()).device
    if args.max_memory_mb is None:
        free = available_bytes(device)
        if free is None:
            raise ValueError(f"--tile auto cannot tell how much memory {device} has free: give --max-memory-mb")
        args.max_memory_mb = free / 2**20
    size = planner.largest_input_size(
        loaded.model_type,
        args.max_memory_mb,
        dtype=args.dtype,
        device=str(device),
        chunks=args.chunks,
        max_block_mb=args.max_block_mb,
        points_per_batch=amg.get("points_per_batch", 64) if args.auto else 1,
        multiple=16,
        backend=args.backend,
    )
    if size is None:
        raise ValueError(
            f"--tile auto: no input size of {loaded.model_type} fits {args.max_memory_mb:.0f} MiB on {device}: raise --max-memory-mb, "
            "try --dtype bfloat16 or a smaller --max-block-mb, or give --tile SIZE"
        )
    return int(size)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt
