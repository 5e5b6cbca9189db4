"""A ready model from settings: checkpoint or seeded random weights, resized, moved, cast, patched.

The one place where settings become a model. The CLI turns its flags into `ModelSettings`,
the demo keeps them per session, and a batch worker (another process, another machine)
receives them: they are a small frozen dataclass that pickles and hashes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from segment_anything.modeling import Sam

from sam_blocked.encoder.layer import BlockConfig
from sam_blocked.models.registry import DTYPES, MODEL_TYPE_CHOICES, build_sam, cast_image_encoder, check_dtype, check_model_type
from sam_blocked.patch import patch_sam

__all__ = ["DTYPES", "MODEL_TYPE_CHOICES", "LoadedModel", "ModelSettings", "load_model", "resolve_device"]


@dataclass(frozen=True)
class ModelSettings:
    """Which model to run (amg.py's names: model_type "default" is vit_h).

    Args:
        model_type: "auto" (detected from the checkpoint; vit_b without one), "default",
            or a name of models.ENCODER_CONFIGS.
        checkpoint: a .pth or a folder of them; None searches $SAM_BLOCKED_WEIGHTS and the
            weights folder, and without a hit builds seeded random weights.
        device: a torch device string; None means cuda when available.
        dtype: the image encoder's dtype, a key of DTYPES.
        img_size: square input size in pixels (multiple of 16); None keeps the model's (1024).
        seed: seeds the random weights when no checkpoint is found.
    """

    model_type: str = "auto"
    checkpoint: Optional[str] = None
    device: Optional[str] = None
    dtype: str = "float32"
    img_size: Optional[int] = None
    seed: int = 0


@dataclass
class LoadedModel:
    sam: Sam
    model_type: str
    description: str  # one line for logs and banners
    random_weights: bool


def resolve_device(device: Optional[str]) -> torch.device:
    """`device` as a torch.device (None: cuda when available), refusing CUDA where there is none."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device {device!r} is not a torch device: use cpu, cuda or cuda:N") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: CUDA is not available on this machine; use device 'cpu'")
    return resolved


def load_model(settings: ModelSettings, blocking: Optional[BlockConfig] = BlockConfig()) -> LoadedModel:
    """Build or load the model `settings` describe, resized, moved, cast and patched.

    Args:
        settings: the model (see ModelSettings).
        blocking: the patch (chunks or max_block_mb, and the backend); None leaves it stock.
    """
    check_model_type(settings.model_type, MODEL_TYPE_CHOICES)
    check_dtype(settings.dtype)
    device = resolve_device(settings.device)
    model_type = "vit_h" if settings.model_type == "default" else settings.model_type
    from sam_blocked.models.checkpoints import find_checkpoint, load_sam

    checkpoint = settings.checkpoint
    if checkpoint is None:
        checkpoint = find_checkpoint(model_type)  # None for "tiny" or when nothing is on disk
    if checkpoint is None:
        model_type = "vit_b" if model_type == "auto" else model_type
        sam = build_sam(model_type, seed=settings.seed)
        hint = "'tiny' has no checkpoint" if model_type == "tiny" else f"get weights with `sam-blocked weights download {model_type}`"
        description = f"{model_type} with seeded random weights (seed {settings.seed}): masks are meaningless; {hint}"
        random_weights = True
    else:
        sam = load_sam(model_type, checkpoint)
        model_type = sam.model_type
        description = f"{model_type} from {checkpoint}"
        random_weights = False
    if settings.img_size is not None and settings.img_size != sam.image_encoder.img_size:
        from sam_blocked.resolution import set_image_size

        set_image_size(sam, settings.img_size)
    sam = cast_image_encoder(sam.to(device), DTYPES[settings.dtype])
    if blocking is not None:
        patch_sam(sam, chunks=blocking.chunks, max_block_mb=blocking.max_block_mb, backend=blocking.backend)
    return LoadedModel(sam, model_type, description, random_weights)
