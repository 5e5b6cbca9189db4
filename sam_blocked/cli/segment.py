"""`sam-blocked segment`: SAM masks for files, folders and globs of (large) images."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from sam_blocked.cli.common import add_model_args, model_from_args
from sam_blocked.images import DEFAULT_MAX_PIXELS, collect_images
from sam_blocked.prompts import load_prompts
from sam_blocked.options import AMG_SETTINGS, SegmentOptions
from sam_blocked.segment import segment_images
from sam_blocked.summary import LOG_NAME, SUMMARY_NAME

EPILOG = f"""\
prompt files (--prompts), coordinates in pixels of the original image as displayed:
  JSON  {{"photo.jpg": [{{"name": "cat", "foreground": [[120, 80]], "background": [[5, 5]],
                        "box": [10, 20, 300, 240]}}]}}
  CSV   image,name,kind,x0,y0,x1,y1      (kind: foreground | background | box;
        photo.jpg,cat,foreground,120,80,,  points use x0,y0; rows sharing image
        photo.jpg,cat,box,10,20,300,240    and name form one prompt set)

outputs in --output, per image <stem>: <stem>/N.png + metadata.csv (png), <stem>.json
(coco), <stem>.overlay.png (--overlay); for the run: {SUMMARY_NAME}, {LOG_NAME}.
A rerun skips images whose outputs are complete; exit code 1 when any image failed.

example:
  sam-blocked segment examples/*.jpg --prompts examples/prompts.json --output masks \\
      --model-type vit_b --checkpoint sam_vit_b_01ec64.pth --format both --overlay
"""

AMG_HELP = {
    "points_per_side": "points sampled along each side of the image (SAM: 32)",
    "points_per_batch": "points decoded together; lower it for large images (SAM: 64)",
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
    parser.add_argument("--format", default="png", choices=["png", "coco", "both"], help="PNG masks + metadata.csv, COCO RLE JSON, or both (default png)")
    parser.add_argument("--overlay", action="store_true", help="also write <stem>.overlay.png, a preview with the masks and prompts")
    parser.add_argument("--overwrite", action="store_true", help="redo images whose outputs are already complete")
    parser.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        help="images with more pixels fail unread, a guard against decompression bombs (default %(default)s = 16384 x 16384)",
    )
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
    options = SegmentOptions(
        formats=("png", "coco") if args.format == "both" else (args.format,),
        multimask=args.multimask,
        overlay=args.overlay,
        overwrite=args.overwrite,
        max_pixels=args.max_pixels,
        amg=amg,
    )
    prompts = load_prompts(args.prompts) if args.prompts else None
    output = Path(args.output)
    images, problems = collect_images(args.inputs, args.pattern, exclude=output)
    if not images:
        raise ValueError("no images to segment: " + "; ".join(f"{arg}: {reason}" for arg, reason in problems))
    loaded = model_from_args(args)
    print(f"{'warning' if loaded.random_weights else 'model'}: {loaded.description}", file=sys.stderr)
    flags = {k: v for k, v in vars(args).items() if k != "main"}
    # A batch scheduler's SIGTERM stops the run as Ctrl-C does: partial files removed, summary written.
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if on_main_thread else None
    try:
        summary = segment_images(
            loaded.sam,
            images,
            output,
            prompts=prompts,
            options=options,
            problems=problems,
            settings={"model": loaded.description, "random_weights": loaded.random_weights, "flags": flags},
        )
    finally:
        if on_main_thread:
            signal.signal(signal.SIGTERM, previous)
    print(summary.line(), file=sys.stderr)
    return 1 if summary.failed else 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt
