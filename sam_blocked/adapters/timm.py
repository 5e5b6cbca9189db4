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

The encoder's `Block` rides along (kind MLP): it calls its attention as stock does, adds the
residual in place to the attention's fresh output, and runs norm2 + MLP (fc1, act, its
norm, fc2, and LayerScale when there is one) a chunk of tokens at a time into that buffer
(sam_blocked.encoder.tokenwise.mlp_residual_), stock's arithmetic on fewer tokens. A block with
something that is not token-wise while it runs (drop_path or MLP dropout while training, an
MLP other than timm's Mlp) runs its stock forward.

VisionTransformerSAM already runs at any input size: it resamples its absolute position
embedding to the token grid on every call (resample_abs_pos_embed_nhwc) and get_rel_pos
interpolates the global blocks' tables, so no set_image_size is needed.
"""

from __future__ import annotations

import sys
from types import ModuleType
from typing import Optional

import torch

from sam_blocked.adapters.base import MLP, ClassPatch, EncoderCall, class_patch, dropout_reasons, missing_attributes, qkv_reasons
from sam_blocked.adapters.registry import patched_class_named
from sam_blocked.encoder.layer import BlockConfig, attention_layer
from sam_blocked.encoder.tokenwise import activate_, mlp_chunk, mlp_residual_

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


def _tokenwise_mlp(block: torch.nn.Module) -> bool:
    """True when the block's second half acts on each token alone as it runs now: timm's Mlp
    (fc1, act, drop1, norm, fc2, drop2), and no dropout or drop_path while training."""
    mlp = block.mlp
    parts = all(hasattr(mlp, name) for name in ("fc1", "act", "drop1", "norm", "fc2", "drop2"))
    if not parts or type(mlp).__name__ != "Mlp" or not isinstance(mlp.fc1, torch.nn.Linear):
        return False
    if not block.training:
        return True
    drops = (mlp.drop1, mlp.drop2, block.drop_path2)
    return all(isinstance(d, torch.nn.Identity) or getattr(d, "p", getattr(d, "drop_prob", 1.0)) == 0 for d in drops)


def class_patches(module: ModuleType) -> list[ClassPatch]:
    """The ClassPatches for a loaded timm.models.vision_transformer_sam: its Attention, and
    its Block alongside (kind MLP)."""
    window_partition, window_unpartition = module.window_partition, module.window_unpartition

    def block_forward(block: torch.nn.Module, config: BlockConfig, x: torch.Tensor) -> torch.Tensor:
        """Block.forward with norm2 + MLP a chunk of tokens at a time. (B, H, W, dim) -> (B, H, W, dim)."""
        if not _tokenwise_mlp(block):
            return block_patch.stock_forward(block, x)
        B, H, W, dim = x.shape
        y = block.norm1(x)
        pad_hw = None
        if block.window_size > 0:
            y, pad_hw = window_partition(y, block.window_size)
        y = block.drop_path1(block.ls1(block.attn(y)))
        if block.window_size > 0:
            y = window_unpartition(y, block.window_size, (H, W), pad_hw)
        y = y.contiguous().add_(x)  # stock: shortcut + x, into the attention's fresh output
        mlp = block.mlp
        act = mlp.act if isinstance(mlp.norm, torch.nn.Identity) else lambda h: mlp.norm(activate_(mlp.act, h))
        fc2 = mlp.fc2 if isinstance(block.ls2, torch.nn.Identity) else lambda h: block.ls2(mlp.fc2(h))
        chunk = mlp_chunk(dim, mlp.fc1.out_features, config.max_block_mb, y.device)
        return mlp_residual_(y, block.norm2, mlp.fc1, act, fc2, chunk)

    def block_reasons(block: torch.nn.Module) -> list[str]:
        return missing_attributes(block, ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2", "window_size"))

    attention = class_patch(LIBRARY, module.Attention, blocked_attention_forward, attention_reasons, home=__name__)
    block_patch = class_patch(LIBRARY, module.Block, block_forward, block_reasons, home=__name__, kind=MLP)
    return [attention, block_patch]


def encoder_call(model: torch.nn.Module) -> Optional[EncoderCall]:
    """A VisionTransformerSAM: forward_features (the neck's output); None for other models."""
    module = sys.modules.get(MODULES[0])
    if module is None or not isinstance(model, module.VisionTransformerSAM):
        return None
    height, width = model.patch_embed.img_size
    if height != width:
        raise ValueError(f"the model was built for {height} x {width} px inputs: verify_equivalence runs square ones")
    return EncoderCall(int(height), model.forward_features)


def __getattr__(name: str) -> type:  # the Blocked* classes, for unpickling (registry.patched_class_named)
    return patched_class_named(__name__, MODULES, name)
