"""The backends that take every key at once: "sdpa", "bands", "flashbias" and "flex", and what each needs.

Each computes softmax(q k^T * scale + rel_h + rel_w) v exactly as stock segment_anything
does, without an N x N tensor (N = H*W tokens); sam_blocked.attention.dispatch names them, chooses
between them and the reference "blocked" (attention.blocked_attention), and runs them.

- sdpa_attention: F.scaled_dot_product_attention per query band, with only that band's
  bias (G, band tokens, N) as attn_mask.
- bands_attention: sdpa's query bands without SDPA, in float32: the band's bias written
  into the score buffer, q k^T added onto it by one baddbmm, the softmax in place, one bmm
  into the output. Plain GEMMs and one softmax pass: on the CPU, 5-10% faster than SDPA's
  fused kernel with a bias (which reads the bias block by block), float32, 64 x 64 tokens.
- flashbias_attention: no bias tensor at all. SAM's bias is rank H+W, so it folds into the
  dot product: q' = [q * scale, rel_h(q), rel_w(q)], k' = [k, onehot(row(k)), onehot(col(k))],
  padded with zeros to a multiple of 8 (v too: the fused kernels want one head dim), and
  SDPA runs with scale 1, restricted to its fused kernels (flash / memory-efficient /
  cuDNN on CUDA, flash on the CPU).
- flex_attention: torch.nn.attention.flex_attention, compiled, with a score_mod adding
  rel_h[q, kv // W] + rel_w[q, kv % W]. CUDA only: see FLEX_CPU_REASON.

The *_reasons functions say why a backend cannot run a configuration (empty: it can);
plan_sdpa (sdpa, bands) and plan_fused say how a call is cut into steps.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F

from sam_blocked.attention.blocked import (
    DEFAULT_CHUNKS,
    CPU_STEP_BYTES,
    DEFAULT_GROUP_BYTES,
    BlockPlan,
    band_rows,
    check_attention_inputs,
    kernel_output,
    check_plan_args,
    chunk_bands,
    decomposed_rel_pos,
    rel_pos_tables,
    row_groups,
    step_budget,
)

Tensor = torch.Tensor

# flashbias / flex hold no score block; their per-step working set (q', k', v' or the
# rel-pos terms) is kept under this many bytes unless max_block_mb says otherwise (on the
# CPU, within attention.CPU_STEP_BYTES either way).
DEFAULT_FUSED_BYTES = 16 * 2**20
HEAD_DIM_MULTIPLE = 8
FLEX_CPU_REASON = (
    "flex on the CPU: inductor compiles flex_attention once per input shape (15-60 s each; dynamic "
    "shapes fail with a C++ compile error in torch 2.14) and the compiled kernel ran 2.5-2.8x slower than "
    "'sdpa' on one vit_b global layer (64 x 64 tokens, benchmarks/bench_backends.py --cpu-flex); "
    "use 'sdpa' on the CPU and 'flex' on CUDA"
)
FLEX_MAX_COMPILES = 64
_FP32_BYTES = 4

try:
    from torch.nn.attention import SDPBackend, sdpa_kernel
except ImportError:  # torch < 2.3
    SDPBackend = sdpa_kernel = None
try:
    from torch.nn.attention.flex_attention import flex_attention as _torch_flex_attention
except ImportError:  # torch < 2.5
    _torch_flex_attention = None


# --- what each needs -------------------------------------------------------------------------


def sdpa_reasons(grid: Tuple[int, int], max_block_mb: Optional[float]) -> list[str]:
    """Why "sdpa" or "bands" (the same query bands) cannot keep to max_block_mb on this grid; empty when they can."""
    H, W = grid
    row_bytes = W * H * W * _FP32_BYTES  # one token row of queries against every key
    if max_block_mb is not None and row_bytes > max_block_mb * 2**20:
        return [
            f"the smallest query band is one token row of queries against all {H * W} keys "
            f"({row_bytes / 2**20:.3f} MiB as float32), over max_block_mb={max_block_mb:g}"
        ]
    return []


def flashbias_reasons(device: torch.device, dtype: torch.dtype, grid: Tuple[int, int], head_dim: int) -> list[str]:
    """Why no fused SDPA kernel takes flashbias's augmented head dim here; empty when one does."""
    if sdpa_kernel is None:
        return [f"flashbias needs torch.nn.attention.sdpa_kernel (torch >= 2.3), this is torch {torch.__version__}"]
    if device.type not in ("cpu", "cuda"):
        return [f"flashbias runs SDPA's fused kernels on cpu and cuda only, not {device.type}"]
    dim = augmented_head_dim(grid, head_dim)
    if device.type == "cuda" and not torch.cuda.is_available():
        return ["CUDA is not available on this machine"]
    if not _fused_sdpa_takes(device, dtype, dim):
        H, W = grid
        kernels = "flash" if device.type == "cpu" else "flash, memory-efficient or cuDNN"
        limits = "" if device.type == "cpu" else " (flash wants float16/bfloat16, head dim <= 256 and sm80+; memory-efficient a head dim multiple of 8)"
        return [
            f"no fused SDPA kernel ({kernels}) takes {str(dtype).removeprefix('torch.')} with the augmented head dim "
            f"{dim} = {head_dim} + {H} + {W} rounded up to {HEAD_DIM_MULTIPLE}{limits}"
        ]
    return []


