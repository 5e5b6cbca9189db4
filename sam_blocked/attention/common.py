"""What every attention backend shares: the blocking settings and their checks, BlockPlan,
bands of token rows, and SAM's decomposed relative-position terms (get_rel_pos's rule).

The kernels live one a file beside this one (blocked, bands, flashbias, flex) and
sam_blocked.attention.dispatch names them and picks one.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from sam_blocked.attention.threads import step_threads, steps_at_once

Tensor = torch.Tensor

DEFAULT_CHUNKS = 16
DEFAULT_GROUP_BYTES = 4 * 2**20
# On the CPU a step's working set (a bias block, q'/k'/v', a chunk of tokens) is kept to this
# even when max_block_mb allows more: larger steps ran no faster here (a block that stays in
# cache between being written and read is cheaper), and glibc keeps the freed blocks of a
# few such steps in its heap, so they would count twice in the resident set.
CPU_STEP_BYTES = 8 * 2**20
FP32_BYTES = 4  # the softmax statistics, accumulators and score blocks are float32


def step_budget(budget: int, device: Optional[torch.device | str]) -> int:
    """The bytes a step may hold: `budget`, capped at CPU_STEP_BYTES on the CPU (None: no cap).
    On the CPU the steps run on several threads at once (attention.threads), each within
    its share of that, so the steps at once hold what one step would alone."""
    if device is not None and torch.device(device).type == "cpu":
        return min(budget, CPU_STEP_BYTES) // steps_at_once(device)
    return budget


# flashbias / flex hold no score block; their per-step working set (q', k', v' or the
# rel-pos terms) is kept under this many bytes unless max_block_mb says otherwise (on the
# CPU, within common.CPU_STEP_BYTES either way).
DEFAULT_FUSED_BYTES = 16 * 2**20


@dataclass(frozen=True)
class BlockPlan:
    """How one attention call is cut: bands of token rows and groups of batch*head rows."""

    q_bands: int
    k_bands: int
    group: int
    block_bytes: int  # float32 bytes of the largest (group, queries, keys) score block
    threads: int = 1  # steps run at once (attention.threads), each with its own block


def chunk_bands(chunks: int) -> Tuple[int, int]:
    """Split a chunk count into (query bands, key bands), factors as close as possible."""
    if isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1:
        raise ValueError(f"chunks must be a whole number >= 1, got {chunks!r}")
    k_bands = max(d for d in range(1, math.isqrt(chunks) + 1) if chunks % d == 0)
    return chunks // k_bands, k_bands


def check_max_block_mb(max_block_mb: Optional[float]) -> Optional[float]:
    """The block budget as a float (None: none, `chunks` decides), or a ValueError unless it is a number > 0 (MiB).
    The one check of max_block_mb: the patch, the kernels, the planner and the demo call it."""
    if max_block_mb is None:
        return None
    if isinstance(max_block_mb, bool) or not isinstance(max_block_mb, numbers.Real) or not max_block_mb > 0:
        raise ValueError(f"max_block_mb must be > 0 (a number of MiB, or None to use chunks), got {max_block_mb!r}")
    return float(max_block_mb)


def check_plan_args(grid: Tuple[int, int], max_block_mb: Optional[float]) -> None:
    """ValueError unless the (H, W) grid is at least 1 x 1 and max_block_mb, if given, is > 0."""
    H, W = grid
    if H < 1 or W < 1:
        raise ValueError(f"token grid must be at least 1 x 1, got {H} x {W}")
    check_max_block_mb(max_block_mb)


def plan_one_band(batch_heads: int, per_row: int, max_block_mb: Optional[float], device: Optional[torch.device | str]) -> BlockPlan:
    """One query band, and as many batch*head rows per step as keep `per_row` bytes each within
    max_block_mb or DEFAULT_FUSED_BYTES (on the CPU, within CPU_STEP_BYTES too): flashbias's and flex's steps."""
    budget = step_budget(DEFAULT_FUSED_BYTES if max_block_mb is None else int(max_block_mb * 2**20), device)
    group = max(1, min(batch_heads, budget // per_row))
    return BlockPlan(1, 1, group, group * per_row)


def step_rows(plan: BlockPlan, batch_heads: int, grid: Tuple[int, int]) -> Tuple[int, int]:
    """(batch*head rows, query tokens) of a call's largest step under `plan`."""
    H, W = grid
    return min(plan.group, batch_heads), math.ceil(H / plan.q_bands) * W


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
