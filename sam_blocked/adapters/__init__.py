"""The adapters: one file per library whose SAM image encoder sam_blocked patches, and their registry.

Each adapter reads the classes of one library module that it is given, already imported,
and returns a ClassPatch per class it changes (`class_patches(module)`): the stock class,
its patched subclass and the blocked forward, a few lines over sam_blocked.encoder.layer. ADAPTERS
maps each library module to its adapter; an adapter is imported only once its library
module is, so sam_blocked never imports transformers, timm or segment_anything_hq itself.

| library | module | classes |
|---|---|---|
| segment_anything | segment_anything.modeling.image_encoder | Attention, Block, PatchEmbed |
| segment_anything | segment_anything.modeling.mask_decoder | MaskDecoder (sam_blocked.automatic.decoder) |
| segment_anything | segment_anything.automatic_mask_generator | SamAutomaticMaskGenerator's _process_batch, postprocess_small_regions (switch only) |
| segment_anything_hq | segment_anything_hq.automatic_mask_generator | the same two (switch only) |
| segment_anything_hq | segment_anything_hq.modeling.image_encoder | Attention, Block |
| transformers | transformers.models.sam.modeling_sam | SamVisionAttention, SamVisionSdpaAttention, SamVisionLayer |
| transformers | transformers.models.sam_hq.modeling_sam_hq | SamHQVisionAttention, SamHQVisionSdpaAttention, SamHQVisionLayer |
| timm | timm.models.vision_transformer_sam | Attention |

The encoder blocks (Block, Sam*VisionLayer) are patched alongside their attention: their
token-wise half (norms, MLP, residual adds) runs a chunk of tokens at a time
(sam_blocked.encoder.block, sam_blocked.encoder.tokenwise). `find(model)` walks a model of any of them
and returns each supported layer with its ClassPatch. To support another class, return one more ClassPatch from the adapter's
`class_patches`; another library: one more file and one more ADAPTERS entry (sam_blocked.adapters.registry).
The switch's live state (its settings, its report) lives in sam_blocked.adapters.state, below
both the adapters and sam_blocked.switch.
"""

from __future__ import annotations

import importlib
import sys
from typing import Optional

import torch

from sam_blocked.adapters.base import ATTENTION, ClassPatch, EncoderCall
from sam_blocked.adapters.registry import ADAPTERS, imported_method_patches, imported_patches, method_patches_of, patch_of, patches_of

__all__ = [
    "ADAPTERS", "attention_layers", "encoder_call", "find", "imported_method_patches", "imported_patches",
    "method_patches_of", "no_attention_error", "patch_of", "patches_of",
]


def find(model: torch.nn.Module) -> tuple[list[tuple[str, torch.nn.Module, ClassPatch]], list[str]]:
    """Every supported layer in `model` (or `model` itself), and what was refused.

    Returns:
        found: (qualified name, module, its ClassPatch) per layer, in named_modules order.
        refused: one line per module that subclasses a supported class: a subclass may
            compute something else, so only the library's own classes are patched.
    """
    stocks = imported_patches()
    found, refused = [], []
    for name, module in model.named_modules():
        patch = patch_of(module)
        if patch is not None:
            found.append((name, module, patch))
            continue
        base = next((p for p in stocks if isinstance(module, p.stock)), None)
        if base is not None and base.kind == ATTENTION:  # a block's subclass keeps its forward around patched attention
            refused.append(
                f"{name or 'model'} is {type(module).__qualname__}, a subclass of {base.name}: "
                "sam_blocked only patches the stock class"
            )
    return found, refused


def attention_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module, ClassPatch]]:
    """find(model)'s attention layers; a ValueError naming the model when there are none."""
    layers = [entry for entry in find(model)[0] if entry[2].kind == ATTENTION]
    if not layers:
        raise no_attention_error(model)
    return layers


def no_attention_error(model: torch.nn.Module) -> ValueError:
    """The error for a model with no supported attention in it: what to pass, and which libraries were looked at."""
    loaded = sorted({p.library for p in imported_patches()})
    return ValueError(
        f"no SAM image-encoder attention found in {type(model).__qualname__}: pass a SAM model of "
        "segment_anything, segment_anything_hq, transformers (SamModel, SamVisionModel, SamHQModel) or timm "
        f"(VisionTransformerSAM), its image encoder, or a module containing them (libraries loaded: {', '.join(loaded)})"
    )


def encoder_call(model: torch.nn.Module) -> Optional[EncoderCall]:
    """How the model's own library runs its image encoder (adapters' encoder_call), or None if no adapter knows it."""
    for name, adapter_name in ADAPTERS.items():
        if name in sys.modules:
            call = importlib.import_module(adapter_name).encoder_call(model)
            if call is not None:
                return call
    return None
