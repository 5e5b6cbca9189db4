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
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

DEFAULT_CHUNKS = 16
DEFAULT_GROUP_BYTES = 4 * 2**20
# On the CPU a step's working set (a bias block, q'/k'/v', a chunk of tokens) is kept to this
# even when max_block_mb allows more: larger steps ran no faster here (a block that stays in
# cache between being written and read is cheaper), and glibc keeps the freed blocks of a
# few such steps in its heap, so they would count twice in the resident set.
CPU_STEP_BYTES = 8 * 2**20
_FP32_BYTES = 4


def step_budget(budget: int, device: Optional[torch.device | str]) -> int:
    """The bytes a step may hold: `budget`, capped at CPU_STEP_BYTES on the CPU (None: no cap)."""
    if device is not None and torch.device(device).type == "cpu":
        return min(budget, CPU_STEP_BYTES)
    return budget


@dataclass(frozen=True)
class BlockPlan:
    """How one attention call is cut: bands of token rows and groups of batch*head rows."""

    q_bands: int
    k_bands: int
    group: int
    block_bytes: int  # float32 bytes of the largest (group, queries, keys) score block


def chunk_bands(chunks: int) -> Tuple[int, int]:
    """Split a chunk count into (query bands, key bands), factors as close as possible."""
    if isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1:
        raise ValueError(f"chunks must be a whole number >= 1, got {chunks!r}")
    k_bands = max(d for d in range(1, math.isqrt(chunks) + 1) if chunks % d == 0)
    return chunks // k_bands, k_bands


def check_plan_args(grid: Tuple[int, int], max_block_mb: Optional[float]) -> None:
    """ValueError unless the (H, W) grid is at least 1 x 1 and max_block_mb, if given, is > 0."""
    H, W = grid
    if H < 1 or W < 1:
        raise ValueError(f"token grid must be at least 1 x 1, got {H} x {W}")
    if max_block_mb is not None and not max_block_mb > 0:
        raise ValueError(f"max_block_mb must be > 0, got {max_block_mb!r}")


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
        return math.ceil(H / q_bands) * W * math.ceil(H / k_bands) * W * _FP32_BYTES

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


def band_rows(rows: int, bands: int) -> list[Tuple[int, int]]:
    """[start, end) row ranges of `bands` near-equal bands, larger ones first (torch.tensor_split's rule)."""
    size, extra = divmod(rows, bands)
    edges = [0]
    for i in range(bands):
        edges.append(edges[-1] + size + (1 if i < extra else 0))
    return list(zip(edges[:-1], edges[1:]))


def resize_rel_pos(rel_pos: Tensor, size: int) -> Tensor:
    """Table of 2*size-1 relative offsets, (L, C) -> (2*size-1, C), by get_rel_pos's rule."""
    length = 2 * size - 1
    if rel_pos.shape[0] == length:
        return rel_pos
    resized = F.interpolate(
        rel_pos.reshape(1, rel_pos.shape[0], -1).permute(0, 2, 1),  # (1, C, L)
        size=length,
        mode="linear",
    )
    return resized.reshape(-1, length).permute(1, 0)  # (2*size-1, C)


def rel_pos_rows(table: Tensor, size: int, start: int, end: int) -> Tensor:
    """Rel-pos embeddings for query rows [start, end) against all key rows: (end-start, size, C)."""
    q = torch.arange(start, end, device=table.device)[:, None]
    k = torch.arange(size, device=table.device)[None, :]
    return table[q - k + (size - 1)]


def check_attention_inputs(
    q: Tensor, k: Tensor, v: Tensor, grid: Tuple[int, int], rel_pos_h: Optional[Tensor], rel_pos_w: Optional[Tensor]
) -> None:
    """Raise a ValueError naming the problem unless q, k, v are (B*heads, H*W, C) on an (H, W) grid."""
    if q.dim() != 3 or k.shape != q.shape or v.shape[:2] != q.shape[:2]:
        raise ValueError(
            f"q, k, v must be (B*heads, H*W, C) with matching shapes, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    H, W = grid
    if H * W != q.shape[1]:
        raise ValueError(f"grid {H} x {W} has {H * W} tokens but q has {q.shape[1]}")
    if (rel_pos_h is None) != (rel_pos_w is None):
        raise ValueError("give both rel_pos_h and rel_pos_w, or neither")


def rel_pos_tables(
    rel_pos_h: Optional[Tensor], rel_pos_w: Optional[Tensor], grid: Tuple[int, int]
) -> Optional[Tuple[Tensor, Tensor]]:
    """SAM's tables made ready for decomposed_rel_pos, or None when there are none.

    Args:
        rel_pos_h, rel_pos_w: (Lh, C) and (Lw, C), or both None.
        grid: (H, W) token grid.

    Returns:
        table_h (2*H-1, C) and rel_w_table (W, W, C), float32.
    """
    if rel_pos_h is None:
        return None
    H, W = grid
    table_h = resize_rel_pos(rel_pos_h, H).float()  # (2*H-1, C)
    rel_w_table = rel_pos_rows(resize_rel_pos(rel_pos_w, W).float(), W, 0, W)  # (W, W, C)
    return table_h, rel_w_table


def kernel_output(out: Optional[Tensor], q: Tensor, v: Tensor) -> Tensor:
    """The kernels' (B*heads, N, Cv) result: `out` when given (any strides), checked, else new."""
    shape = (q.shape[0], q.shape[1], v.shape[-1])
    if out is None:
        return q.new_empty(shape)
    if tuple(out.shape) != shape or out.dtype != q.dtype or out.device != q.device:
        raise ValueError(f"out must be {shape} {q.dtype} on {q.device}, got {tuple(out.shape)} {out.dtype} on {out.device}")
    return out


def row_groups(batch_heads: int, group: int) -> list[Tuple[int, int]]:
    """[start, end) ranges of `group` batch*head rows at a time (the last may be shorter)."""
    return [(g0, min(batch_heads, g0 + group)) for g0 in range(0, batch_heads, group)]


def decomposed_rel_pos(q_rows: Tensor, table_h: Tensor, rel_w_table: Tensor, start: int) -> Tuple[Tensor, Tensor]:
    """SAM's two rel-pos terms for the queries of token rows [start, start + rows).

    Args:
        q_rows: (G, rows, W, C) unscaled queries, float32.
        table_h: (2*H-1, C), already resized (resize_rel_pos).
        rel_w_table: (W, W, C), rel_pos_rows of the resized width table.

    Returns:
        rel_h (G, rows, W, H): added to every key in key row kh; rel_w (G, rows, W, W):
        added to every key in key column kw.
    """
    rows = q_rows.shape[1]
    H = (table_h.shape[0] + 1) // 2
    rel_h = torch.einsum("grwc,rkc->grwk", q_rows, rel_pos_rows(table_h, H, start, start + rows))  # (G, rows, W, H)
    rel_w = torch.einsum("grwc,wkc->grwk", q_rows, rel_w_table)  # (G, rows, W, W)
    return rel_h, rel_w


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
