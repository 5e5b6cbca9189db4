"""SAM's attention with decomposed relative position, computed exactly in blocks.

Stock segment_anything builds the (B*heads, N, N) score matrix, adds an (N, N)-shaped
relative-position bias and takes a softmax (N = H*W tokens). Here the queries are cut
into row-bands and the keys into row-bands; each (query band, key band) block gets its
own slices of the rel_h / rel_w terms and is folded into an online softmax whose running
max, sum and output accumulator are float32. No N x N tensor, scores or bias, is built.

Blocking rule, for a token grid of H rows and W columns:
- `chunks` = q_bands x k_bands, the two factors as close as possible, the larger for
  the queries (16 -> 4 x 4, 8 -> 4 x 2, 7 -> 7 x 1). Bands hold whole token rows, so a
  band count above H is clamped to H (a 5-row grid asked for 64 chunks gets 5 x 5).
- `max_block_mb` instead picks the fewest n x n bands whose float32 score block for one
  (batch*head) row fits the budget, per call, so memory stays flat as the grid grows.
- batch*head rows are then taken `group` at a time: as many as keep the block within the
  budget (with `chunks`, within DEFAULT_GROUP_BYTES), at least one.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from sam_blocked.attention.common import (
    FP32_BYTES,
    DEFAULT_CHUNKS,
    DEFAULT_GROUP_BYTES,
    BlockPlan,
    band_rows,
    chunk_bands,
    check_attention_inputs,
    check_plan_args,
    decomposed_rel_pos,
    kernel_output,
    rel_pos_tables,
    row_groups,
    step_rows,
)

Tensor = torch.Tensor


def plan_blocks(
    batch_heads: int,
    grid: Tuple[int, int],
    chunks: int = DEFAULT_CHUNKS,
    max_block_mb: Optional[float] = None,
) -> BlockPlan:
    """Choose the blocking for `batch_heads` rows of attention over an (H, W) token grid.

    Args:
        batch_heads: B*heads, the leading dimension of q, k, v.
        grid: (H, W) token grid; N = H*W.
        chunks: blocks per (batch*head) row when no budget is given (see module doc).
        max_block_mb: budget in MiB for the largest float32 score block; overrides chunks.
    """
    check_plan_args(grid, max_block_mb)
    H, W = grid

    def row_block_bytes(q_bands: int, k_bands: int) -> int:
        return math.ceil(H / q_bands) * W * math.ceil(H / k_bands) * W * FP32_BYTES

    if max_block_mb is None:
        q_bands, k_bands = (min(b, H) for b in chunk_bands(chunks))
        budget = max(DEFAULT_GROUP_BYTES, row_block_bytes(q_bands, k_bands))
    else:
        budget = int(max_block_mb * 2**20)
        smallest = row_block_bytes(H, H)
        if smallest > budget:
            raise ValueError(
                f"max_block_mb={max_block_mb} is below the smallest block for a {H} x {W} token grid "
                f"(one row of queries by one row of keys, {smallest / 2**20:.3f} MiB): raise max_block_mb"
            )
        n = 1
        while row_block_bytes(n, n) > budget:
            n += 1
        q_bands = k_bands = n
    per_row = row_block_bytes(q_bands, k_bands)
    group = max(1, min(batch_heads, budget // per_row))
    return BlockPlan(q_bands, k_bands, group, group * per_row)


def workspace_bytes(plan: BlockPlan, batch_heads: int, grid: Tuple[int, int], head_dim: int, dtype: torch.dtype, strided_out: bool = False) -> int:
    """Bytes blocked_attention holds beyond q, k, v and out, at its largest step, with SAM's
    rel-pos tables: the float32 score block, a band's rel_h and rel_w, the band's float32
    accumulators, and k and v in float32 when they are not.

    Args:
        plan: the call's plan (plan_blocks).
        batch_heads: B*heads of the call's q, k, v.
        grid: (H, W) token grid.
        head_dim: C.
        dtype: of q, k, v.
        strided_out: unused (the band's output is copied into `out` either way).
    """
    H, W = grid
    rows, band = step_rows(plan, batch_heads, grid)
    rel = rows * band * (H + W) * FP32_BYTES  # rel_h, rel_w
    off_float = 2 * rows * H * W * head_dim * FP32_BYTES if dtype.itemsize != FP32_BYTES else 0  # k, v in float32
    scores = rows * (plan.block_bytes // plan.group)  # the score buffer holds the call's rows, not the plan's group
    return scores + rel + 2 * rows * band * head_dim * FP32_BYTES + off_float


def blocked_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    grid: Tuple[int, int],
    rel_pos_h: Optional[Tensor] = None,
    rel_pos_w: Optional[Tensor] = None,
    *,
    scale: Optional[float] = None,
    chunks: int = DEFAULT_CHUNKS,
    max_block_mb: Optional[float] = None,
    plan: Optional[BlockPlan] = None,
    out: Optional[Tensor] = None,
) -> Tensor:
    """softmax(q k^T * scale + rel_h + rel_w) v, exactly, block by block.

    Args:
        q, k, v: (B*heads, H*W, C), same dtype (float32, bfloat16 or float16) and device.
        grid: (H, W), the token grid; tokens are in row-major order.
        rel_pos_h, rel_pos_w: SAM's tables, (Lh, C) and (Lw, C), or both None. Tables whose
            length is not 2*H-1 / 2*W-1 are resized as segment_anything's get_rel_pos does.
        scale: multiplies q k^T; default C**-0.5.
        chunks, max_block_mb: the blocking, see plan_blocks; `plan` overrides both.
        out: where to write the result, (B*heads, H*W, Cv), any strides; default new.

    Returns:
        (B*heads, H*W, C) in q's dtype (`out` when given).
    """
    check_attention_inputs(q, k, v, grid, rel_pos_h, rel_pos_w)
    H, W = grid
    BH, N, C = q.shape
    if scale is None:
        scale = C**-0.5
    if plan is None:
        plan = plan_blocks(BH, grid, chunks, max_block_mb)

    # Matmuls run in the input dtype on accelerators and in float32 on the CPU, where
    # half-precision matmul is slow; softmax statistics and accumulators are float32.
    mm_dtype = torch.float32 if q.device.type == "cpu" else q.dtype
    tables = rel_pos_tables(rel_pos_h, rel_pos_w, grid)

    out = kernel_output(out, q, v)  # (B*heads, N, Cv)
    q_ranges = band_rows(H, plan.q_bands)
    k_ranges = band_rows(H, plan.k_bands)
    # One float32 score buffer for every block (written by bmm in place when the matmul runs in float32).
    largest = min(plan.group, BH) * max(b - a for a, b in q_ranges) * max(b - a for a, b in k_ranges) * W * W
    scores = q.new_empty(largest, dtype=torch.float32) if mm_dtype == torch.float32 else None
    for g0, g1 in row_groups(BH, plan.group):
        k_g = k[g0:g1].to(mm_dtype)  # (G, N, C)
        v_g = v[g0:g1].to(mm_dtype)  # (G, N, Cv)
        for qa, qb in q_ranges:
            q_blk = q[g0:g1, qa * W : qb * W]  # (G, Nq, C)
            rows = qb - qa
            rel = None
            if tables is not None:
                rel = decomposed_rel_pos(q_blk.float().view(g1 - g0, rows, W, C), *tables, qa)
            q_blk = (q_blk * scale).to(mm_dtype)
            o_blk = _online_softmax_band(q_blk, k_g, v_g, k_ranges, W, rel, scores)
            out[g0:g1, qa * W : qb * W] = o_blk.to(q.dtype)
    return out


def _online_softmax_band(
    q_blk: Tensor,
    k_g: Tensor,
    v_g: Tensor,
    k_ranges: list[Tuple[int, int]],
    W: int,
    rel: Optional[Tuple[Tensor, Tensor]],
    buffer: Optional[Tensor] = None,
) -> Tensor:
    """One query band against every key band; returns (G, Nq, Cv) float32. `buffer`, if
    given, holds the float32 scores of each block (float32 matmuls only)."""
    G, Nq, _ = q_blk.shape
    running_max = running_sum = acc = None
    for ka, kb in k_ranges:
        keys = k_g[:, ka * W : kb * W].transpose(1, 2)  # (G, C, Nk)
        if buffer is None:
            scores = torch.bmm(q_blk, keys).float()  # (G, Nq, Nk)
        else:
            scores = torch.bmm(q_blk, keys, out=buffer[: G * Nq * keys.shape[-1]].view(G, Nq, -1))
        if rel is not None:
            rel_h, rel_w = rel
            grid_scores = scores.view(G, Nq, kb - ka, W)
            grid_scores.add_(rel_h[..., ka:kb].reshape(G, Nq, kb - ka, 1))
            grid_scores.add_(rel_w.reshape(G, Nq, 1, W))
        block_max = scores.amax(dim=-1)  # (G, Nq)
        if running_max is None:
            new_max = block_max
        else:
            new_max = torch.maximum(running_max, block_max)
        scores.sub_(new_max[..., None]).exp_()
        block_sum = scores.sum(dim=-1)
        probs_v = torch.bmm(scores.to(v_g.dtype), v_g[:, ka * W : kb * W]).float()  # (G, Nq, Cv)
        if running_max is None:
            running_sum, acc = block_sum, probs_v
        else:
            correction = torch.exp(running_max - new_max)  # (G, Nq)
            running_sum = running_sum.mul_(correction).add_(block_sum)
            acc = acc.mul_(correction[..., None]).add_(probs_v)
        running_max = new_max
    return acc.div_(running_sum[..., None])