@functools.lru_cache(maxsize=None)
def _fused_sdpa_takes(device: torch.device, dtype: torch.dtype, dim: int) -> bool:
    """Whether SDPA, limited to its fused kernels, would run (1, 1, 16, dim) q, k, v in `dtype`."""
    probe = torch.zeros(1, 1, 16, dim, device=device, dtype=dtype)
    try:
        with sdpa_kernel(_fused_kernels(device)):
            choice = torch._fused_sdp_choice(probe, probe, probe, scale=1.0)
    except RuntimeError:
        return False
    return choice not in (SDPBackend.MATH.value, SDPBackend.ERROR.value)


def _fused_kernels(device: torch.device) -> list:
    if device.type == "cpu":
        return [SDPBackend.FLASH_ATTENTION]
    return [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]


def flex_reasons(device: torch.device) -> list[str]:
    """Why "flex" cannot run on `device` with the installed torch; empty when it can."""
    if _torch_flex_attention is None:
        return [f"flex needs torch.nn.attention.flex_attention (torch >= 2.5), this is torch {torch.__version__}"]
    if device.type == "cpu":
        return [FLEX_CPU_REASON]
    if device.type != "cuda":
        return [f"flex is compiled for cuda only here, not {device.type}"]
    if not torch.cuda.is_available():
        return ["CUDA is not available on this machine"]
    from torch.utils._triton import has_triton

    if not has_triton():
        return ["flex compiles a Triton kernel and Triton is not installed: pip install triton"]
    return []


