"""How much arithmetic SAM's image encoder is: a count from the architecture and the input size.

Matrix products only, 2 x M x N x K each (the convention GEMM rates are quoted in), as stock
segment_anything computes them: windowed blocks project and attend over the grid padded to
whole windows. LayerNorm, GELU, softmax and adds are left out: they are what a GEMM-rate
floor does not pay for, and what the benchmarks' floor ratio shows.

    encoder_flops("vit_b", 1024)   # 9.7e11
"""

from __future__ import annotations

import math

from sam_blocked.models.registry import ENCODER_CONFIGS, MLP_RATIO, PATCH_SIZE, PROMPT_EMBED_DIM, check_model_type



def encoder_flops(model_type: str, img_size: int, batch: int = 1) -> int:
    """Floating-point operations (2 per multiply-add) of one image-encoder forward.

    Args:
        model_type: a name of models.ENCODER_CONFIGS ("vit_b", "vit_l", "vit_h", "tiny").
        img_size: square input side in pixels, a positive multiple of 16.
        batch: images per forward.
    """
    check_model_type(model_type)
    if isinstance(img_size, bool) or not isinstance(img_size, int) or img_size <= 0 or img_size % PATCH_SIZE:
        raise ValueError(f"img_size={img_size!r} must be a positive multiple of the patch size {PATCH_SIZE}")
    dim, depth, heads, global_idx, window = ENCODER_CONFIGS[model_type]
    grid = img_size // PATCH_SIZE
    tokens = grid * grid
    total = 2 * tokens * 3 * PATCH_SIZE * PATCH_SIZE * dim  # patch embedding
    for i in range(depth):
        side, count = (grid, 1) if i in global_idx else (window, math.ceil(grid / window) ** 2)
        total += attention_flops(dim, heads, side, count)
        total += 2 * 2 * tokens * dim * MLP_RATIO * dim  # lin1, lin2
    total += 2 * tokens * dim * PROMPT_EMBED_DIM + 2 * tokens * PROMPT_EMBED_DIM * PROMPT_EMBED_DIM * 9  # neck: 1x1, 3x3 convs
    return batch * total


def attention_flops(dim: int, heads: int, side: int, count: int = 1) -> int:
    """One SAM Attention over `count` side x side grids (windows, or one global grid).

    Args:
        dim: channels; heads: attention heads (head_dim = dim / heads).
        side: tokens per side of each grid; count: grids (batch x windows).
    """
    tokens = side * side * count  # the padded grid in windowed blocks
    head_dim = dim // heads
    total = 2 * tokens * dim * 4 * dim  # qkv (3 dim) and proj (dim)
    total += 2 * 2 * count * heads * (side * side) ** 2 * head_dim  # q k^T and p v
    total += 2 * tokens * heads * 2 * side * head_dim  # rel_h, rel_w: q against side + side table rows
    return total
