"""Hugging Face transformers: SamVisionAttention and SamVisionSdpaAttention, and the SamHQ copies.

transformers picks the class from `config._attn_implementation` ("eager" or "sdpa", the
default) when the model is built. Both stock forwards build the (B*heads, N, N) rel-pos
bias; eager also the N x N weights, soft-maxed in float32. Their math is segment_anything's
but for two rules, which the blocked forward meets:
- rel-pos tables are always passed through F.interpolate, even to their own length; linear
  interpolation to the same length is the identity (weights 1 and 0), so the tables are used
  as they are, and a table of another length is resized by the same call as
  segment_anything's get_rel_pos (attention.resize_rel_pos);
- eager's softmax runs in float32: blocked attention's running max, sum and accumulator are
  float32 in every dtype.

Both return `(output, weights)`. The blocked forward returns `(output, None)`: no N x N
tensor. When weights are asked for (output_attentions=True, passed or recorded through the
model's output capture) the eager class runs its stock forward for that call and warns
once (its ClassPatch's stock_call, decided before the call: the switch reports it stock); the SDPA class returns None as its stock forward does. Eager's attention dropout
has no blocked counterpart: training with dropout > 0 is refused.

The encoder layers around them (SamVisionLayer, SamHQVisionLayer; kind MLP) keep their
attention call and run their token-wise half a chunk of tokens at a time: the residual
added in place to the attention's fresh output, then x + mlp(layer_norm2(x)) in that
buffer (sam_blocked.encoder.tokenwise.mlp_residual_), stock's arithmetic on fewer tokens at once.
While autograd records, every patched layer runs its stock forward (adapters.base.records_autograd).
"""

from __future__ import annotations

import inspect
import sys
from types import ModuleType
from typing import Optional

import torch

from sam_blocked.adapters.base import MLP, ClassPatch, EncoderCall, class_patch, dropout_reasons, missing_attributes, qkv_reasons, stock_forward_of, warn_once
from sam_blocked.adapters.registry import patched_class_named
from sam_blocked.encoder.layer import BlockConfig, attention_layer
from sam_blocked.encoder.tokenwise import mlp_chunk, mlp_residual_

LIBRARY = "transformers"
MODULES = ("transformers.models.sam.modeling_sam", "transformers.models.sam_hq.modeling_sam_hq")

_ATTRIBUTES = ("qkv", "proj", "num_attention_heads", "scale", "use_rel_pos", "dropout", "training")
_LAYER_ATTRIBUTES = ("layer_norm1", "attn", "layer_norm2", "mlp", "window_size", "window_partition", "window_unpartition")


def _layer(module: torch.nn.Module, config: BlockConfig, hidden_states: torch.Tensor) -> torch.Tensor:
    """(B, H, W, dim) -> (B, H, W, dim), blocked."""
    rel_h, rel_w = (module.rel_pos_h, module.rel_pos_w) if module.use_rel_pos else (None, None)
    return attention_layer(
        hidden_states, module.qkv, module.proj, module.num_attention_heads, module.scale, rel_h, rel_w, config
    )


def _weights_asked(output_attentions: Optional[bool]) -> bool:
    """True when this call's attention weights are wanted: passed in, or being recorded by
    transformers' output capture (capture_outputs hooks SamVisionAttention's output[1])."""
    if output_attentions:
        return True
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # transformers < 5 passes output_attentions down to the layer
        return False
    collected = _active_collector.get()
    return bool(collected) and "attentions" in collected


def _sdpa_reasons(module: torch.nn.Module) -> list[str]:
    why = missing_attributes(module, _ATTRIBUTES)
    if not why and module.use_rel_pos:
        why = missing_attributes(module, ("rel_pos_h", "rel_pos_w"))
    return why or qkv_reasons(module, "num_attention_heads")


def _eager_reasons(module: torch.nn.Module) -> list[str]:
    return _sdpa_reasons(module) or dropout_reasons(module, module.dropout)


def _eager_stock_call(module: torch.nn.Module, hidden_states: torch.Tensor, output_attentions=None) -> Optional[str]:
    """Why this eager call runs stock's forward (its attention weights are wanted), or None."""
    if not _weights_asked(output_attentions):
        return None
    return (
        f"{type(module).__qualname__}: attention weights were asked for (output_attentions=True): "
        "these calls run the stock eager attention, which builds the N x N weights; "
        "blocked attention returns no weights"
    )


def _eager_forward(module: torch.nn.Module, config: BlockConfig, hidden_states: torch.Tensor, output_attentions=None):
    return _layer(module, config, hidden_states), None  # weights asked for: _eager_stock_call ran stock instead


