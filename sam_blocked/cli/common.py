"""Model options shared by every command that loads a model (amg.py's flag names)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
from segment_anything.modeling import Sam

from sam_blocked.attention import DEFAULT_CHUNKS
from sam_blocked.backends import BACKEND_CHOICES
from sam_blocked.models import ENCODER_CONFIGS, build_sam, cast_image_encoder
from sam_blocked.patch import patch_sam

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    sam: Sam
    model_type: str
    description: str  # one line for logs and banners
    random_weights: bool


def add_model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model-type",
        default="auto",
        choices=["auto", "default", *ENCODER_CONFIGS],
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
        "blocked (pure PyTorch), sdpa, flashbias, flex (CUDA only)",
    )


def device_from_args(args: argparse.Namespace) -> torch.device:
    if args.device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: CUDA is not available on this machine; use --device cpu")
    return device


def model_from_args(args: argparse.Namespace, *, patch: bool = True) -> LoadedModel:
    """Build or load the model the flags describe, resized, moved, cast and (by default) patched."""
    device = device_from_args(args)
    model_type = "vit_h" if args.model_type == "default" else args.model_type
    from sam_blocked.checkpoints import find_checkpoint, load_sam

    checkpoint = args.checkpoint
    if checkpoint is None:
        checkpoint = find_checkpoint(model_type)  # None for "tiny" or when nothing is on disk
    if checkpoint is None:
        model_type = "vit_b" if model_type == "auto" else model_type
        sam = build_sam(model_type, seed=args.seed)
        hint = "'tiny' has no checkpoint" if model_type == "tiny" else f"get weights with `sam-blocked weights download {model_type}`"
        description = f"{model_type} with seeded random weights (seed {args.seed}): masks are meaningless; {hint}"
        random_weights = True
    else:
        sam = load_sam(model_type, checkpoint)
        model_type = sam.model_type
        description = f"{model_type} from {checkpoint}"
        random_weights = False
    if args.img_size is not None and args.img_size != sam.image_encoder.img_size:
        from sam_blocked.resolution import set_image_size

        set_image_size(sam, args.img_size)
    sam = cast_image_encoder(sam.to(device), DTYPES[args.dtype])
    if patch:
        patch_sam(sam, chunks=args.chunks, max_block_mb=args.max_block_mb, backend=args.backend)
    return LoadedModel(sam, model_type, description, random_weights)
