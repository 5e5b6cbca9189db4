"""`sam-blocked verify`: stock vs patched on the user's model, image and settings."""

from __future__ import annotations

import argparse
import json

import numpy as np

from sam_blocked.cli.common import add_model_args, model_from_args


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "verify",
        help="prove that the patched encoder matches stock SAM on your model",
        description="Runs the image encoder stock and patched on the same image, compares the embeddings "
        "and the masks of a few point prompts, and exits 0 when they match within the dtype's tolerance.",
    )
    add_model_args(parser)
    parser.add_argument("--image", default=None, help="image file to verify on (default: a seeded random image)")
    parser.add_argument("--points", type=int, default=3, help="point prompts whose masks are compared (default %(default)s)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(main=main)


def _read_image(path: str) -> np.ndarray:
    from sam_blocked.inputs.images import InputError, read_image

    try:
        return read_image(path)[0]
    except InputError as error:
        raise ValueError(f"--image {path}: {error}") from None


def main(args: argparse.Namespace) -> int:
    from sam_blocked.verify import verify_equivalence

    image = _read_image(args.image) if args.image else None
    loaded = model_from_args(args, patch=False)
    print(f"{'WARNING: ' if loaded.random_weights else ''}model: {loaded.description}")
    report = verify_equivalence(
        loaded.sam,
        image,
        chunks=args.chunks,
        max_block_mb=args.max_block_mb,
        backend=args.backend,
        points=args.points,
        seed=args.seed,
    )
    print(json.dumps(report.to_dict(), indent=2) if args.json else report)
    return 0 if report.passed else 1
