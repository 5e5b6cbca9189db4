"""`sam-blocked demo`: the Gradio web demo (click to segment, see the memory saved)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the demo imports gradio: only `sam-blocked demo` pays for it
    from sam_blocked.demo.handlers import DemoSettings


def add_parser(sub: argparse._SubParsersAction) -> None:
    from sam_blocked.cli.common import add_model_args, add_read_args

    parser = sub.add_parser(
        "demo",
        help="web demo: click to segment, and see the memory the patched encoder saves",
        description="Starts a Gradio app. Without --checkpoint it runs seeded random weights and says so: "
        "the masks are meaningless, the memory comparison is real.",
    )
    add_model_args(parser)
    server = parser.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s; 0.0.0.0 for every interface)")
    server.add_argument("--port", type=int, default=None, help="port (default: 7860, or the next free one)")
    server.add_argument("--share", action="store_true", help="also open a public gradio.live link (off by default)")
    server.add_argument("--examples", default=None, metavar="DIR", help="folder of example images (default: the repository's examples/)")
    server.add_argument(
        "--slides",
        default=None,
        metavar="DIR",
        help="folder of slides, OME-Zarr stores and TIFFs offered to open on the server, read window by window (not uploaded)",
    )
    add_read_args(parser, "pyramid levels and channels of --slides images")
    limits = parser.add_argument_group("limits and large images")
    limits.add_argument(
        "--large-images",
        choices=["tiles", "whole"],
        default="tiles",
        help="an image larger than the input size: tiles = shown reduced and segmented at native resolution, a click "
        "encoding the tile around it once; whole = resized into one encode, as SamPredictor does (default %(default)s)",
    )
    limits.add_argument(
        "--max-pixels", type=int, default=4096 * 4096, help="largest image encoded whole, in pixels (default %(default)s = 4096 x 4096)"
    )
    limits.add_argument(
        "--max-tiled-pixels",
        type=int,
        default=12288 * 12288,
        help="largest image taken tile by tile, in pixels (default %(default)s = 12288 x 12288, 453 MiB decoded per session; "
        "above 178,956,970 PIL's bomb check in Gradio's upload refuses the file first)",
    )
    limits.add_argument("--max-upload-mb", type=float, default=200.0, help="largest upload in MiB (default %(default)s)")
    limits.add_argument(
        "--max-everything-tiles",
        type=int,
        default=16,
        help="'Segment everything' on a tiled image runs up to this many tiles; beyond, it names the batch command (default %(default)s)",
    )
    limits.add_argument(
        "--stock-limit-mb",
        type=float,
        default=4096.0,
        help="run stock SAM for the memory comparison only when its attention needs less than this many MiB "
        "(and half the free memory); above it the stock figure is an estimate (default %(default)s)",
    )
    parser.set_defaults(main=main)


def settings_from_args(args: argparse.Namespace) -> DemoSettings:
    """The demo's starting `DemoSettings` from the parsed flags."""
    from sam_blocked.cli.common import device_from_args
    from sam_blocked.inputs.base import ReadSettings
    from sam_blocked.demo.handlers import DemoSettings
    from sam_blocked.models.load import ModelSettings

    model_type = "vit_h" if args.model_type == "default" else args.model_type
    if model_type == "auto" and args.checkpoint is None:
        model_type = "vit_b"  # as model_from_args
    if min(args.max_upload_mb, args.max_pixels, args.max_tiled_pixels, args.max_everything_tiles) <= 0 or args.stock_limit_mb < 0:
        raise ValueError("--max-upload-mb, --max-pixels, --max-tiled-pixels and --max-everything-tiles must be > 0, --stock-limit-mb >= 0")
    device = str(device_from_args(args))  # resolved, so the UI's choice of the same device reuses the model
    model = ModelSettings(model_type, args.checkpoint, device, args.dtype, args.img_size or 1024, args.seed)
    return DemoSettings(
        model,
        chunks=args.chunks,
        max_block_mb=args.max_block_mb,
        backend=args.backend,
        stock_limit_mb=args.stock_limit_mb,
        max_pixels=args.max_pixels,
        max_upload_mb=args.max_upload_mb,
        large_images=args.large_images,
        max_tiled_pixels=args.max_tiled_pixels,
        max_everything_tiles=args.max_everything_tiles,
        read=ReadSettings(args.level, args.mpp, args.channels),
    )


def main(args: argparse.Namespace) -> int:
    try:
        from sam_blocked.demo.ui import build_demo, launch_demo
    except ModuleNotFoundError as error:
        raise ValueError(f"the demo needs gradio ({error}): pip install 'sam-blocked[demo]'") from None

    from sam_blocked.cli.common import busy_cpu_note

    settings = settings_from_args(args)
    note = busy_cpu_note(settings.model.device)
    if note:
        print(note, file=sys.stderr)
    if args.slides is not None and not os.path.isdir(args.slides):
        raise ValueError(f"--slides {args.slides}: not a folder")
    blocks = build_demo(settings, args.examples, args.slides)
    launch_demo(blocks, settings, host=args.host, port=args.port, share=args.share, examples_dir=args.examples)
    return 0