def augmented_head_dim(grid: Tuple[int, int], head_dim: int) -> int:
    """flashbias's q'/k'/v' width: C + H + W, rounded up to a multiple of 8."""
    H, W = grid
    return -(-(head_dim + H + W) // HEAD_DIM_MULTIPLE) * HEAD_DIM_MULTIPLE


# --- planning: how many heads and queries per step -----------------------------------------


def plan_sdpa(
    batch_heads: int,
    grid: Tuple[int, int],
    chunks: int = DEFAULT_CHUNKS,
    max_block_mb: Optional[float] = None,
    device: Optional[torch.device | str] = None,
) -> BlockPlan:
    """sdpa's steps: `chunks` query bands (k_bands 1), or under max_block_mb the fewest bands
    whose float32 bias block fits it (on the CPU, also attention.CPU_STEP_BYTES; one token
    row at least); then as many batch*head rows per step as the bytes allow.

    Args:
        batch_heads: B*heads.
        grid: (H, W) token grid.
        chunks, max_block_mb: as patch_sam takes them.
        device: where it runs (None: no CPU cap).
    """
    check_plan_args(grid, max_block_mb)
    H, W = grid
    n = H * W
    row_bytes = W * n * _FP32_BYTES  # one token row of queries against every key
    if max_block_mb is None:
        chunk_bands(chunks)  # raises on a bad count
        q_bands = min(H, chunks)
        budget = max(DEFAULT_GROUP_BYTES, math.ceil(H / q_bands) * row_bytes)
    else:
        reasons = sdpa_reasons(grid, max_block_mb)
        if reasons:
            raise ValueError(f"{reasons[0]}: raise max_block_mb or use backend 'blocked'")
        budget = max(row_bytes, step_budget(int(max_block_mb * 2**20), device))
        q_bands = next(b for b in range(1, H + 1) if math.ceil(H / b) * row_bytes <= budget)
    per_row = math.ceil(H / q_bands) * row_bytes
    group = max(1, min(batch_heads, budget // per_row))
    return BlockPlan(q_bands, 1, group, group * per_row)


def plan_fused(
    backend: str,
    batch_heads: int,
    grid: Tuple[int, int],
    head_dim: int,
    max_block_mb: Optional[float] = None,
    device: Optional[torch.device | str] = None,
) -> BlockPlan:
    """flashbias's or flex's steps: one band, and as many batch*head rows as keep q', k', v'
    (flashbias) or q, k, v and the rel-pos terms (flex) within max_block_mb or
    DEFAULT_FUSED_BYTES (on the CPU, within attention.CPU_STEP_BYTES too).

    Args:
        backend: "flashbias" or "flex".
        batch_heads: B*heads.
        grid: (H, W) token grid.
        head_dim: C.
        max_block_mb: the patch's block budget, if any.
        device: where it runs (None: no CPU cap).
    """
    check_plan_args(grid, max_block_mb)
    H, W = grid
    n = H * W
    if backend == "flashbias":
        per_row = 3 * n * augmented_head_dim(grid, head_dim) * _FP32_BYTES  # q', k', v'
    else:
        per_row = n * (3 * head_dim + H + W) * _FP32_BYTES  # q, k, v, rel_h, rel_w
    budget = step_budget(DEFAULT_FUSED_BYTES if max_block_mb is None else int(max_block_mb * 2**20), device)
    group = max(1, min(batch_heads, budget // per_row))
    return BlockPlan(1, 1, group, group * per_row)


# --- the kernels ----------------------------------------------------------------------------


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
    if group * N * (H + W) * _FP32_BYTES <= CPU_STEP_BYTES:
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
    band = max(b - a for a, b in band_rows(H, plan.q_bands))
    scores = q.new_empty(min(plan.group, BH) * band * W * N, dtype=torch.float32)  # every step's (G, Nq, N), reused

    out = kernel_output(out, q, v)  # (B*heads, N, Cv)
    for g0, g1 in row_groups(BH, plan.group):
        G = g1 - g0
        terms = band_terms(q[g0:g1], grid, tables, min(plan.group, BH))
        keys, values = k[g0:g1].float().transpose(1, 2), v[g0:g1].float()  # (G, C, N), (G, N, Cv): views when float32
        for qa, qb in band_rows(H, plan.q_bands):
            rows = qb - qa
            s = scores[: G * rows * W * N].view(G, rows * W, N)
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
            del q_blk
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


def flashbias_attention(
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
    """The bias folded into the dot product; SDPA's fused kernels only, no bias tensor.

    q'_i . k'_j = scale q_i . k_j + rel_h[i, row(j)] + rel_w[i, col(j)] exactly: the extra
    key columns are one-hot, so each adds one rel-pos term times 1.

    Args:
        q, k, v: (B*heads, H*W, C), same dtype and device.
        grid: (H, W), tokens in row-major order.
        rel_pos_h, rel_pos_w: SAM's tables (resized like get_rel_pos), or both None.
        scale: multiplies q k^T; default C**-0.5.
        chunks: unused (one query band); max_block_mb: see plan_fused; `plan` overrides it.
        out: where to write the result, (B*heads, H*W, Cv), any strides; default new.

    Returns:
        (B*heads, H*W, Cv) in q's dtype.

    Raises:
        ValueError: no fused SDPA kernel takes this device, dtype and augmented head dim.
    """
    check_attention_inputs(q, k, v, grid, rel_pos_h, rel_pos_w)
    H, W = grid
    BH, N, C = q.shape
    Cv = v.shape[-1]
    scale = C**-0.5 if scale is None else scale
    reasons = flashbias_reasons(q.device, q.dtype, grid, C)
    if reasons:
        raise ValueError(f"flashbias: {'; '.join(reasons)}")
    plan = plan or plan_fused("flashbias", BH, grid, C, max_block_mb, q.device)
    tables = rel_pos_tables(rel_pos_h, rel_pos_w, grid)
    dim = max(augmented_head_dim(grid, C) if tables is not None else C, Cv)
    dim = -(-dim // HEAD_DIM_MULTIPLE) * HEAD_DIM_MULTIPLE
    token = torch.arange(N, device=q.device)

    # q', k', v' are allocated once and reused by every step; what never changes (zero
    # padding, k's one-hot row and column columns) is written once.
    G = min(plan.group, BH)
    q_aug = q.new_zeros(G, N, dim)  # (G, N, D): [q * scale, rel_h, rel_w, 0...]
    k_aug = k.new_zeros(G, N, dim)  # (G, N, D): [k, onehot(row), onehot(col), 0...]
    v_aug = None if dim == Cv else v.new_zeros(G, N, dim)  # (G, N, D): the fused kernels want one head dim
    if tables is not None:
        k_aug[:, token, C + token // W] = 1
        k_aug[:, token, C + H + token % W] = 1
    out = kernel_output(out, q, v)  # (B*heads, N, Cv)
    for g0, g1 in row_groups(BH, plan.group):
        G = g1 - g0
        qa_, ka_ = q_aug[:G], k_aug[:G]
        qa_[..., :C] = q[g0:g1] * scale
        ka_[..., :C] = k[g0:g1]
        if tables is not None:
            rel_h, rel_w = decomposed_rel_pos(q[g0:g1].float().view(G, H, W, C), *tables, 0)
            q_grid = qa_.view(G, H, W, dim)
            q_grid[..., C : C + H] = rel_h
            q_grid[..., C + H : C + H + W] = rel_w
            del rel_h, rel_w
        va_ = v[g0:g1]
        if v_aug is not None:
            va_ = v_aug[:G]
            va_[..., :Cv] = v[g0:g1]
        with sdpa_kernel(_fused_kernels(q.device)):
            o = F.scaled_dot_product_attention(qa_[None], ka_[None], va_[None], scale=1.0)  # (1, G, N, D)
        out[g0:g1] = o[0, ..., :Cv]
        del o
    return out


def flex_attention(
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
    compiled: bool = True,
) -> Tensor:
    """torch's flex_attention with a score_mod adding the two rel-pos terms.

    Args:
        q, k, v: (B*heads, H*W, C), same dtype and device.
        grid: (H, W), tokens in row-major order.
        rel_pos_h, rel_pos_w: SAM's tables (resized like get_rel_pos), or both None.
        scale: multiplies q k^T; default C**-0.5.
        chunks: unused (one query band); max_block_mb: see plan_fused; `plan` overrides it.
        out: where to write the result, (B*heads, H*W, Cv), any strides; default new.
        compiled: False runs flex_attention eagerly, which materializes the full score
            matrix: for checking the score_mod on small inputs only.

    Returns:
        (B*heads, H*W, Cv) in q's dtype.
    """
    check_attention_inputs(q, k, v, grid, rel_pos_h, rel_pos_w)
    if _torch_flex_attention is None:
        raise ValueError(flex_reasons(q.device)[0])
    H, W = grid
    BH, N, C = q.shape
    scale = C**-0.5 if scale is None else scale
    plan = plan or plan_fused("flex", BH, grid, C, max_block_mb, q.device)
    tables = rel_pos_tables(rel_pos_h, rel_pos_w, grid)
    run = _compiled_flex() if compiled else _flex_call

    out = kernel_output(out, q, v)  # (B*heads, N, Cv)
    for g0, g1 in row_groups(BH, plan.group):
        G = g1 - g0
        rel_h = rel_w = None
        if tables is not None:
            rel_h, rel_w = decomposed_rel_pos(q[g0:g1].float().view(G, H, W, C), *tables, 0)
            rel_h, rel_w = rel_h.reshape(G, N, H), rel_w.reshape(G, N, W)  # float32: score_mod adds in float32
        o = run(q[None, g0:g1], k[None, g0:g1], v[None, g0:g1], rel_h, rel_w, W, scale)  # (1, G, N, Cv)
        out[g0:g1] = o[0]
    return out


def _flex_call(q: Tensor, k: Tensor, v: Tensor, rel_h: Optional[Tensor], rel_w: Optional[Tensor], width: int, scale: float) -> Tensor:
    score_mod = None
    if rel_h is not None:

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + rel_h[h, q_idx, kv_idx // width] + rel_w[h, q_idx, kv_idx % width]

    return _torch_flex_attention(q, k, v, score_mod=score_mod, scale=scale)


@functools.lru_cache(maxsize=None)
def _compiled_flex() -> Callable[..., Tensor]:
    # Static shapes: one compile per (shape, dtype), a few per model and image size. Past
    # FLEX_MAX_COMPILES dynamo raises instead of silently running flex eagerly, which would
    # build the N x N scores.
    compiled = torch.compile(_flex_call, fullgraph=True, dynamic=False)

    def run(*args):
        with torch._dynamo.config.patch(recompile_limit=FLEX_MAX_COMPILES, fail_on_recompile_limit_hit=True):
            return compiled(*args)

    return run
