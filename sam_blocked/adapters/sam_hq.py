"""segment_anything_hq (SAM-HQ): a copy of segment_anything's image encoder in another module.

Its `Attention` is line for line segment_anything's, so the blocked forward and the checks
are that adapter's. Only the encoder differs (it returns `(embedding, [global blocks'
outputs])`), which the attention never sees.
"""

from __future__ import annotations

from types import ModuleType
from typing import Optional

import torch

from sam_blocked.adapters import segment_anything
from sam_blocked.adapters.base import ClassPatch, EncoderCall
from sam_blocked.adapters.registry import patched_class_named

LIBRARY = "segment_anything_hq"
MODULES = ("segment_anything_hq.modeling.image_encoder",)


def class_patches(module: ModuleType) -> list[ClassPatch]:
    """The ClassPatches for a loaded segment_anything_hq.modeling.image_encoder."""
    return segment_anything.class_patches(module, library=LIBRARY, home=__name__)


def encoder_call(model: torch.nn.Module) -> Optional[EncoderCall]:
    """A segment_anything_hq Sam (its own SamPredictor) or ImageEncoderViT; None for other models."""
    return segment_anything.encoder_call(model, package=LIBRARY)


def __getattr__(name: str) -> type:  # the Blocked* classes, for unpickling (registry.patched_class_named)
    return patched_class_named(__name__, MODULES, name)
