"""The position embedding at another token grid, and the checks every model's resize shares.

Used by sam_blocked.resolution.sam (segment_anything, SAM-HQ) and
sam_blocked.resolution.transformers; neither imports the other's rules.
"""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F

_ORIGINAL = "_sam_blocked_pos_embed_original"  # (1, g0, g0, C), the embedding before any resize


def resample_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """SAM's absolute position embedding at another token grid, bicubic, in float32.

    Args:
        pos_embed: (1, H, W, C), any dtype and device.
        grid: side of the new square grid.

    Returns:
        (1, grid, grid, C) in pos_embed's dtype and device; pos_embed itself if the grid is unchanged.
    """
    if tuple(pos_embed.shape[1:3]) == (grid, grid):
        return pos_embed
    out = F.interpolate(
        pos_embed.float().permute(0, 3, 1, 2),  # (1, C, H, W)
        size=(grid, grid),
        mode="bicubic",
        align_corners=False,
        antialias=True,
    )
    return out.permute(0, 2, 3, 1).to(pos_embed.dtype)  # (1, grid, grid, C)


def set_pos_embed_grid(encoder: torch.nn.Module, grid: int) -> None:
    """Resample encoder.pos_embed, (1, g, g, C), to a grid x grid one from the original (kept, see the module doc)."""
    current = encoder.pos_embed.detach()
    original = getattr(encoder, _ORIGINAL, None)
    if original is not None:
        installed = resample_pos_embed(original, current.shape[1]).to(current.device, current.dtype)
        if not torch.equal(current, installed):
            original = None  # loaded or trained since it was resized: the current one is the original now
    if original is None:
        if current.shape[1] == grid:
            encoder.__dict__.pop(_ORIGINAL, None)
            return
        original = current.clone()
    if original.shape[1] == grid:
        encoder.__dict__.pop(_ORIGINAL, None)
    else:
        # A plain attribute: not in state_dict, and .to()/.half() leave it as it is.
        encoder.__dict__[_ORIGINAL] = original
    # `.data` keeps the Parameter object (its requires_grad, any optimizer's reference).
    encoder.pos_embed.data = resample_pos_embed(original, grid).to(current.device, current.dtype)


def patch_size_of(proj: torch.nn.Conv2d) -> int:
    """The patch side of a patch-embedding convolution; a ValueError unless its patches are square,
    non-overlapping and unpadded, as SAM's are."""
    stride, kernel = tuple(proj.stride), tuple(proj.kernel_size)
    if stride[0] != stride[1] or kernel != stride or tuple(proj.padding) != (0, 0):
        raise ValueError(
            f"patch embedding has kernel {kernel}, stride {stride}, padding {tuple(proj.padding)}: "
            "set_image_size needs square, non-overlapping, unpadded patches as in SAM"
        )
    return stride[0]


def check_size(size: int, patch: int) -> int:
    """`size` as an int, or a ValueError unless it is a positive multiple of `patch`."""
    if isinstance(size, bool) or not isinstance(size, numbers.Integral):
        raise ValueError(
            f"image size must be a whole number of pixels (one side of the square input), got {size!r}"
        )
    size = int(size)
    if size <= 0:
        raise ValueError(f"image size must be > 0 pixels, got {size}")
    if size % patch:
        lower, upper = size // patch * patch, (size // patch + 1) * patch
        nearest = f"{lower} or {upper}" if lower else f"{upper}"
        raise ValueError(f"image size {size} is not a multiple of the patch size {patch}: use {nearest}")
    return size
