"""segment_anything (Meta's SAM): the image encoder's `Attention`, global and windowed blocks.

Stock forward: qkv -> (q * scale) k^T + decomposed rel-pos (get_rel_pos interpolates a table
only when its length differs from 2*size-1) -> softmax in the input dtype -> v -> proj,
on x of shape (B, H, W, dim). The blocked forward is sam_blocked.layer.attention_layer on
the module's own weights. Also used by the segment_anything_hq adapter: its encoder is a
copy of this one.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType
from typing import Optional

import torch

from sam_blocked.adapters.base import ClassPatch, EncoderCall, class_patch, patched_class_named, missing_attributes, qkv_reasons
from sam_blocked.layer import BlockConfig, attention_layer

LIBRARY = "segment_anything"
MODULES = ("segment_anything.modeling.image_encoder",)

_ATTRIBUTES = ("qkv", "proj", "num_heads", "scale", "use_rel_pos")


def attention_reasons(module: torch.nn.Module) -> list[str]:
    """Why this segment_anything-style Attention cannot run blocked; [] when it can."""
    why = missing_attributes(module, _ATTRIBUTES)
    if not why and module.use_rel_pos:
        why = missing_attributes(module, ("rel_pos_h", "rel_pos_w"))
    return why or qkv_reasons(module, "num_heads")


def blocked_attention_forward(module: torch.nn.Module, config: BlockConfig, x: torch.Tensor) -> torch.Tensor:
    """Attention.forward, blocked. x: (B, H, W, dim) -> (B, H, W, dim)."""
    rel_h, rel_w = (module.rel_pos_h, module.rel_pos_w) if module.use_rel_pos else (None, None)
    return attention_layer(x, module.qkv, module.proj, module.num_heads, module.scale, rel_h, rel_w, config)


def class_patches(module: ModuleType, library: str = LIBRARY, home: str = __name__) -> list[ClassPatch]:
    """The ClassPatches for a loaded image_encoder module of segment_anything (or a copy of it)."""
    return [class_patch(library, module.Attention, blocked_attention_forward, attention_reasons, home=home)]


def encoder_call(model: torch.nn.Module, package: str = LIBRARY) -> Optional[EncoderCall]:
    """How `package` (segment_anything or a copy) runs the encoder of a Sam or an ImageEncoderViT; None for other models."""
    modeling = sys.modules.get(f"{package}.modeling")
    if modeling is None:
        return None
    if isinstance(model, modeling.Sam) and isinstance(model.image_encoder, modeling.ImageEncoderViT):
        predictor = importlib.import_module(package).SamPredictor
        return EncoderCall(model.image_encoder.img_size, model.image_encoder, predictor)
    if isinstance(model, modeling.ImageEncoderViT):
        return EncoderCall(model.img_size, model)
    return None


def __getattr__(name: str) -> type:  # the Blocked* classes, for unpickling (base.patched_class_named)
    return patched_class_named(__name__, MODULES, name)
