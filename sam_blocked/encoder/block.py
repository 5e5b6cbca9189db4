"""One SAM image-encoder Block (ViTDet's), computed at the memory floor, whatever library built it.

Stock segment_anything's Block.forward holds, besides its input, the normalized input, the
padded and partitioned windows, q/k/v and their permuted copy, the attention output and its
un-permuted copy, then the MLP's input, its 4 x dim hidden layer and GELU's copy of it: about
11 token activations (tokens x dim) at once. Here, with the input held by the caller:

- global blocks: norm1(x) (1 activation), the attention's heads (1; q/k/v a few heads at a
  time, sam_blocked.encoder.layer.attention_heads), then the projection written chunk by chunk into
  the heads' own buffer together with the residual (tokenwise.linear_residual_);
- windowed blocks: a few windows at a time are gathered from norm1(x) without padding the
  grid, attended, projected and added to the residual in a new output buffer;
- then, in that buffer, x + mlp(norm2(x)) a chunk of tokens at a time (tokenwise.mlp_residual_).

The input is never written: callers (sam_hq's encoder keeps the global blocks' outputs)
see stock's semantics. Every step is stock's own arithmetic on fewer tokens at a time, so
the output equals stock's to float rounding. With autograd recording, the patched Block
runs stock's forward instead (in-place steps would overwrite what backward needs): the
adapters check that (adapters.base.records_autograd) before calling in.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional

import torch

from sam_blocked.attention.threads import run_steps, step_threads
from sam_blocked.encoder.layer import BlockConfig, attention_heads, attention_layer
from sam_blocked.encoder.tokenwise import (
    WindowStep,
    grid_parts,
    linear_residual_,
    mlp_chunk,
    mlp_residual_,
    window_chunk,
    window_parts,
    window_steps,
    windows_per_step,
)

Tensor = torch.Tensor
Module = Callable[[Tensor], Tensor]


class MLPParts(NamedTuple):
    """SAM's MLPBlock: lin2(act(lin1(x)))."""

    lin1: torch.nn.Linear
    act: Module
    lin2: torch.nn.Linear


class AttentionParts(NamedTuple):
    """What attention_layer needs of an Attention module: its weights and shape."""

    qkv: torch.nn.Linear
    proj: torch.nn.Linear
    num_heads: int
    scale: float
    rel_pos_h: Optional[Tensor]
    rel_pos_w: Optional[Tensor]


def encoder_block(
    x: Tensor,
    norm1: Module,
    attn: AttentionParts,
    norm2: Module,
    mlp: MLPParts,
    window_size: int,
    config: BlockConfig,
) -> Tensor:
    """y = x + attn(norm1(x)) (in windows when window_size > 0); y + mlp(norm2(y)), exactly.

    Args:
        x: (B, H, W, dim); read only.
        norm1, norm2: token-wise norms (LayerNorm).
        attn: the block's Attention weights (AttentionParts).
        mlp: the token-wise MLP's parts, dim -> hidden -> dim.
        window_size: 0 for global attention, else the window side in tokens.
        config: the patch's settings; max_block_mb (or, under chunks, tokenwise's
            default) also sizes the token chunks.

    Returns:
        (B, H, W, dim), a new contiguous tensor in x's dtype.
    """
    dim = x.shape[-1]
    chunk = mlp_chunk(dim, mlp.lin1.out_features, config.max_block_mb, x.device)
    if window_size > 0:
        y = windowed_attention_residual(x, norm1, attn, window_size, config, window_chunk(dim, config.max_block_mb, x.device))
    else:
        heads = attention_heads(norm1(x), attn.qkv, attn.num_heads, attn.scale, attn.rel_pos_h, attn.rel_pos_w, config)
        y = linear_residual_(x, heads, attn.proj, chunk)  # (B, H, W, dim): the heads' buffer, now x + proj(heads)
    return mlp_residual_(y, norm2, *mlp, chunk)


def windowed_attention_residual(
    x: Tensor,
    norm1: Module,
    attn: AttentionParts,
    window_size: int,
    config: BlockConfig,
    chunk: int,
) -> Tensor:
    """x + unpartition(attn(partition(norm1(x)))) as stock's windowed Block, a few windows at a time.

    Stock pads norm1(x) with zeros to whole windows, and those zero tokens take part in
    each edge window's attention as keys; each step's window buffer starts at zero so
    they do here too.

    Args:
        x: (B, H, W, dim); read only.
        norm1: token-wise norm.
        attn: the Attention's weights.
        window_size: ws, the window side in tokens.
        config: the patch's settings.
        chunk: tokens per step, about (windows_per_step).

    Returns:
        (B, H, W, dim), new.
    """
    B, H, W, dim = x.shape
    ws = window_size
    per_step = windows_per_step(B, ws, chunk)
    y = torch.empty_like(x, memory_format=torch.contiguous_format)  # (B, H, W, dim)
    threads = step_threads(x.device)
    buffers: list[Optional[Tensor]] = [None] * threads  # each thread's windows, reused step after step

    def run(step: WindowStep, slot: int) -> None:
        if buffers[slot] is None:
            buffers[slot] = x.new_empty(B * min(per_step, math.ceil(W / ws)) * ws * ws * dim)
        rows, cols = slice(step.r0, step.r1), slice(step.c0, step.c1)
        windows = buffers[slot][: B * step.k * ws * ws * dim].view(B * step.k, ws, ws, dim).zero_()  # zero where stock pads
        normed = norm1(x[:, rows, cols])  # (B, r, c, dim)
        for window, part in zip(window_parts(windows, step, ws), grid_parts(normed, step, ws)):
            window.copy_(part)
        del normed
        out = attention_layer(windows, attn.qkv, attn.proj, attn.num_heads, attn.scale, attn.rel_pos_h, attn.rel_pos_w, config)
        for window, short, dest in zip(window_parts(out, step, ws), grid_parts(x[:, rows, cols], step, ws), grid_parts(y[:, rows, cols], step, ws)):
            torch.add(short, window, out=dest)  # stock: shortcut + unpartitioned attention

    run_steps(run, list(window_steps((H, W), ws, per_step)), threads)
    return y
