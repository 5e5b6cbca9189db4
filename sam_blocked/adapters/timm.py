"""timm: `vision_transformer_sam.Attention`, the attention of the samvit_* backbones (VisionTransformerSAM).

Stock forward: qkv -> q_norm(q), k_norm(k) (identities unless qk_norm=True) -> the
decomposed rel-pos bias built from the normed q (get_rel_pos resizes a table only when
its length differs from 2*size-1; float coordinates, as segment_anything's) -> SDPA with
the full (B*heads, N, N) bias, or (q * scale) k^T + bias -> softmax when fused attention is
off -> proj -> proj_drop. The blocked forward applies the same norms to each head group's q
and k (they act on each (token, head) row alone) and the same proj_drop.

Not covered, and refused with the reason: rotary position embeddings (use_rope=True, the
EVA-style variant), q/k norms other than timm's or torch's per-token norms, and attention
dropout while training.

VisionTransformerSAM already runs at any input size: it resamples its absolute position
embedding to the token grid on every call (resample_abs_pos_embed_nhwc) and get_rel_pos
interpolates the global blocks' tables, so no set_image_size is needed.
"""

from __future__ import annotations

import sys
from types import ModuleType
from typing import Optional

import torch

from sam_blocked.adapters.base import ClassPatch, EncoderCall, class_patch, patched_class_named, dropout_reasons, missing_attributes, qkv_reasons
from sam_blocked.layer import BlockConfig, attention_layer

LIBRARY = "timm"
MODULES = ("timm.models.vision_transformer_sam",)

_ATTRIBUTES = ("qkv", "proj", "num_heads", "scale", "use_rel_pos", "q_norm", "k_norm", "attn_drop", "proj_drop", "rope")
_ROW_NORMS = (torch.nn.LayerNorm, torch.nn.RMSNorm)


def _norm_reasons(name: str, norm: torch.nn.Module) -> list[str]:
    row_wise = isinstance(norm, (torch.nn.Identity, *_ROW_NORMS)) or type(norm).__module__ == "timm.layers.norm"
    if row_wise:
        return []
    return [f"{name} is {type(norm).__qualname__}: blocked attention takes torch's or timm's per-token norms only"]


def attention_reasons(module: torch.nn.Module) -> list[str]:
    """Why this timm SAM Attention cannot run blocked; [] when it can."""
    why = missing_attributes(module, _ATTRIBUTES)
    if why:
        return why
    if module.rope is not None:
        return [
            "it has a rotary position embedding (use_rope=True): sam_blocked covers SAM's decomposed "
            "relative position (use_rel_pos=True) and no position term; leave this model stock"
        ]
    if module.use_rel_pos:
        why = missing_attributes(module, ("rel_pos_h", "rel_pos_w"))
    why = why or qkv_reasons(module, "num_heads")
    why += _norm_reasons("q_norm", module.q_norm) + _norm_reasons("k_norm", module.k_norm)
    return why or dropout_reasons(module, module.attn_drop.p)


def blocked_attention_forward(module: torch.nn.Module, config: BlockConfig, x: torch.Tensor) -> torch.Tensor:
    """Attention.forward, blocked. x: (B, H, W, dim) -> (B, H, W, dim)."""
    rel_h, rel_w = (module.rel_pos_h, module.rel_pos_w) if module.use_rel_pos else (None, None)
    q_norm = None if isinstance(module.q_norm, torch.nn.Identity) else module.q_norm
    k_norm = None if isinstance(module.k_norm, torch.nn.Identity) else module.k_norm
    out = attention_layer(
        x, module.qkv, module.proj, module.num_heads, module.scale, rel_h, rel_w, config, q_norm=q_norm, k_norm=k_norm
    )
    return module.proj_drop(out)


def class_patches(module: ModuleType) -> list[ClassPatch]:
    """The ClassPatches for a loaded timm.models.vision_transformer_sam."""
    return [class_patch(LIBRARY, module.Attention, blocked_attention_forward, attention_reasons, home=__name__)]


def encoder_call(model: torch.nn.Module) -> Optional[EncoderCall]:
    """A VisionTransformerSAM: forward_features (the neck's output); None for other models."""
    module = sys.modules.get(MODULES[0])
    if module is None or not isinstance(model, module.VisionTransformerSAM):
        return None
    height, width = model.patch_embed.img_size
    if height != width:
        raise ValueError(f"the model was built for {height} x {width} px inputs: verify_equivalence runs square ones")
    return EncoderCall(int(height), model.forward_features)


def __getattr__(name: str) -> type:  # the Blocked* classes, for unpickling (base.patched_class_named)
    return patched_class_named(__name__, MODULES, name)
