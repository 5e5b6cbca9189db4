"""Attention backends: one exact computation, five ways to run it, and the rule that picks one.

Every backend computes softmax(q k^T * scale + rel_h + rel_w) v as stock segment_anything
does, and none builds an N x N tensor (N = H*W tokens):

- "blocked": attention.blocked.blocked_attention, pure PyTorch, online softmax over (query band,
  key band) blocks. Runs everywhere; the reference the others are tested against.
- "sdpa", "bands", "flashbias", "flex": query bands against every key at once, in
  sam_blocked.attention.bands, .flashbias and .flex, where each module doc says how it folds the bias in and what it
  needs ("bands" is plain PyTorch GEMMs, "sdpa" and "flashbias" SDPA's fused kernels,
  "flex" a compiled kernel).

"auto" (choose_backend) takes the first backend of auto_order(...) that can run the call:
- CPU, float32: bands, else sdpa, else blocked. Measured here (AMD EPYC, 2 cores, torch
  2.14, benchmarks/bench_backends.py, results in benchmarks/results/backends_amd-epyc-2c-*):
  one vit_b global layer at 1024 px, 0.95 s against sdpa's 1.00 on 1 thread, 14.8 s against
  19.7 at 2048 px; vit_b's windows 0.175 s against flashbias 0.191 and sdpa 0.181 on 2
  threads (vit_h's: 0.440, 0.446, 0.448; on one thread flashbias is 2-4% faster); the
  whole vit_b encoder at 1024 px 11.8 s against 12.4 with sdpa global and flashbias
  windows (1 thread).
- CPU, half precision: flashbias when its augmented head dim C + H + W (padded to 8) is at
  most 1.5 x C (SAM's 14 x 14 windows: 96 for C = 64), else sdpa, else blocked. bands
  would compute in float32 there, twice the score bytes of sdpa's half-precision bias.
- CUDA: flashbias where a fused SDPA kernel takes it, else sdpa, else blocked: the fused
  kernels read no bias from memory at all.
- blocked last everywhere: it meets any max_block_mb, where sdpa and bands cannot go
  below one token row of queries against all keys.
benchmarks/bench_backends.py measures the choice.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from sam_blocked.attention import blocked, flashbias, flex
from sam_blocked.attention.bands import bands_attention, bands_workspace_bytes, plan_sdpa, sdpa_attention, sdpa_reasons, sdpa_workspace_bytes
from sam_blocked.attention.blocked import blocked_attention, plan_blocks
from sam_blocked.attention.common import DEFAULT_CHUNKS, BlockPlan
from sam_blocked.attention.flashbias import augmented_head_dim, flashbias_attention, flashbias_reasons, plan_flashbias
from sam_blocked.attention.flex import flex_attention, flex_reasons, plan_flex

Tensor = torch.Tensor

BACKENDS = ("blocked", "sdpa", "bands", "flashbias", "flex")
BACKEND_CHOICES = ("auto", *BACKENDS)
# "auto" on the CPU in half precision takes flashbias up to this augmented / plain head-dim ratio (see above).
CPU_FLASHBIAS_MAX_RATIO = 1.5


# --- choosing a backend --------------------------------------------------------------------


def check_backend_name(backend: str) -> str:
    """Return `backend` if it names a backend or "auto"; else a ValueError listing the choices."""
    if backend not in BACKEND_CHOICES:
        raise ValueError(f"unknown attention backend {backend!r}: choose one of {', '.join(BACKEND_CHOICES)}")
    return backend


def not_supported_reasons(
    backend: str,
    device: torch.device | str,
    dtype: torch.dtype,
    grid: Tuple[int, int],
    head_dim: int,
    max_block_mb: Optional[float] = None,
) -> list[str]:
    """Why `backend` cannot run this attention call; empty when it can.

    Args:
        backend: one of BACKENDS.
        device, dtype: of q, k, v.
        grid: (H, W) token grid.
        head_dim: C, the per-head channel count of q, k and v.
        max_block_mb: the patch's block budget, if any.
    """
    device = torch.device(device)
    check_backend_name(backend)
    if backend == "blocked":
        return []
    if backend in ("sdpa", "bands"):
        return sdpa_reasons(grid, max_block_mb)
    if backend == "flashbias":
        return flashbias_reasons(device, dtype, grid, head_dim)
    return flex_reasons(device)


def choose_backend(
    device: torch.device | str,
    dtype: torch.dtype,
    grid: Tuple[int, int],
    head_dim: int,
    max_block_mb: Optional[float] = None,
) -> str:
    """The "auto" rule: the first backend of auto_order(...) that can run the call.

    Args:
        device, dtype: of q, k, v.
        grid: (H, W) token grid.
        head_dim: C.
        max_block_mb: the patch's block budget, if any.
    """
    device = torch.device(device)
    for backend in auto_order(device, grid, head_dim, dtype):
        if not not_supported_reasons(backend, device, dtype, grid, head_dim, max_block_mb):
            return backend
    return "blocked"


def auto_order(device: torch.device | str, grid: Tuple[int, int], head_dim: int, dtype: torch.dtype = torch.float32) -> Tuple[str, ...]:
    """Backends "auto" tries, fastest first, for this device type, shape and dtype (module doc)."""
    device = torch.device(device)
    if device.type == "cuda":
        return ("flashbias", "sdpa", "blocked")
    if device.type == "cpu" and dtype == torch.float32:
        return ("bands", "sdpa", "blocked")
    if device.type == "cpu" and augmented_head_dim(grid, head_dim) <= CPU_FLASHBIAS_MAX_RATIO * head_dim:
        return ("flashbias", "sdpa", "blocked")
    return ("sdpa", "blocked")


def resolve_backend(
    backend: str,
    device: torch.device | str,
    dtype: torch.dtype,
    grid: Tuple[int, int],
    head_dim: int,
    max_block_mb: Optional[float] = None,
) -> str:
    """The backend that runs this call: "auto" chosen by choose_backend, a named one checked.

    Raises:
        ValueError: a named backend cannot run the call; the message gives every reason.
    """
    if check_backend_name(backend) == "auto":
        return choose_backend(device, dtype, grid, head_dim, max_block_mb)
    reasons = not_supported_reasons(backend, device, dtype, grid, head_dim, max_block_mb)
    if reasons:
        H, W = grid
        raise ValueError(
            f"attention backend {backend!r} cannot run {H} x {W} tokens, head dim {head_dim}, "
            f"{str(dtype).removeprefix('torch.')} on {torch.device(device)}: {'; '.join(reasons)}. "
            "Pick another backend, or backend='auto' to choose one that can"
        )
    return backend


def plan_backend(
    backend: str,
    batch_heads: int,
    grid: Tuple[int, int],
    head_dim: int,
    chunks: int = DEFAULT_CHUNKS,
    max_block_mb: Optional[float] = None,
    device: Optional[torch.device | str] = None,
) -> BlockPlan:
    """How `backend` cuts one call into steps; `group` (batch*head rows per step) is what
    BlockedAttention projects at once. blocked: blocked.plan_blocks; sdpa, bands: bands.plan_sdpa;
    flashbias: flashbias.plan_flashbias; flex: flex.plan_flex.

    Args:
        backend: one of BACKENDS.
        batch_heads: B*heads.
        grid: (H, W) token grid.
        head_dim: C.
        chunks, max_block_mb: as patch_sam takes them.
        device: where it runs: on the CPU, steps stay within common.CPU_STEP_BYTES
            (None: no cap).
    """
    check_backend_name(backend)  # each plan_* checks the grid and max_block_mb
    if backend == "blocked":
        return plan_blocks(batch_heads, grid, chunks, max_block_mb)
    if backend in ("sdpa", "bands"):
        return plan_sdpa(batch_heads, grid, chunks, max_block_mb, device)
    if backend == "flashbias":
        return plan_flashbias(batch_heads, grid, head_dim, max_block_mb, device)
    return plan_flex(batch_heads, grid, head_dim, max_block_mb, device)


# backend -> its kernel, called as blocked_attention is
KERNELS = {
    "blocked": blocked_attention,
    "sdpa": sdpa_attention,
    "bands": bands_attention,
    "flashbias": flashbias_attention,
    "flex": flex_attention,
}


# backend -> the bytes its kernel holds beyond q, k, v and out: each kernel's own workspace_bytes
WORKSPACE = {
    "blocked": blocked.workspace_bytes,
    "sdpa": sdpa_workspace_bytes,
    "bands": bands_workspace_bytes,
    "flashbias": flashbias.workspace_bytes,
    "flex": flex.workspace_bytes,
}


def workspace_bytes(
    backend: str,
    plan: BlockPlan,
    batch_heads: int,
    grid: Tuple[int, int],
    head_dim: int,
    dtype: torch.dtype,
    strided_out: bool = False,
) -> int:
    """Bytes `backend`'s kernel holds beyond q, k, v and out at the largest step of one call,
    as the kernel itself states it (its workspace_bytes): what the memory planner adds up.

    Args:
        backend: one of BACKENDS (resolve "auto" first: resolve_backend).
        plan: the call's plan (plan_backend).
        batch_heads: B*heads of the call's q, k, v.
        grid: (H, W) token grid.
        head_dim: C.
        dtype: of q, k, v.
        strided_out: whether the call writes into a strided `out` (BlockedAttention's heads at batch 1).
    """
    if backend not in WORKSPACE:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)} here, got {backend!r}")
    return WORKSPACE[backend](plan, batch_heads, grid, head_dim, dtype, strided_out)


def backend_attention(
    backend: str,
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
    """Run one backend, or "auto"'s choice for these inputs; arguments as blocked_attention
    (`out`, if given, receives the result).

    Raises:
        ValueError: the named backend cannot run these inputs (see not_supported_reasons).
    """
    name = resolve_backend(backend, q.device, q.dtype, grid, q.shape[-1], max_block_mb)
    if plan is None:
        plan = plan_backend(name, q.shape[0], grid, q.shape[-1], chunks, max_block_mb, q.device)
    return KERNELS[name](q, k, v, grid, rel_pos_h, rel_pos_w, scale=scale, plan=plan, out=out)
