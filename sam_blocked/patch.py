"""Model surgery: make the SAM image-encoder attention inside one model compute in blocks.

Each supported layer found in the model (sam_blocked.adapters: segment_anything,
segment_anything_hq, transformers, timm) has its class swapped for the adapter's patched
subclass, whose only change is `forward`; its settings live in `blocked_config`, and the
attention runs on the backend they name. The encoder blocks around them are patched
alongside: their norms and MLP run a chunk of tokens at a time (sam_blocked.encoder.block). Nothing else is touched: parameters, buffers
and state_dict keys stay as they were, so a checkpoint loads before or after patching,
and unpatching swaps the class back. For every model of the process at once, without the
model object, see sam_blocked.switch (enable / disable).

A patched model scripts, traces and exports (torch.jit, torch.fx, torch.export, ONNX) as a
stock one does, computing stock attention there (sam_blocked.adapters.base: compiled, not run).
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import segment_anything.modeling.image_encoder as _sam_image_encoder
import torch

from sam_blocked import adapters
from sam_blocked.adapters import state
from sam_blocked.adapters.base import ATTENTION, STOCK_FLAG, ClassPatch
from sam_blocked.attention.common import DEFAULT_CHUNKS
from sam_blocked.encoder.layer import BlockConfig, check_config

__all__ = ["BlockConfig", "BlockedAttention", "BlockedBlock", "BlockedPatchEmbed", "is_patched", "patch_sam", "patched", "sam_attentions", "stock", "unpatch_sam"]

# segment_anything's patched Attention, Block and PatchEmbed (the adapters' registry knows every library's).
BlockedAttention, BlockedBlock, BlockedPatchEmbed = (p.patched for p in adapters.patches_of(_sam_image_encoder))


def sam_attentions(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """Every supported SAM image-encoder attention inside `model` (or `model` itself), of any library."""
    return [(name, module) for name, module, _ in adapters.attention_layers(model)]


def patch_sam(
    model: torch.nn.Module,
    chunks: int = DEFAULT_CHUNKS,
    max_block_mb: Optional[float] = None,
    backend: str = "auto",
) -> torch.nn.Module:
    """Make every SAM image-encoder attention in `model` compute in blocks, in place.

    Global and windowed blocks alike. Patching a patched model only updates the settings.

    Args:
        model: a SAM model or its image encoder, one attention layer, or any module
            containing them, of segment_anything (Sam), segment_anything_hq (Sam),
            transformers (SamModel, SamVisionModel, SamHQModel, SamHQVisionModel) or timm
            (VisionTransformerSAM).
        chunks: blocks per (batch*head) score matrix: q_bands x k_bands (16 -> 4 x 4).
        max_block_mb: instead of chunks, a budget in MiB for the largest float32 score
            block; the blocking is then chosen per layer and per input size.
        backend: one of sam_blocked.attention.dispatch.BACKENDS (the module's docstring says
            what each computes), or "auto": chosen per call from the device, dtype and token
            grid. A named backend that cannot run a call raises a ValueError from forward
            saying why.

    Returns:
        `model`, patched.
    """
    config = check_config(chunks, max_block_mb, backend)
    layers = _layers(model)
    problems = [f"{name or 'model'} ({patch.name}): {'; '.join(why)}" for name, module, patch in layers if (why := patch.reasons(module))]
    if problems:
        raise ValueError("cannot patch " + "; ".join(problems))
    for _, module, patch in layers:
        module.__class__ = patch.patched
        module.blocked_config = config
    return model


def unpatch_sam(model: torch.nn.Module) -> torch.nn.Module:
    """Remove what patch_sam did everywhere in `model`; returns `model`.

    The layers are then stock, unless sam_blocked.enable() is on: then they follow it
    (use `stock(model)` to run stock attention whatever the switch says).
    """
    for _, module, patch in _layers(model):
        if type(module) is patch.patched:
            module.__class__ = patch.stock
            module.__dict__.pop("blocked_config", None)
    return model


def is_patched(model: torch.nn.Module) -> bool:
    """True when every SAM attention in `model`, and every encoder block around one, runs
    blocked: patched by patch_sam, or by enable()."""
    adapters.attention_layers(model)  # a ValueError when there is none
    return all(
        type(module) is patch.patched or state.runs_blocked(module, patch)
        for _, module, patch in adapters.find(model)[0]
    )


@contextlib.contextmanager
def patched(
    model: torch.nn.Module,
    chunks: int = DEFAULT_CHUNKS,
    max_block_mb: Optional[float] = None,
    backend: str = "auto",
) -> Iterator[torch.nn.Module]:
    """Patch `model` for the `with` body, then put each layer back as it was, also on an exception."""
    before = _snapshot(model)
    patch_sam(model, chunks, max_block_mb, backend)
    try:
        yield model
    finally:
        _restore(before)


@contextlib.contextmanager
def stock(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Run `model` with stock attention for the `with` body (also while enable() is on), then restore it."""
    before = _snapshot(model)
    unpatch_sam(model)
    for _, module, _ in _layers(model):
        module.__dict__[STOCK_FLAG] = True
    try:
        yield model
    finally:
        _restore(before)


def _layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module, ClassPatch]]:
    """Every supported layer in `model`; a ValueError for a subclass of one, or when there is no attention."""
    layers, refused = adapters.find(model)
    if refused:
        raise ValueError("; ".join(refused))
    if not any(patch.kind == ATTENTION for _, _, patch in layers):
        raise adapters.no_attention_error(model)
    return layers


_Snapshot = list[tuple[torch.nn.Module, type, dict]]
_STATE = ("blocked_config", STOCK_FLAG)


def _snapshot(model: torch.nn.Module) -> _Snapshot:
    return [(m, type(m), {k: m.__dict__[k] for k in _STATE if k in m.__dict__}) for _, m, _ in _layers(model)]


def _restore(before: _Snapshot) -> None:
    for module, cls, state in before:
        module.__class__ = cls
        for key in _STATE:
            module.__dict__.pop(key, None)
        module.__dict__.update(state)
