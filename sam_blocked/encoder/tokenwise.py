"""The token-wise half of a ViT block, a chunk of tokens at a time, in place where exact.

LayerNorm, the MLP and the output projection act on each token alone, so running them on
`chunk` tokens at a time gives stock's result while only a chunk's hidden layer (tokens x
mlp_dim) exists at once, instead of the whole image's (4 x dim per token, and GELU's
copy). The residual adds then go straight into a buffer the block owns:

- mlp_residual_:    x <- x + mlp(norm(x)), chunk by chunk, in x's storage (GELU in place);
- linear_residual_: o <- x + proj(o), chunk by chunk, in o's storage (o is the attention's
  output, whose chunk is read before it is overwritten);
- window geometry: which token rectangles hold a step's windows (window_steps), and the
  strided views that move them between the (B, H, W, D) grid and (B * k, ws, ws, D)
  windows without padded copies (window_parts, grid_parts);
- patch_embedding: the patch embedding's convolution a band of patch rows at a time, into
  the (B, H, W, D) buffer the encoder reads (oneDNN's half-precision convolution of a
  whole image otherwise takes a workspace of 8 KiB a token on the CPU: 512 MiB at 4096 px).

`token_chunk` sizes the chunks from the same budget as the attention blocks: a step's
float32 working set, (chunk, width), within max_block_mb and DEFAULT_TOKEN_BYTES.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator, NamedTuple, Optional

import torch

from sam_blocked.attention.common import FP32_BYTES, step_budget
from sam_blocked.attention.threads import run_steps, step_threads

Tensor = torch.Tensor
Module = Callable[[Tensor], Tensor]

# A token step's working set under `chunks` (no max_block_mb); on the CPU at most
# common.CPU_STEP_BYTES either way (GEMMs of a few hundred tokens already run at full
# rate there, and larger freed steps linger in glibc's heap).
DEFAULT_TOKEN_BYTES = 32 * 2**20


def token_chunk(width: int, max_block_mb: Optional[float] = None, device: Optional[torch.device | str] = "cpu") -> int:
    """Tokens per chunk: as many as keep a float32 (tokens, width) working set within
    max_block_mb (or DEFAULT_TOKEN_BYTES), on the CPU within CPU_STEP_BYTES; at least 1.

    Args:
        width: what one token of the step holds at once, in float32 numbers.
        max_block_mb: the patch's budget in MiB, or None (under `chunks`).
        device: where the step runs.
    """
    budget = step_budget(DEFAULT_TOKEN_BYTES if max_block_mb is None else int(max_block_mb * 2**20), device)
    return max(1, budget // (width * FP32_BYTES))


def mlp_chunk(dim: int, mlp_dim: int, max_block_mb: Optional[float] = None, device: Optional[torch.device | str] = "cpu") -> int:
    """Tokens per MLP step: the norm or the output beside the hidden layer (GELU runs in
    place), dim + mlp_dim a token."""
    return token_chunk(dim + mlp_dim, max_block_mb, device)


def window_chunk(dim: int, max_block_mb: Optional[float] = None, device: Optional[torch.device | str] = "cpu") -> int:
    """Tokens per windowed-attention step: the windows, their norm, the heads and the
    projection, 4 * dim a token (q, k, v and the kernel's workspace are the attention's,
    bounded by its own plan)."""
    return token_chunk(4 * dim, max_block_mb, device)


def embed_chunk(dim: int, pixels: int, max_block_mb: Optional[float] = None, device: Optional[torch.device | str] = "cpu") -> int:
    """Tokens per patch-embedding step: a band's pixels and its convolution's output,
    pixels + 2 * dim a token (the output, and its copy into the encoder's layout)."""
    return token_chunk(pixels + 2 * dim, max_block_mb, device)


def patch_embedding(x: Tensor, proj: torch.nn.Conv2d, chunk: int) -> Tensor:
    """proj(x).permute(0, 2, 3, 1), as SAM's PatchEmbed, a band of patch rows at a time.

    Output row r reads input rows [r * stride, r * stride + kernel), so a band of rows is
    the same convolution on a slice of x; the bands are copied into one contiguous
    (B, H', W', dim) buffer, the layout the encoder's blocks read.

    Args:
        x: (B, C, H, W) image.
        proj: the embedding's Conv2d, without padding or dilation.
        chunk: tokens per band, about (embed_chunk).

    Returns:
        (B, H', W', dim), contiguous, in the convolution's output dtype.
    """
    if proj.padding != (0, 0) or proj.dilation != (1, 1):
        raise ValueError(f"patch_embedding takes a convolution without padding or dilation, got padding {proj.padding}, dilation {proj.dilation}")
    (kh, kw), (sh, sw) = proj.kernel_size, proj.stride
    B, _, H, W = x.shape
    rows_out, cols_out = (H - kh) // sh + 1, (W - kw) // sw + 1
    per_band = max(1, chunk // (B * cols_out))
    out: Optional[Tensor] = None
    for r0 in range(0, rows_out, per_band):
        r1 = min(rows_out, r0 + per_band)
        band = proj(x[:, :, r0 * sh : (r1 - 1) * sh + kh])  # (B, dim, r1 - r0, W')
        if out is None:  # in the convolution's output dtype (autocast may change it)
            out = band.new_empty(B, rows_out, cols_out, band.shape[1])  # (B, H', W', dim)
        out[:, r0:r1] = band.permute(0, 2, 3, 1)
        del band
    return out


def token_rows(x: Tensor) -> Tensor:
    """x (..., D) as (tokens, D), a view: token-wise math needs x contiguous."""
    if not x.is_contiguous():
        raise ValueError("token-wise steps write in place and need a contiguous tensor")
    return x.view(-1, x.shape[-1])  # (T, D)


def mlp_residual_(x: Tensor, norm: Module, lin1: Module, act: Module, lin2: Module, chunk: int) -> Tensor:
    """x + lin2(act(lin1(norm(x)))), written into x, `chunk` tokens at a time; returns x.

    Args:
        x: (..., D), contiguous; overwritten.
        norm: token-wise norm (LayerNorm), D -> D.
        lin1, act, lin2: the MLP (SAM's MLPBlock), D -> hidden -> D; an nn.GELU runs in
            place on the hidden layer (the same kernel as stock's, without its copy).
        chunk: tokens per step (mlp_chunk).
    """
    flat = token_rows(x)  # (T, D)

    def step(t0: int, slot: int) -> None:
        rows = flat[t0 : t0 + chunk]  # (c, D)
        hidden = activate_(act, lin1(norm(rows)))  # (c, hidden)
        rows.add_(lin2(hidden))  # stock: x + mlp(norm2(x)), the same add

    run_steps(step, range(0, flat.shape[0], chunk), step_threads(x.device))
    return x


def activate_(act: Module, x: Tensor) -> Tensor:
    """act(x), in x's storage when act is a plain nn.GELU or transformers' GELUActivation
    running F.gelu (aten's in-place gelu, same kernel)."""
    if type(act) is torch.nn.GELU:
        return torch.ops.aten.gelu_(x, approximate=act.approximate)
    if type(act).__name__ == "GELUActivation" and getattr(act, "act", None) is torch.nn.functional.gelu:
        return torch.ops.aten.gelu_(x)
    return act(x)


def linear_residual_(x: Tensor, o: Tensor, proj: Callable[[Tensor], Tensor], chunk: int) -> Tensor:
    """x + proj(o), written into o, `chunk` tokens at a time; returns o.

    Args:
        x: (..., D), the residual; read only.
        o: (..., Din), contiguous, the attention's heads; overwritten (Din == D).
        proj: token-wise Linear Din -> D.
        chunk: tokens per step.
    """
    if o.shape[-1] != x.shape[-1]:
        raise ValueError(f"the projection's input width {o.shape[-1]} differs from the residual's {x.shape[-1]}")
    rows_o, rows_x = token_rows(o), x.reshape(-1, x.shape[-1])  # (T, D)

    def step(t0: int, slot: int) -> None:
        out = rows_o[t0 : t0 + chunk]
        torch.add(rows_x[t0 : t0 + chunk], proj(out), out=out)  # stock: shortcut + proj(o); proj read this chunk first

    run_steps(step, range(0, rows_o.shape[0], chunk), step_threads(o.device))
    return o


# --- windows -------------------------------------------------------------------------------


class WindowStep(NamedTuple):
    """k windows of one window row: token rows [r0, r1) and columns [c0, c1) of the grid
    (r1 - r0 <= ws and c1 - c0 <= k * ws; the rest of the k windows is padding)."""

    r0: int
    r1: int
    c0: int
    c1: int
    k: int


def window_steps(grid: tuple[int, int], ws: int, windows_per_step: int) -> Iterator[WindowStep]:
    """Steps over the ceil(H / ws) x ceil(W / ws) windows of an (H, W) grid, row by row,
    at most `windows_per_step` windows of one window row each."""
    H, W = grid
    nw = math.ceil(W / ws)
    per = max(1, min(nw, windows_per_step))
    for r0 in range(0, H, ws):
        for j in range(0, nw, per):
            k = min(per, nw - j)
            yield WindowStep(r0, min(H, r0 + ws), j * ws, min(W, (j + k) * ws), k)


def window_parts(windows: Tensor, step: WindowStep, ws: int) -> list[Tensor]:
    """The step's (B * k, ws, ws, D) windows as they lie on the grid: (B, rows, k_i, w_i, D)
    views, the whole windows first, then the last one cropped to the grid (as grid_parts)."""
    B = windows.shape[0] // step.k
    on_grid = windows.view(B, step.k, ws, ws, windows.shape[-1]).permute(0, 2, 1, 3, 4)  # (B, ws, k, ws, D)
    rows, full, last = _step_shape(step, ws)
    parts = [on_grid[:, :rows, :full]] if full else []
    return parts + ([on_grid[:, :rows, full:, :last]] if last else [])


def grid_parts(region: Tensor, step: WindowStep, ws: int) -> list[Tensor]:
    """The step's (B, rows, cols, D) region of the grid cut as window_parts cuts its windows:
    (B, rows, k_i, w_i, D) views. Copying between the two moves windows without a padded copy."""
    _, full, last = _step_shape(step, ws)
    parts = [region[:, :, : full * ws].unflatten(2, (full, ws))] if full else []
    return parts + ([region[:, :, full * ws :].unsqueeze(2)] if last else [])  # (B, rows, 1, last, D)


def _step_shape(step: WindowStep, ws: int) -> tuple[int, int, int]:
    cols = step.c1 - step.c0
    full = cols // ws  # whole windows in the step
    return step.r1 - step.r0, full, cols - full * ws


def windows_per_step(batch: int, ws: int, chunk: int) -> int:
    """Windows per step: as many as hold about `chunk` tokens over the batch, at least 1."""
    return max(1, chunk // (batch * ws * ws))
