"""segment_anything (Meta's SAM): the image encoder's `Attention`, global and windowed blocks.

Stock forward: qkv -> (q * scale) k^T + decomposed rel-pos (get_rel_pos interpolates a table
only when its length differs from 2*size-1) -> softmax in the input dtype -> v -> proj,
on x of shape (B, H, W, dim). The blocked forward is sam_blocked.encoder.layer.attention_layer on
the module's own weights.

The encoder's `Block` (norm1, attention in windows or global, residual, norm2, MLP,
residual) is patched alongside (kind BLOCK): sam_blocked.encoder.block.encoder_block computes it
with the same arithmetic a chunk of tokens at a time, its attention included, under the
settings of its patched attention (or of the switch). It runs stock's Block forward when its
attention runs stock. So is the
`PatchEmbed` (kind EMBED): its convolution runs a band of patch rows at a time
(sam_blocked.encoder.tokenwise.patch_embedding), the same kernel on fewer rows. Also used by the
segment_anything_hq adapter: its encoder is a copy of this one. While autograd records,
all three run stock's forward (adapters.base.records_autograd).
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType
from typing import Optional

import torch

from sam_blocked.adapters.base import BLOCK, EMBED, ClassPatch, EncoderCall, class_patch, missing_attributes, qkv_reasons
from sam_blocked.adapters import state
from sam_blocked.adapters.registry import patched_class_named
from sam_blocked.encoder.block import AttentionParts, MLPParts, encoder_block
from sam_blocked.encoder.layer import BlockConfig, attention_layer
from sam_blocked.encoder.tokenwise import embed_chunk, patch_embedding

LIBRARY = "segment_anything"
MODULES = ("segment_anything.modeling.image_encoder",)

_ATTRIBUTES = ("qkv", "proj", "num_heads", "scale", "use_rel_pos")
_BLOCK_ATTRIBUTES = ("norm1", "attn", "norm2", "mlp", "window_size")


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


def banded_embed_runs(embed: torch.nn.Module) -> bool:
    """True when a PatchEmbed can run in bands: its proj a plain Conv2d without padding or dilation."""
    proj = getattr(embed, "proj", None)
    return type(proj) is torch.nn.Conv2d and proj.padding == (0, 0) and proj.dilation == (1, 1) and proj.groups == 1


def class_patches(module: ModuleType, library: str = LIBRARY, home: str = __name__) -> list[ClassPatch]:
    """The ClassPatches for a loaded image_encoder module of segment_anything (or a copy of it):
    its Attention, and its Block and PatchEmbed alongside."""
    attention = class_patch(library, module.Attention, blocked_attention_forward, attention_reasons, home=home)

    def block_reasons(block: torch.nn.Module) -> list[str]:
        why = missing_attributes(block, _BLOCK_ATTRIBUTES) or missing_attributes(block.mlp, ("lin1", "act", "lin2"))
        if not why and type(block.attn) not in (attention.stock, attention.patched):
            why = [f"its attn is {type(block.attn).__qualname__}, not {attention.name}: the block leaves it its own forward"]
        return why or attention.reasons(block.attn)

    def block_stock_call(block: torch.nn.Module, x: torch.Tensor) -> Optional[str]:
        """"" (silently stock: its attention, called by stock's Block forward, speaks for itself)
        when the block's attention does not run blocked, else None."""
        if type(block.attn) is attention.patched or state.runs_blocked(block.attn, attention):
            return None
        return ""

    def block_forward(block: torch.nn.Module, config: BlockConfig, x: torch.Tensor) -> torch.Tensor:
        """Block.forward, a chunk of tokens at a time, its attention's settings when patch_sam set them.
        x: (B, H, W, dim) -> (B, H, W, dim)."""
        attn = block.attn
        if type(attn) is attention.patched:
            config = attn.blocked_config
        rel_h, rel_w = (attn.rel_pos_h, attn.rel_pos_w) if attn.use_rel_pos else (None, None)
        parts = AttentionParts(attn.qkv, attn.proj, attn.num_heads, attn.scale, rel_h, rel_w)
        mlp = MLPParts(block.mlp.lin1, block.mlp.act, block.mlp.lin2)
        return encoder_block(x, block.norm1, parts, block.norm2, mlp, block.window_size, config)

    block_patch = class_patch(library, module.Block, block_forward, block_reasons, home=home, kind=BLOCK, stock_call=block_stock_call)

    def embed_forward(embed: torch.nn.Module, config: BlockConfig, x: torch.Tensor) -> torch.Tensor:
        """PatchEmbed.forward, a band of patch rows at a time. x: (B, 3, H, W) -> (B, H/16, W/16, dim)."""
        if not banded_embed_runs(embed):
            return embed_patch.stock_forward(embed, x)  # another convolution
        proj = embed.proj
        chunk = embed_chunk(proj.out_channels, proj.in_channels * proj.kernel_size[0] * proj.kernel_size[1], config.max_block_mb, x.device)
        return patch_embedding(x, proj, chunk)

    # No reasons: a PatchEmbed that cannot run in bands runs stock's forward, never refusing the model.
    embed_patch = class_patch(library, module.PatchEmbed, embed_forward, lambda embed: [], home=home, kind=EMBED)
    return [attention, block_patch, embed_patch]


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


def __getattr__(name: str) -> type:  # the Blocked* classes, for unpickling (registry.patched_class_named)
    return patched_class_named(__name__, MODULES, name)
