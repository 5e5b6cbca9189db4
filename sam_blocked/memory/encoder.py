"""What SAM's image encoder holds at once, phase by phase, stock and patched: a count of tensors.

Each phase is a sum of the tensors alive together, from the shapes and the same blocking
rules the code runs (dispatch.plan_backend, layer.projected_heads, tokenwise's chunks), in
bytes over the weights and the input. a = one activation, batch x tokens x dim x itemsize.

Patched (block.encoder_block):
- global attention: the input, norm1(x), the heads (3 a), one step's q, k, v and the
  kernel's workspace (its bias block, rel-pos terms and output: the kernel's own
  workspace_bytes, asked through attention.dispatch);
- windowed attention: input and output (2 a), one step's windows and heads beside their
  own q, k, v and kernel workspace (or, while it is copied, the projection), then the
  windows, heads and output projection;
- MLP: input and output (2 a), one chunk's norm or output beside its hidden layer.
On the CPU the steps (a chunk, a head group, a group of windows) run on several threads at
once (attention.threads), each sized to its share of the budget: a phase holds that many
steps' tensors.
Stock (segment_anything's Block.forward): global attention holds the input, norm1(x), q, k,
v and their permuted copy (8 a) and three (batch * heads, N, N) score tensors while the
rel-pos terms are added; windowed attention the padded and partitioned copies and the
windows' scores; the MLP the input, the sum, the norm, the hidden layer and GELU's copy
(11 a). Both: the patch embedding (its output and the sum with pos_embed, 2 a; patched, its
convolution runs in bands of rows, as tokenwise.patch_embedding: stock's whole-image
convolution in bfloat16 on the CPU also takes oneDNN's workspace, 8 KiB a token, not
counted here) and the neck (its input and a few (batch, 256, g, g) maps).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from sam_blocked.attention.common import FP32_BYTES
from sam_blocked.attention.dispatch import plan_backend, resolve_backend, workspace_bytes
from sam_blocked.attention.threads import step_threads, steps_at_once, steps_on_threads
from sam_blocked.encoder.layer import projected_heads
from sam_blocked.models.registry import ENCODER_CONFIGS, MLP_RATIO, PATCH_SIZE, PROMPT_EMBED_DIM
from sam_blocked.encoder.tokenwise import mlp_chunk, window_chunk, windows_per_step



@dataclass(frozen=True)
class EncoderShape:
    """The sizes an encoder's memory depends on."""

    dim: int
    depth: int
    heads: int
    mlp_dim: int
    window: int
    global_blocks: tuple[int, ...]

    @classmethod
    def of(cls, model_type: str) -> "EncoderShape":
        """The shape of a registry architecture (models.ENCODER_CONFIGS)."""
        dim, depth, heads, global_idx, window = ENCODER_CONFIGS[model_type]
        return cls(dim, depth, heads, dim * MLP_RATIO, window, tuple(global_idx))

    @classmethod
    def from_encoder(cls, encoder: torch.nn.Module) -> "EncoderShape":
        """The shape of a built segment_anything ImageEncoderViT (patched or not)."""
        blocks = encoder.blocks
        windows = [b.window_size for b in blocks if b.window_size > 0]
        return cls(
            dim=encoder.patch_embed.proj.out_channels,
            depth=len(blocks),
            heads=blocks[0].attn.num_heads,
            mlp_dim=blocks[0].mlp.lin1.out_features,
            window=max(windows, default=0),
            global_blocks=tuple(i for i, b in enumerate(blocks) if b.window_size == 0),
        )


def encoder_phases(
    shape: EncoderShape,
    img_size: int,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    batch: int = 1,
    chunks: int = 16,
    max_block_mb: Optional[float] = None,
    patched: bool = True,
    backend: str = "auto",
    threads: Optional[int] = None,
) -> dict[str, int]:
    """Bytes alive at once in each phase of one encoder forward, over the weights and the input.

    Args:
        shape: the encoder (EncoderShape.of / from_encoder).
        img_size: square input side in pixels, a multiple of 16.
        dtype: the encoder's dtype.
        device: where it runs (the patched blocking depends on it).
        batch: images per forward.
        chunks, max_block_mb: the patch's blocking; ignored when not `patched`.
        patched: sam_blocked's blocks, or stock segment_anything's.
        backend: the patch's attention backend ("auto": the one auto picks for each layer).
        threads: the threads the patched steps run on at once (attention.threads; each step
            then sized to its share of the budget); None: as a call from this thread would
            now (torch's thread count on the CPU).

    Raises:
        ValueError: the named backend cannot run one of the encoder's layers (as the patch would refuse it).
    """
    e = torch.empty((), dtype=dtype).element_size()
    grid = img_size // PATCH_SIZE
    n = grid * grid
    a = batch * n * shape.dim * e
    neck = batch * n * PROMPT_EMBED_DIM * max(e, FP32_BYTES)
    phases = {"patch embedding": 2 * a, "neck": a + 4 * neck}
    device = torch.device(device)
    if not patched:
        phases.update(_stock(shape, grid, batch, e, dtype, device, chunks, max_block_mb, backend))
        return phases
    threads = step_threads(device) if threads is None else threads
    with steps_on_threads(threads):
        phases.update(_patched(shape, grid, batch, e, dtype, device, chunks, max_block_mb, backend, steps_at_once(device)))
    return phases


