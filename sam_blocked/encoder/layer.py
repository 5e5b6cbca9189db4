"""One SAM image-encoder attention layer, computed in blocks, whatever library built it.

qkv is projected a few heads at a time, each group runs a backend's exact attention
(sam_blocked.attention.dispatch), and the output projection follows: the forward every adapter's
patched class calls with its own module's weights. Its settings are a `BlockConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from sam_blocked.attention.common import DEFAULT_CHUNKS, FP32_BYTES, check_max_block_mb, chunk_bands
from sam_blocked.attention.dispatch import KERNELS, check_backend_name, plan_backend, resolve_backend
from sam_blocked.encoder.tokenwise import token_chunk

Tensor = torch.Tensor


@dataclass(frozen=True)
class BlockConfig:
    """Settings of one patched Attention: fixed `chunks`, or a `max_block_mb` budget, and the backend."""

    chunks: int = DEFAULT_CHUNKS
    max_block_mb: Optional[float] = None
    backend: str = "auto"


def check_config(chunks: int, max_block_mb: Optional[float], backend: str) -> BlockConfig:
    """A BlockConfig, or a ValueError naming the bad setting."""
    chunk_bands(chunks)  # raises on a bad count
    max_block_mb = check_max_block_mb(max_block_mb)
    check_backend_name(backend)
    return BlockConfig(chunks, max_block_mb, backend)


def attention_layer(
    x: Tensor,
    qkv: torch.nn.Linear,
    proj: torch.nn.Linear,
    num_heads: int,
    scale: float,
    rel_pos_h: Optional[Tensor],
    rel_pos_w: Optional[Tensor],
    config: BlockConfig,
    q_norm: Optional[Callable[[Tensor], Tensor]] = None,
    k_norm: Optional[Callable[[Tensor], Tensor]] = None,
) -> Tensor:
    """proj(softmax(q k^T * scale + rel_h + rel_w) v) with q, k, v = qkv(x) split in heads, exactly.

    Args:
        x: (B, H, W, dim), tokens on an H x W grid (a window, or the whole image).
        qkv: Linear dim -> 3 * heads * head_dim, laid out (3, heads, head_dim) as SAM's.
        proj: Linear heads * head_dim -> dim.
        num_heads: heads.
        scale: multiplies q k^T.
        rel_pos_h, rel_pos_w: the decomposed rel-pos tables (Lh, head_dim), (Lw, head_dim),
            resized at run time by get_rel_pos's rule, or both None.
        config: chunks or max_block_mb, and the backend.
        q_norm, k_norm: applied to each head's q and k, (B*heads, N, C), before attention and
            before the rel-pos terms (timm's qk_norm); None for none, as in SAM.

    Returns:
        (B, H, W, dim) in x's dtype.
    """
    return proj(attention_heads(x, qkv, num_heads, scale, rel_pos_h, rel_pos_w, config, q_norm, k_norm))


def projected_heads(
    batch: int, tokens: int, heads: int, head_dim: int, max_block_mb: Optional[float] = None, device: Optional[torch.device | str] = "cpu"
) -> int:
    """Heads whose q, k, v are projected at once: all of them when their float32 q, k, v
    fit a token step (tokenwise.token_chunk's budget), else as many as fit, at least one
    and at most a third of the heads (q, k, v within one activation)."""
    per_head = 3 * batch * tokens * head_dim * FP32_BYTES
    fit = token_chunk(1, max_block_mb, device) * FP32_BYTES // per_head
    return heads if fit >= heads else max(1, min(fit, heads // 3))


def attention_heads(
    x: Tensor,
    qkv: torch.nn.Linear,
    num_heads: int,
    scale: float,
    rel_pos_h: Optional[Tensor],
    rel_pos_w: Optional[Tensor],
    config: BlockConfig,
    q_norm: Optional[Callable[[Tensor], Tensor]] = None,
    k_norm: Optional[Callable[[Tensor], Tensor]] = None,
) -> Tensor:
    """attention_layer before its output projection: the heads side by side.

    Args: as attention_layer.

    Returns:
        (B, H, W, heads * head_dim) in x's dtype, contiguous.
    """
    B, H, W, dim = x.shape
    heads = num_heads
    head_dim = qkv.out_features // (3 * heads)
    backend = resolve_backend(config.backend, x.device, x.dtype, (H, W), head_dim, config.max_block_mb)
    plan = plan_backend(backend, B * heads, (H, W), head_dim, config.chunks, config.max_block_mb, x.device)

    # q, k, v are projected for a few heads at a time, so the full (3, B*heads, N, C)
    # projection never exists either: only `heads_per_step` of it at once.
    heads_per_step = projected_heads(B, H * W, heads, head_dim, config.max_block_mb, x.device)
    out = x.new_empty(B, H * W, heads, head_dim)  # (B, N, heads, C)
    weight = qkv.weight.view(3, heads, head_dim, dim)
    bias = None if qkv.bias is None else qkv.bias.view(3, heads, head_dim)
    for h0 in range(0, heads, heads_per_step):
        h1 = min(heads, h0 + heads_per_step)
        g = h1 - h0
        if g == heads:
            qkv_g = qkv(x)
        else:
            qkv_g = F.linear(
                x,
                weight[:, h0:h1].reshape(3 * g * head_dim, dim),
                None if bias is None else bias[:, h0:h1].reshape(-1),
            )  # (B, H, W, 3*g*C)
        # (3, B*g, N, C), as stock's reshape: a view when B == 1
        qkv_g = qkv_g.reshape(B, H * W, 3, g, head_dim).permute(2, 0, 3, 1, 4).reshape(3, B * g, H * W, head_dim)
        q, k, v = qkv_g.unbind(0)
        if q_norm is not None:
            q = q_norm(q)
        if k_norm is not None:
            k = k_norm(k)
        if B == 1:  # the kernel writes straight into this step's heads: (g, N, C), strided
            KERNELS[backend](q, k, v, (H, W), rel_pos_h, rel_pos_w, scale=scale, plan=plan, out=out[0, :, h0:h1].transpose(0, 1))
        else:
            o = KERNELS[backend](q, k, v, (H, W), rel_pos_h, rel_pos_w, scale=scale, plan=plan)  # (B*g, N, C)
            out[:, :, h0:h1] = o.view(B, g, H * W, head_dim).transpose(1, 2)
            del o
        del qkv_g, q, k, v
    return out.view(B, H, W, heads * head_dim)
