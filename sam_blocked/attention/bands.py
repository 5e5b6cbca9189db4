"""The "sdpa" and "bands" backends: query bands against every key at once, each band with
only its own (G, band tokens, N) rel-pos bias; what they need (sdpa_reasons) and how a call
is cut (plan_sdpa).

- sdpa_attention: F.scaled_dot_product_attention per query band, with only that band's
  bias (G, band tokens, N) as attn_mask.
- bands_attention: sdpa's query bands without SDPA, in float32: the band's bias written
  into the score buffer, q k^T added onto it by one baddbmm, the softmax in place, one bmm
  into the output. Plain GEMMs and one softmax pass: on the CPU, 5-10% faster than SDPA's
  fused kernel with a bias (which reads the bias block by block), float32, 64 x 64 tokens.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F

from sam_blocked.attention.threads import run_steps, step_threads
from sam_blocked.attention.common import (
    FP32_BYTES,
    CPU_STEP_BYTES,
    DEFAULT_CHUNKS,
    DEFAULT_GROUP_BYTES,
    BlockPlan,
    band_rows,
    check_attention_inputs,
    check_plan_args,
    chunk_bands,
    decomposed_rel_pos,
    kernel_output,
    rel_pos_tables,
    row_groups,
    step_budget,
    step_rows,
)

Tensor = torch.Tensor


def sdpa_reasons(grid: Tuple[int, int], max_block_mb: Optional[float]) -> list[str]:
    """Why "sdpa" or "bands" (the same query bands) cannot keep to max_block_mb on this grid; empty when they can."""
    H, W = grid
    row_bytes = W * H * W * FP32_BYTES  # one token row of queries against every key
    if max_block_mb is not None and row_bytes > max_block_mb * 2**20:
        return [
            f"the smallest query band is one token row of queries against all {H * W} keys "
            f"({row_bytes / 2**20:.3f} MiB as float32), over max_block_mb={max_block_mb:g}"
        ]
    return []


def plan_sdpa(
    batch_heads: int,
    grid: Tuple[int, int],
    chunks: int = DEFAULT_CHUNKS,
    max_block_mb: Optional[float] = None,
    device: Optional[torch.device | str] = None,
) -> BlockPlan:
    """sdpa's steps: `chunks` query bands (k_bands 1), or under max_block_mb the fewest bands
    whose float32 bias block fits it (on the CPU, also common.CPU_STEP_BYTES; one token
    row at least); then as many batch*head rows per step as the bytes allow. On the CPU
    with step threads (attention.threads), `threads` bands run at once in bands_attention,
    so there are that many times `chunks` bands (and each step takes its share of a budget).

    Args:
        batch_heads: B*heads.
        grid: (H, W) token grid.
        chunks, max_block_mb: as patch_sam takes them.
        device: where it runs (None: no CPU cap).
    """
    check_plan_args(grid, max_block_mb)
    H, W = grid
    n = H * W
    row_bytes = W * n * FP32_BYTES  # one token row of queries against every key
    threads = step_threads(device)  # bands_attention runs that many bands at once, each a share
    if max_block_mb is None:
        chunk_bands(chunks)  # raises on a bad count
        q_bands = min(H, chunks * threads)
        budget = max(DEFAULT_GROUP_BYTES // threads, math.ceil(H / q_bands) * row_bytes)
    else:
        reasons = sdpa_reasons(grid, max_block_mb)
        if reasons:
            raise ValueError(f"{reasons[0]}: raise max_block_mb or use backend 'blocked'")
        budget = max(row_bytes, step_budget(int(max_block_mb * 2**20), device))
        q_bands = next(b for b in range(1, H + 1) if math.ceil(H / b) * row_bytes <= budget)
    per_row = math.ceil(H / q_bands) * row_bytes
    group = max(1, min(batch_heads, budget // per_row))
    return BlockPlan(q_bands, 1, group, group * per_row, threads)


def _rel_pos_bytes(rows: int, band: int, grid: Tuple[int, int], head_dim: int) -> int:
    """band_terms' bytes: the resized tables, the float32 q its einsums read and their terms,
    for the whole group at once or a band (as band_terms chooses)."""
    H, W = grid
    n = H * W
    whole_group = rows * n * (H + W) * FP32_BYTES <= CPU_STEP_BYTES  # the terms of every band at once
    q_rows = rows * (n if whole_group else band)
    tables = (H * H + W * W) * head_dim * FP32_BYTES
    return tables + q_rows * (head_dim + H + W + max(H, W)) * FP32_BYTES


def sdpa_workspace_bytes(plan: BlockPlan, batch_heads: int, grid: Tuple[int, int], head_dim: int, dtype: torch.dtype, strided_out: bool = False) -> int:
    """Bytes sdpa_attention holds beyond q, k, v and out, at its largest step, with SAM's
    rel-pos tables: the band's bias in q's dtype, band_terms' tables and terms (and the
    terms cast to q's dtype when it is not float32), and SDPA's output for the band.

    Args:
        plan: the call's plan (plan_sdpa).
        batch_heads: B*heads of the call's q, k, v.
        grid: (H, W) token grid.
        head_dim: C.
        dtype: of q, k, v.
        strided_out: unused (SDPA's output is copied into `out` either way).
    """
    H, W = grid
    e = dtype.itemsize
    rows, band = step_rows(plan, batch_heads, grid)
    rel = _rel_pos_bytes(rows, band, grid, head_dim)
    rel += rows * band * (H + W) * e if e != FP32_BYTES else 0  # the terms in q's dtype
    return rows * band * H * W * e + rel + rows * band * head_dim * e  # the band's bias, the band's output


def bands_workspace_bytes(plan: BlockPlan, batch_heads: int, grid: Tuple[int, int], head_dim: int, dtype: torch.dtype, strided_out: bool = False) -> int:
    """Bytes bands_attention holds beyond q, k, v and out, at its largest step, with SAM's
    rel-pos tables: the float32 score band, band_terms' tables and terms, q * scale and the
    band's output unless it is written straight into a contiguous float32 `out`, and k and v
    in float32 when they are not.

    Args:
        plan: the call's plan (plan_sdpa).
        batch_heads: B*heads of the call's q, k, v.
        grid: (H, W) token grid.
        head_dim: C.
        dtype: of q, k, v.
        strided_out: whether `out` is a strided view (then each band's output is a new tensor, copied in).
    """
    H, W = grid
    n = H * W
    rows, band = step_rows(plan, batch_heads, grid)
    in_place = not strided_out and dtype.itemsize == FP32_BYTES
    off_float = 2 * rows * n * head_dim * FP32_BYTES if dtype.itemsize != FP32_BYTES else 0  # k, v in float32
    at_once = min(plan.threads, plan.q_bands)  # bands at once, each with its own scores and q (and output)
    rel = _rel_pos_bytes(rows, band, grid, head_dim)
    whole_group = rows * n * (H + W) * FP32_BYTES <= CPU_STEP_BYTES  # the group's terms shared by its bands
    step = rows * band * n * FP32_BYTES + (1 if in_place else 2) * rows * band * head_dim * FP32_BYTES
    return at_once * step + (rel if whole_group else at_once * rel) + off_float


def _band_settings(q, k, v, grid, rel_pos_h, rel_pos_w, scale, chunks, max_block_mb, plan):
    """sdpa_attention's and bands_attention's checked inputs: (scale, plan, rel-pos tables or None)."""
    check_attention_inputs(q, k, v, grid, rel_pos_h, rel_pos_w)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    plan = plan or plan_sdpa(q.shape[0], grid, chunks, max_block_mb, q.device)
    return scale, plan, rel_pos_tables(rel_pos_h, rel_pos_w, grid)


def sdpa_attention(
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
    """SDPA per query band, each band with its own (G, band tokens, N) rel-pos bias.

    Args:
        q, k, v: (B*heads, H*W, C), same dtype and device.
        grid: (H, W), tokens in row-major order.
        rel_pos_h, rel_pos_w: SAM's tables (resized like get_rel_pos), or both None.
        scale: multiplies q k^T; default C**-0.5.
        chunks, max_block_mb: see plan_sdpa; `plan` overrides both.
        out: where to write the result, (B*heads, H*W, Cv), any strides; default new.

    Returns:
        (B*heads, H*W, Cv) in q's dtype.
    """
    H, W = grid
    BH, N, _ = q.shape  # (B*heads, N, C)
    scale, plan, tables = _band_settings(q, k, v, grid, rel_pos_h, rel_pos_w, scale, chunks, max_block_mb, plan)

    n_pad = N + -N % _bias_row_alignment(q.device)
    band = max(b - a for a, b in band_rows(H, plan.q_bands))  # token rows of the largest band
    # one bias buffer for every step, written in place: (1, G, band tokens, N) at most
    mask_buffer = None if tables is None else q.new_empty(min(plan.group, BH) * band * W * n_pad)

    out = kernel_output(out, q, v)  # (B*heads, N, Cv)
    for g0, g1 in row_groups(BH, plan.group):
        G = g1 - g0
        terms = band_terms(q[g0:g1], grid, tables, min(plan.group, BH))
        for qa, qb in band_rows(H, plan.q_bands):
            rows = qb - qa
            q_blk = q[g0:g1, qa * W : qb * W]  # (G, Nq, C)
            mask = None
            if tables is not None:
                rel_h, rel_w = terms(qa, qb)
                mask = mask_buffer[: G * rows * W * n_pad].view(1, G, rows * W, n_pad)[..., :N]  # this band's bias only
                # (G, rows, W, H, 1) + (G, rows, W, 1, W) -> (G, rows, W, H, W), written in place
                torch.add(rel_h.to(q.dtype)[..., :, None], rel_w.to(q.dtype)[..., None, :], out=mask.view(G, rows, W, H, W))
                del rel_h, rel_w
            # 4-D (1, G, tokens, C): CUDA's fused kernels take no 3-D inputs
            o = F.scaled_dot_product_attention(q_blk[None], k[None, g0:g1], v[None, g0:g1], attn_mask=mask, scale=scale)
            out[g0:g1, qa * W : qb * W] = o[0]
            del mask, o
    return out


def band_terms(q_g: Tensor, grid: Tuple[int, int], tables, group: int) -> Callable[[int, int], Tuple[Tensor, Tensor]]:
    """The rel-pos terms of query token rows [qa, qb) of a group, float32 (G, rows, W, H)
    and (G, rows, W, W), as a function of (qa, qb): computed for the whole group at once
    when they are small (fewer, larger einsums), else band by band.

    Args:
        q_g: (G, N, C) the group's unscaled queries.
        grid: (H, W).
        tables: rel_pos_tables(...), or None: then every band's terms are (None, None).
        group: the plan's largest group, which sizes the whole-group terms.
    """
    H, W = grid
    G, N, C = q_g.shape
    if tables is None:
        return lambda qa, qb: (None, None)
    if group * N * (H + W) * FP32_BYTES <= CPU_STEP_BYTES:
        rel_h, rel_w = decomposed_rel_pos(q_g.float().view(G, H, W, C), *tables, 0)  # (G, H, W, H), (G, H, W, W)
        return lambda qa, qb: (rel_h[:, qa:qb], rel_w[:, qa:qb])
    return lambda qa, qb: decomposed_rel_pos(q_g[:, qa * W : qb * W].float().view(G, qb - qa, W, C), *tables, qa)


def bands_attention(
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
    """sdpa's query bands in plain float32 GEMMs: bias + (q * scale) k^T, softmax, times v.

    Each step writes the band's bias (rel_h + rel_w) into one float32 score buffer, adds
    (q * scale) k^T onto it (baddbmm), takes the softmax in place and multiplies by v
    straight into `out`: the (G, band tokens, N) buffer is the only score-sized tensor.
    Half-precision inputs are computed in float32 (as stock's softmax statistics would
    want; on the CPU half-precision GEMMs are slow) and the result cast back.

    Args and returns: as sdpa_attention (q, k, v: (B*heads, H*W, C); the same bands).
    """
    H, W = grid
    BH, N, _ = q.shape  # (B*heads, N, C)
    scale, plan, tables = _band_settings(q, k, v, grid, rel_pos_h, rel_pos_w, scale, chunks, max_block_mb, plan)
    bands = band_rows(H, plan.q_bands)
    size = min(plan.group, BH) * max(b - a for a, b in bands) * W * N  # a step's (G, Nq, N) scores
    threads = min(plan.threads, step_threads(q.device))
    scores: list[Optional[Tensor]] = [None] * threads  # each thread's score buffer, reused step after step

    out = kernel_output(out, q, v)  # (B*heads, N, Cv)
    for g0, g1 in row_groups(BH, plan.group):
        G = g1 - g0
        terms = band_terms(q[g0:g1], grid, tables, min(plan.group, BH))
        keys, values = k[g0:g1].float().transpose(1, 2), v[g0:g1].float()  # (G, C, N), (G, N, Cv): views when float32

        def step(band: Tuple[int, int], slot: int) -> None:
            qa, qb = band
            rows = qb - qa
            if scores[slot] is None:
                scores[slot] = q.new_empty(size, dtype=torch.float32)
            s = scores[slot][: G * rows * W * N].view(G, rows * W, N)
            q_blk = q[g0:g1, qa * W : qb * W].float() * scale  # (G, Nq, C), as stock's q * scale
            if tables is None:
                torch.bmm(q_blk, keys, out=s)
            else:
                rel_h, rel_w = terms(qa, qb)
                # (G, rows, W, H, 1) + (G, rows, W, 1, W) -> (G, rows, W, H, W), then + q k^T
                torch.add(rel_h[..., :, None], rel_w[..., None, :], out=s.view(G, rows, W, H, W))
                del rel_h, rel_w
                torch.baddbmm(s, q_blk, keys, out=s)
            s = _softmax_(s)
            dest = out[g0:g1, qa * W : qb * W]  # (G, Nq, Cv)
            if dest.dtype == torch.float32 and dest.is_contiguous():
                torch.bmm(s, values, out=dest)
            else:
                dest.copy_(torch.bmm(s, values))

        run_steps(step, bands, threads)
    return out


def _softmax_(s: Tensor) -> Tensor:
    """softmax over the last dim, in s's storage on the CPU (its kernel reads each element
    before writing it); a new tensor elsewhere."""
    if s.device.type == "cpu":
        return torch.ops.aten._softmax.out(s, -1, False, out=s)
    return torch.softmax(s, -1)


def _bias_row_alignment(device: torch.device) -> int:
    # CUDA's memory-efficient kernel wants bias rows 16-element aligned (else SDPA pads a copy)
    return 16 if device.type == "cuda" else 1