def _patched(s: EncoderShape, grid: int, batch: int, e: int, dtype, device, chunks: int, max_block_mb, backend: str, at_once: int) -> dict[str, int]:
    """The patched phases, with `at_once` steps (token chunks, heads, window groups) alive at once."""
    n, head_dim = grid * grid, s.dim // s.heads
    a = batch * n * s.dim * e
    chunk = min(mlp_chunk(s.dim, s.mlp_dim, max_block_mb, device), batch * n)
    phases = {"MLP": 2 * a + min(at_once, math.ceil(batch * n / chunk)) * chunk * (s.dim + s.mlp_dim) * e}
    if s.global_blocks:
        work, g = _attention(batch, s.heads, (grid, grid), head_dim, e, dtype, device, chunks, max_block_mb, backend)
        qkv = 3 * batch * g * n * head_dim * e * (2 if batch > 1 else 1)  # a view of the projection when batch == 1
        phases["global attention"] = 3 * a + qkv + work  # the kernel counts its bands at once (BlockPlan.threads)
    if len(s.global_blocks) < s.depth:
        ws = s.window
        k = min(windows_per_step(batch, ws, window_chunk(s.dim, max_block_mb, device)), math.ceil(grid / ws))
        step = batch * k * ws * ws  # tokens of one step's windows
        with steps_on_threads(at_once, in_step=True):  # each group of windows' attention runs inside its step
            work, g = _attention(batch * k, s.heads, (ws, ws), head_dim, e, dtype, device, chunks, max_block_mb, backend)
        qkv = 3 * step * g * head_dim * e  # the (3, B*g, N, C) copy of the projection, which lives beside it only while copied
        # the step's windows and heads' output beside q, k, v and the kernel (or the projection); then the output projection
        kernel = 2 * step * s.dim * e + qkv + max(qkv, work)
        steps = math.ceil(grid / ws) * math.ceil(math.ceil(grid / ws) / k)
        phases["windowed attention"] = 2 * a + min(at_once, steps) * max(kernel, 3 * step * s.dim * e)
    return phases


def _attention(batch, heads, grid, head_dim, e, dtype, device, chunks, max_block_mb, backend) -> tuple[int, int]:
    """A patched attention call's kernel workspace in bytes (the kernel's own workspace_bytes,
    and the kernel's output before the heads' buffer), and the heads projected per step."""
    backend = resolve_backend(backend, device, dtype, grid, head_dim, max_block_mb)  # as layer.attention_heads
    plan = plan_backend(backend, batch * heads, grid, head_dim, chunks, max_block_mb, device)
    H, W = grid
    n = H * W
    g = projected_heads(batch, n, heads, head_dim, max_block_mb, device)
    # layer.attention_heads: at batch 1 the kernel writes into a strided view of the heads' buffer,
    # else it returns its own output, copied into the buffer after
    work = workspace_bytes(backend, plan, batch * g, grid, head_dim, dtype, strided_out=batch == 1)
    out = 0 if batch == 1 else batch * g * n * head_dim * e  # the kernel's own output before the heads' buffer
    return work + out, g


def _stock(s: EncoderShape, grid: int, batch: int, e: int, dtype, device, chunks, max_block_mb, backend) -> dict[str, int]:
    n = grid * grid
    a = batch * n * s.dim * e
    phases = {"MLP": 3 * a + 2 * batch * n * s.mlp_dim * e}
    if s.global_blocks:
        scores = batch * s.heads * n * n * e
        phases["global attention"] = 8 * a + 3 * scores
    if len(s.global_blocks) < s.depth:
        ws = s.window
        windows = math.ceil(grid / ws) ** 2
        padded = a * windows * ws * ws // n
        scores = batch * windows * s.heads * (ws * ws) ** 2 * e
        phases["windowed attention"] = a + 7 * padded + 3 * scores
    return phases
