"""`sam-blocked weights download|list`: fetch and inspect the official SAM checkpoints."""

from __future__ import annotations

import argparse

from sam_blocked.models.checkpoints import CHECKPOINTS, WEIGHTS_ENV, checkpoint_status, download_checkpoint, resolve_weights_dir

_DIR_HELP = f"weights folder (default: ${WEIGHTS_ENV} if it names a folder, else the repository's weights/ in a checkout, else ~/.cache/sam_blocked)"


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "weights",
        help="download and list the official SAM checkpoints",
        description="Download the official segment-anything checkpoints (verified by size and sha256) and list what is on disk.",
    )
    commands = parser.add_subparsers(dest="weights_command", required=True, metavar="ACTION")

    download = commands.add_parser(
        "download",
        help="download a checkpoint (resumes a partial download)",
        description="Streams the checkpoint into FILE.part, resumes it if interrupted, and moves it into place "
        "only when its size and sha256 match the manifest.",
    )
    download.add_argument("model_type", choices=list(CHECKPOINTS), metavar="MODEL_TYPE", help=f"one of {', '.join(CHECKPOINTS)}")
    download.add_argument("--dir", default=None, help=_DIR_HELP)
    download.add_argument("--url", default=None, help="download from this address instead (a mirror); size and sha256 are still checked")
    download.set_defaults(main=download_main)

    listing = commands.add_parser(
        "list",
        help="show which checkpoints are present, partial or missing",
        description="Checks sizes only (fast); --verify also hashes each file of the right size (seconds per GB). "
        "Exits 1 when a file under an official name is damaged (wrong size or sha256), else 0.",
    )
    listing.add_argument("--dir", default=None, help=_DIR_HELP)
    listing.add_argument("--verify", action="store_true", help="check the sha256 of each present file")
    listing.set_defaults(main=list_main)


def download_main(args: argparse.Namespace) -> int:
    folder = resolve_weights_dir(args.dir)
    info = CHECKPOINTS[args.model_type]
    print(f"{args.model_type}: {args.url or info.url} -> {folder / info.file} ({info.size / 2**20:,.0f} MiB)")
    path = download_checkpoint(info, folder, url=args.url)
    print(f"{args.model_type}: {path} verified (sha256 {info.sha256[:12]}...)")
    return 0


def list_main(args: argparse.Namespace) -> int:
    folder = resolve_weights_dir(args.dir)
    print(f"weights folder: {folder}")
    damaged = False
    for model_type in CHECKPOINTS:
        status = checkpoint_status(model_type, folder, verify=args.verify)
        info = status.info
        fix = f"sam-blocked weights download {model_type}" + (f" --dir {args.dir}" if args.dir else "")
        if status.state == "verified":
            line = f"verified   {status.path}"
        elif status.state == "present":
            line = f"present    {status.path} (size ok; --verify checks sha256)"
        elif status.state == "partial":
            line = f"partial    {status.path} ({status.size:,} of {info.size:,} bytes): resume with `{fix}`"
        elif status.state == "missing":
            line = f"missing    {info.file}: `{fix}`"
        else:
            detail = f"{status.size:,} bytes, expected {info.size:,}" if status.state == "wrong size" else "sha256 differs"
            line = f"{status.state:<10} {status.path} ({detail}): delete it, then `{fix}`"
        damaged = damaged or status.state in ("wrong size", "wrong sha256")
        print(f"{model_type:<6} {line}")
    return 1 if damaged else 0
