"""Model options shared by every command that loads a model (amg.py's flag names)."""

from __future__ import annotations

import argparse

from sam_blocked.attention.common import DEFAULT_CHUNKS
from sam_blocked.attention.dispatch import BACKEND_CHOICES
from sam_blocked.encoder.layer import check_config
from sam_blocked.models.load import DTYPES, MODEL_TYPE_CHOICES, LoadedModel, ModelSettings, load_model, resolve_device

__all__ = ["DTYPES", "LoadedModel", "add_model_args", "blocking_from_args", "device_from_args", "model_from_args", "settings_from_args"]


def add_read_args(parser: argparse.ArgumentParser, title: str) -> None:
    """--level / --mpp (one or the other) and --channels: what is read of each image (ReadSettings)."""
    read = parser.add_argument_group(title)
    levels = read.add_mutually_exclusive_group()
    levels.add_argument("--level", type=int, default=None, metavar="N", help="read pyramid level N (0: full resolution, the default)")
    levels.add_argument(
        "--mpp",
        type=float,
        default=None,
        metavar="M",
        help="read at M microns per pixel: the level nearest M, resampled to exactly M (the image must state its mpp)",
    )
    read.add_argument(
        "--channels",
        default=None,
        metavar="R,G,B|C",
        help="channels shown: three as R,G,B (e.g. 2,1,0) or one as gray (e.g. 1); default: the image's RGB, or its first channel(s)",
    )


def add_model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model-type",
        default="auto",
        choices=list(MODEL_TYPE_CHOICES),
        help="SAM architecture; 'auto' detects it from the checkpoint (vit_b without one). "
        "'tiny' is a 2-block test architecture with random weights.",
    )
    group.add_argument(
        "--checkpoint",
        default=None,
        help="SAM checkpoint (.pth) or a folder of them. Without it: $SAM_BLOCKED_WEIGHTS, then the weights "
        "folder (`sam-blocked weights list`), else seeded random weights.",
    )
    group.add_argument("--device", default=None, help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda when available)")
    group.add_argument("--dtype", default="float32", choices=list(DTYPES), help="model dtype")
    group.add_argument("--img-size", type=int, default=None, help="square input size in pixels, a multiple of 16 (default 1024)")
    group.add_argument("--seed", type=int, default=0, help="seed of the random weights when no checkpoint is given")
    blocks = parser.add_argument_group("blocked attention")
    blocks.add_argument("--chunks", type=int, default=DEFAULT_CHUNKS, help="blocks per attention matrix (default %(default)s = 4 x 4)")
    blocks.add_argument(
        "--max-block-mb",
        type=float,
        default=None,
        help="memory budget in MiB for the largest attention block; chosen per layer, overrides --chunks",
    )
    blocks.add_argument(
        "--backend",
        default="auto",
        choices=list(BACKEND_CHOICES),
        help="attention kernel: auto (default: chosen per device and layer shape, see README), "
        "blocked (pure PyTorch), sdpa, bands (plain GEMMs), flashbias, flex (CUDA only)",
    )


def device_from_args(args: argparse.Namespace):
    return resolve_device(args.device)


def settings_from_args(args: argparse.Namespace) -> ModelSettings:
    """The model the flags name (sam_blocked.models.load.ModelSettings)."""
    return ModelSettings(args.model_type, args.checkpoint, args.device, args.dtype, args.img_size, args.seed)


def blocking_from_args(args: argparse.Namespace):
    """The patch the flags name (sam_blocked.encoder.layer.BlockConfig), checked."""
    return check_config(args.chunks, args.max_block_mb, args.backend)


def model_from_args(args: argparse.Namespace, *, patch: bool = True) -> LoadedModel:
    """Build or load the model the flags describe, resized, moved, cast and (by default) patched."""
    return load_model(settings_from_args(args), blocking_from_args(args) if patch else None)
