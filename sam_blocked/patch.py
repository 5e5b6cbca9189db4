"""Model surgery: make segment_anything's image-encoder Attention compute in blocks.

Each stock `Attention` found in the model has its class swapped for `BlockedAttention`, a
subclass whose only change is `forward` (sam_blocked.layer.attention_layer); its settings
live in `blocked_config`, and the attention itself runs on the backend they name. Nothing
else is touched: parameters, buffers and state_dict keys stay as they were, so a
checkpoint loads before or after patching, and unpatching swaps the class back.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
from segment_anything.modeling.image_encoder import Attention

from sam_blocked.attention import DEFAULT_CHUNKS
from sam_blocked.layer import BlockConfig, attention_layer, check_config


class BlockedAttention(Attention):
    """segment_anything's Attention with the same parameters and a blocked forward."""

    blocked_config: BlockConfig

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rel_h, rel_w = (self.rel_pos_h, self.rel_pos_w) if self.use_rel_pos else (None, None)
        return attention_layer(x, self.qkv, self.proj, self.num_heads, self.scale, rel_h, rel_w, self.blocked_config)


def _check_attention(name: str, module: Attention) -> None:
    if type(module) not in (Attention, BlockedAttention):
        raise ValueError(
            f"{name or 'model'} is {type(module).__qualname__}, a subclass of segment_anything's Attention "
            "with a forward of its own: sam_blocked only patches the stock class"
        )
    missing = [a for a in ("qkv", "proj", "num_heads", "scale", "use_rel_pos") if not hasattr(module, a)]
    if module.use_rel_pos if hasattr(module, "use_rel_pos") else False:
        missing += [a for a in ("rel_pos_h", "rel_pos_w") if not hasattr(module, a)]
    if missing:
        raise ValueError(
            f"{name or 'model'} lacks {', '.join(missing)}: this segment_anything version's Attention "
            "is not the one sam_blocked was written against"
        )
    if module.qkv.out_features % (3 * module.num_heads):
        raise ValueError(f"{name}: qkv has {module.qkv.out_features} outputs, not 3 x heads x head_dim")


def sam_attentions(model: torch.nn.Module) -> list[tuple[str, Attention]]:
    """Every segment_anything image-encoder Attention inside `model` (or `model` itself)."""
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, Attention)]
    if not found:
        raise ValueError(
            f"no segment_anything image-encoder Attention found in {type(model).__qualname__}: "
            "pass a Sam, its image_encoder, or a module containing them"
        )
    return found


def patch_sam(
    model: torch.nn.Module,
    chunks: int = DEFAULT_CHUNKS,
    max_block_mb: Optional[float] = None,
    backend: str = "auto",
) -> torch.nn.Module:
    """Make every SAM image-encoder Attention in `model` compute in blocks, in place.

    Global and windowed blocks alike. Patching a patched model only updates the settings.

    Args:
        model: a Sam, an ImageEncoderViT, an Attention, or any module containing them.
        chunks: blocks per (batch*head) score matrix: q_bands x k_bands (16 -> 4 x 4).
        max_block_mb: instead of chunks, a budget in MiB for the largest float32 score
            block; the blocking is then chosen per layer and per input size.
        backend: "blocked", "sdpa", "flashbias", "flex" (sam_blocked.backends), or "auto":
            chosen per call from the device, dtype and token grid. A named backend that
            cannot run a call raises a ValueError from forward saying why.

    Returns:
        `model`, patched.
    """
    config = check_config(chunks, max_block_mb, backend)
    attentions = sam_attentions(model)
    for name, module in attentions:
        _check_attention(name, module)
    for _, module in attentions:
        module.__class__ = BlockedAttention
        module.blocked_config = config
    return model


def unpatch_sam(model: torch.nn.Module) -> torch.nn.Module:
    """Restore stock segment_anything attention everywhere in `model`; returns `model`."""
    for _, module in sam_attentions(model):
        if isinstance(module, BlockedAttention):
            module.__class__ = Attention
            del module.blocked_config
    return model


def is_patched(model: torch.nn.Module) -> bool:
    """True when every SAM Attention in `model` is patched."""
    return all(isinstance(m, BlockedAttention) for _, m in sam_attentions(model))


@contextlib.contextmanager
def patched(
    model: torch.nn.Module,
    chunks: int = DEFAULT_CHUNKS,
    max_block_mb: Optional[float] = None,
    backend: str = "auto",
) -> Iterator[torch.nn.Module]:
    """Patch `model` for the `with` body, then put each Attention back as it was, also on an exception."""
    before = _snapshot(model)
    patch_sam(model, chunks, max_block_mb, backend)
    try:
        yield model
    finally:
        _restore(before)


@contextlib.contextmanager
def stock(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Run `model` with stock attention for the `with` body, then restore its patches."""
    before = _snapshot(model)
    unpatch_sam(model)
    try:
        yield model
    finally:
        _restore(before)


def _snapshot(model: torch.nn.Module) -> list[tuple[Attention, Optional[BlockConfig]]]:
    return [(m, getattr(m, "blocked_config", None)) for _, m in sam_attentions(model)]


def _restore(before: list[tuple[Attention, Optional[BlockConfig]]]) -> None:
    for module, config in before:
        if config is None:
            module.__class__ = Attention
            module.__dict__.pop("blocked_config", None)
        else:
            module.__class__ = BlockedAttention
            module.blocked_config = config
