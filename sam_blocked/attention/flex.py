"""The "flex" backend: torch.nn.attention.flex_attention, compiled, with a score_mod adding
rel_h[q, kv // W] + rel_w[q, kv % W]. CUDA only: see FLEX_CPU_REASON. flex_reasons says
where it cannot run, plan_flex how a call is cut into steps and workspace_bytes what a
step holds.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional, Tuple

import torch

from sam_blocked.attention.common import (
    DEFAULT_CHUNKS,
    FP32_BYTES,
    BlockPlan,
    check_attention_inputs,
    check_plan_args,
    decomposed_rel_pos,
    kernel_output,
    plan_one_band,
    rel_pos_tables,
    row_groups,
    step_rows,
)

Tensor = torch.Tensor

FLEX_CPU_REASON = (
    "flex on the CPU: inductor compiles flex_attention once per input shape (15-60 s each; dynamic "
    "shapes fail with a C++ compile error in torch 2.14) and the compiled kernel ran 2.5-2.8x slower than "
    "'sdpa' on one vit_b global layer (64 x 64 tokens, benchmarks/bench_backends.py --cpu-flex); "
    "use 'sdpa' on the CPU and 'flex' on CUDA"
)
FLEX_MAX_COMPILES = 64

try:
    from torch.nn.attention.flex_attention import flex_attention as _torch_flex_attention
except ImportError:  # torch < 2.5
    _torch_flex_attention = None


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


def plan_flex(
    batch_heads: int,
    grid: Tuple[int, int],
    head_dim: int,
    max_block_mb: Optional[float] = None,
    device: Optional[torch.device | str] = None,
) -> BlockPlan:
    """flex's steps: one band, and as many batch*head rows as keep q, k, v and the rel-pos
    terms within max_block_mb or DEFAULT_FUSED_BYTES (on the CPU, within CPU_STEP_BYTES too).

    Args:
        batch_heads: B*heads.
        grid: (H, W) token grid.
        head_dim: C.
        max_block_mb: the patch's block budget, if any.
        device: where it runs (None: no CPU cap).
    """
    check_plan_args(grid, max_block_mb)
    H, W = grid
    per_row = H * W * (3 * head_dim + H + W) * FP32_BYTES  # q, k, v, rel_h, rel_w
    return plan_one_band(batch_heads, per_row, max_block_mb, device)


def workspace_bytes(plan: BlockPlan, batch_heads: int, grid: Tuple[int, int], head_dim: int, dtype: torch.dtype, strided_out: bool = False) -> int:
    """Bytes flex_attention holds beyond q, k, v and out, at its largest step, with SAM's
    rel-pos tables: rel_h and rel_w in float32 and the compiled kernel's output in q's dtype
    (the kernel's own scratch, its row statistics, is not counted).

    Args:
        plan: the call's plan (plan_flex).
        batch_heads: B*heads of the call's q, k, v.
        grid: (H, W) token grid.
        head_dim: C.
        dtype: of q, k, v.
        strided_out: unused (the output is copied into `out` either way).
    """
    H, W = grid
    rows, band = step_rows(plan, batch_heads, grid)
    return rows * band * (H + W) * FP32_BYTES + rows * band * head_dim * dtype.itemsize  # rel_h, rel_w; the output


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
        chunks: unused (one query band); max_block_mb: see plan_flex; `plan` overrides it.
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
    plan = plan or plan_flex(BH, grid, C, max_block_mb, q.device)
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
