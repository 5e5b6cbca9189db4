"""The "flashbias" backend: no bias tensor at all. SAM's bias is rank H+W, so it folds into
the dot product: q' = [q * scale, rel_h(q), rel_w(q)], k' = [k, onehot(row(k)), onehot(col(k))],
padded with zeros to a multiple of 8 (v too: the fused kernels want one head dim), and SDPA
runs with scale 1, restricted to its fused kernels (flash / memory-efficient / cuDNN on
CUDA, flash on the CPU). flashbias_reasons says where no fused kernel takes it, plan_flashbias
how a call is cut into steps and workspace_bytes what a step holds.
"""

from __future__ import annotations

import functools
import threading
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from sam_blocked.attention.common import (
    FP32_BYTES,
    DEFAULT_CHUNKS,
    BlockPlan,
    check_attention_inputs,
    check_plan_args,
    decomposed_rel_pos,
    kernel_output,
    rel_pos_tables,
    plan_one_band,
    row_groups,
    step_rows,
)

Tensor = torch.Tensor

HEAD_DIM_MULTIPLE = 8

try:
    from torch.nn.attention import SDPBackend, sdpa_kernel
except ImportError:  # torch < 2.3
    SDPBackend = sdpa_kernel = None


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


# sdpa_kernel sets process-wide flags and puts back what it found: two threads inside it at
# once (window steps on step threads, attention.threads) could leave SDPA's math kernel off
_SDPA_FLAGS = threading.Lock()
# SDPA's flash kernel on the CPU, called without the flags (what SDPA runs when they allow only it)
_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _fused_sdpa(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """SDPA limited to its fused kernels, scale 1: (1, G, N, D) -> (1, G, N, Dv)."""
    if q.device.type == "cpu" and _CPU_FLASH is not None:
        return _CPU_FLASH(q, k, v, 0.0, False, scale=1.0)[0]
    with _SDPA_FLAGS, sdpa_kernel(_fused_kernels(q.device)):
        return F.scaled_dot_product_attention(q, k, v, scale=1.0)


@functools.lru_cache(maxsize=None)
def _fused_sdpa_takes(device: torch.device, dtype: torch.dtype, dim: int) -> bool:
    """Whether SDPA, limited to its fused kernels, would run (1, 1, 16, dim) q, k, v in `dtype`."""
    probe = torch.zeros(1, 1, 16, dim, device=device, dtype=dtype)
    try:
        with _SDPA_FLAGS, sdpa_kernel(_fused_kernels(device)):
            choice = torch._fused_sdp_choice(probe, probe, probe, scale=1.0)
    except RuntimeError:
        return False
    return choice not in (SDPBackend.MATH.value, SDPBackend.ERROR.value)


def _fused_kernels(device: torch.device) -> list:
    if device.type == "cpu":
        return [SDPBackend.FLASH_ATTENTION]
    return [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]


def augmented_head_dim(grid: Tuple[int, int], head_dim: int) -> int:
    """flashbias's q'/k'/v' width: C + H + W, rounded up to a multiple of 8."""
    H, W = grid
    return -(-(head_dim + H + W) // HEAD_DIM_MULTIPLE) * HEAD_DIM_MULTIPLE


def plan_flashbias(
    batch_heads: int,
    grid: Tuple[int, int],
    head_dim: int,
    max_block_mb: Optional[float] = None,
    device: Optional[torch.device | str] = None,
) -> BlockPlan:
    """flashbias's steps: one band, and as many batch*head rows as keep q', k', v' within
    max_block_mb or DEFAULT_FUSED_BYTES (on the CPU, within common.CPU_STEP_BYTES too).

    Args:
        batch_heads: B*heads.
        grid: (H, W) token grid.
        head_dim: C.
        max_block_mb: the patch's block budget, if any.
        device: where it runs (None: no CPU cap).
    """
    check_plan_args(grid, max_block_mb)
    H, W = grid
    per_row = 3 * H * W * augmented_head_dim(grid, head_dim) * FP32_BYTES  # q', k', v'
    return plan_one_band(batch_heads, per_row, max_block_mb, device)


def workspace_bytes(plan: BlockPlan, batch_heads: int, grid: Tuple[int, int], head_dim: int, dtype: torch.dtype, strided_out: bool = False) -> int:
    """Bytes flashbias_attention holds beyond q, k, v and out, at its largest step, with SAM's
    rel-pos tables: q', k', v' and SDPA's output, all (rows, N, augmented head dim) in q's
    dtype, and rel_h and rel_w in float32.

    Args:
        plan: the call's plan (plan_flashbias).
        batch_heads: B*heads of the call's q, k, v.
        grid: (H, W) token grid.
        head_dim: C.
        dtype: of q, k, v.
        strided_out: unused (SDPA's output is copied into `out` either way).
    """
    H, W = grid
    rows, band = step_rows(plan, batch_heads, grid)
    rel = rows * band * (H + W) * FP32_BYTES  # rel_h, rel_w
    return 4 * rows * H * W * augmented_head_dim(grid, head_dim) * dtype.itemsize + rel  # q', k', v' and the output


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
        chunks: unused (one query band); max_block_mb: see plan_flashbias; `plan` overrides it.
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
    plan = plan or plan_flashbias(BH, grid, C, max_block_mb, q.device)
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
        o = _fused_sdpa(qa_[None], ka_[None], va_[None])  # (1, G, N, D)
        out[g0:g1] = o[0, ..., :Cv]
        del o
    return out