def _sdpa_forward(module: torch.nn.Module, config: BlockConfig, hidden_states: torch.Tensor, output_attentions=False):
    if output_attentions:  # the stock SDPA forward warns the same and returns None too
        warn_once(
            f"transformers-weights-{type(module).__qualname__}",
            f"{type(module).__qualname__} returns no attention weights (output_attentions=True is ignored): "
            "load the model with attn_implementation='eager' to get them from the stock attention",
        )
    return _layer(module, config, hidden_states), None


def _layer_reasons(module: torch.nn.Module) -> list[str]:
    return missing_attributes(module, _LAYER_ATTRIBUTES) or missing_attributes(module.mlp, ("lin1", "act", "lin2"))


def _layer_forward(module: torch.nn.Module, config: BlockConfig, hidden_states: torch.Tensor) -> torch.Tensor:
    """SamVisionLayer.forward with its MLP a chunk of tokens at a time. (B, H, W, dim) -> (B, H, W, dim)."""
    B, H, W, dim = hidden_states.shape
    x = module.layer_norm1(hidden_states)
    if module.window_size > 0:
        x, padding_shape = module.window_partition(x, module.window_size)
    x = module.attn(hidden_states=x)[0]
    if module.window_size > 0:
        x = module.window_unpartition(x, module.window_size, padding_shape, (H, W))
    x = x.contiguous().add_(hidden_states)  # stock: residual + attn, in the attention's fresh output
    mlp = module.mlp
    chunk = mlp_chunk(dim, mlp.lin1.out_features, config.max_block_mb, x.device)
    return mlp_residual_(x, module.layer_norm2, mlp.lin1, mlp.act, mlp.lin2, chunk)


def class_patches(module: ModuleType) -> list[ClassPatch]:
    """The ClassPatches for a loaded modeling_sam or modeling_sam_hq: eager and SDPA attention,
    those that exist, and the encoder layer (when its forward takes hidden_states alone, as
    transformers 5's does)."""
    prefix = "SamHQ" if module.__name__.endswith("sam_hq") else "Sam"
    patches = []
    eager = getattr(module, f"{prefix}VisionAttention", None)
    if eager is not None:
        patches.append(class_patch(LIBRARY, eager, _eager_forward, _eager_reasons, home=__name__, stock_call=_eager_stock_call))
    sdpa = getattr(module, f"{prefix}VisionSdpaAttention", None)
    if sdpa is not None:
        patches.append(class_patch(LIBRARY, sdpa, _sdpa_forward, _sdpa_reasons, home=__name__))
    layer = getattr(module, f"{prefix}VisionLayer", None)
    if layer is not None and list(inspect.signature(stock_forward_of(layer)).parameters) == ["self", "hidden_states"]:
        patches.append(class_patch(LIBRARY, layer, _layer_forward, _layer_reasons, home=__name__, kind=MLP))
    return patches


def model_kind(model: torch.nn.Module) -> Optional[str]:
    """"model" (SamModel, SamHQModel), "vision" (SamVisionModel, SamHQVisionModel), "encoder" (their
    vision encoders), or None for anything else; only transformers modules already imported are asked."""
    for name in MODULES:
        module = sys.modules.get(name)
        if module is None:
            continue
        prefix = "SamHQ" if name.endswith("sam_hq") else "Sam"
        for kind, cls in (("model", "Model"), ("vision", "VisionModel"), ("encoder", "VisionEncoder")):
            if isinstance(model, getattr(module, prefix + cls)):
                return kind
    return None


def encoder_call(model: torch.nn.Module) -> Optional[EncoderCall]:
    """SamModel / SamHQModel (get_image_embeddings), SamVisionModel / SamHQVisionModel and their
    vision encoders (last_hidden_state, and SamHQ's intermediate embeddings); None for other models."""
    kind = model_kind(model)
    if kind is None:
        return None
    if kind == "model":
        return EncoderCall(_image_size(model.vision_encoder), model.get_image_embeddings)
    encoder = model if kind == "encoder" else model.vision_encoder
    return EncoderCall(_image_size(encoder), lambda x: tuple(model(pixel_values=x).values()))


def _image_size(encoder: torch.nn.Module) -> int:
    height, width = encoder.patch_embed.image_size
    if height != width:
        raise ValueError(f"the vision encoder takes {height} x {width} px inputs: verify_equivalence runs square ones")
    return int(height)


def __getattr__(name: str) -> type:  # the Blocked* classes, for unpickling (registry.patched_class_named)
    return patched_class_named(__name__, MODULES, name)
