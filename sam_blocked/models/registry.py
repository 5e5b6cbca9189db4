"""SAM architectures by registry name, built with seeded random weights.

Checkpoints are loaded by `sam_blocked.models.checkpoints.load_sam`; this file only knows the
shapes. "tiny" is a two-block architecture of the same classes for tests and quick tries:
it has no checkpoint and its masks are meaningless.
"""

from __future__ import annotations

from functools import partial
from typing import Sequence

import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

# name -> (embed_dim, depth, heads, global_attn_indexes, window_size), as segment_anything's build_sam.py
ENCODER_CONFIGS: dict[str, tuple[int, int, int, tuple[int, ...], int]] = {
    "vit_b": (768, 12, 12, (2, 5, 8, 11), 14),
    "vit_l": (1024, 24, 16, (5, 11, 17, 23), 14),
    "vit_h": (1280, 32, 16, (7, 15, 23, 31), 14),
    "tiny": (64, 2, 2, (1,), 7),
}
MODEL_TYPES = ("vit_b", "vit_l", "vit_h")
MODEL_TYPE_CHOICES = ("auto", "default", *ENCODER_CONFIGS)  # where a checkpoint may name the type: auto detects it, default is vit_h
PATCH_SIZE = 16
PROMPT_EMBED_DIM = 256
MLP_RATIO = 4  # every SAM encoder's MLP: dim -> 4 * dim -> dim
# the image encoder's dtypes, by the names settings and flags use
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_model_type(model_type: str, choices: Sequence[str] = tuple(ENCODER_CONFIGS)) -> str:
    """`model_type` if it is one of `choices` (default: an architecture of ENCODER_CONFIGS;
    MODEL_TYPE_CHOICES where a checkpoint may decide), else a ValueError naming them."""
    if model_type not in choices:
        raise ValueError(f"unknown model type {model_type!r}: choose one of {', '.join(choices)}")
    return model_type


def check_dtype(dtype: str) -> torch.dtype:
    """The torch dtype a dtype setting names (a key of DTYPES), else a ValueError naming them."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is unknown: choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def build_sam(model_type: str, *, img_size: int = 1024, seed: int | None = 0, rel_pos_std: float = 0.5) -> Sam:
    """Build a SAM of a registry architecture, in eval mode, on the CPU, in float32.

    Args:
        model_type: "vit_b", "vit_l", "vit_h" or "tiny".
        img_size: square input size in pixels (1024 for the official checkpoints).
        seed: seeds the random weights; None leaves torch's global generator as it is.
        rel_pos_std: std of the random rel-pos tables (stock SAM zero-initialises them,
            which would hide the relative-position term from any equivalence check).
    """
    check_model_type(model_type)
    if img_size <= 0 or img_size % PATCH_SIZE:
        raise ValueError(f"img_size={img_size} must be a positive multiple of the patch size {PATCH_SIZE}")
    embed_dim, depth, heads, global_idx, window = ENCODER_CONFIGS[model_type]
    grid = img_size // PATCH_SIZE
    generator_state = torch.random.get_rng_state()
    if seed is not None:
        torch.manual_seed(seed)
    try:
        sam = Sam(
            image_encoder=ImageEncoderViT(
                depth=depth,
                embed_dim=embed_dim,
                img_size=img_size,
                mlp_ratio=MLP_RATIO,
                norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
                num_heads=heads,
                patch_size=PATCH_SIZE,
                qkv_bias=True,
                use_rel_pos=True,
                global_attn_indexes=global_idx,
                window_size=window,
                out_chans=PROMPT_EMBED_DIM,
            ),
            prompt_encoder=PromptEncoder(
                embed_dim=PROMPT_EMBED_DIM,
                image_embedding_size=(grid, grid),
                input_image_size=(img_size, img_size),
                mask_in_chans=16,
            ),
            mask_decoder=MaskDecoder(
                num_multimask_outputs=3,
                transformer=TwoWayTransformer(depth=2, embedding_dim=PROMPT_EMBED_DIM, mlp_dim=2048, num_heads=8),
                transformer_dim=PROMPT_EMBED_DIM,
                iou_head_depth=3,
                iou_head_hidden_dim=256,
            ),
            pixel_mean=[123.675, 116.28, 103.53],
            pixel_std=[58.395, 57.12, 57.375],
        )
        with torch.no_grad():
            for name, param in sam.image_encoder.named_parameters():
                if name.endswith(("rel_pos_h", "rel_pos_w")):
                    param.normal_(0.0, rel_pos_std)
                elif name == "pos_embed":
                    param.normal_(0.0, 0.02)
    finally:
        if seed is not None:
            torch.random.set_rng_state(generator_state)
    return sam.eval()


def cast_image_encoder(sam: Sam, dtype: torch.dtype) -> Sam:
    """Run the image encoder in `dtype` while the prompt encoder and mask decoder stay float32.

    SamPredictor feeds the encoder float32 pixels and the decoder expects float32
    embeddings, so the encoder's input is cast on the way in and its output on the way out.
    """
    encoder = sam.image_encoder
    encoder.to(dtype)
    for handle in getattr(encoder, "_sam_blocked_cast_hooks", ()):
        handle.remove()
    if dtype == torch.float32:
        encoder._sam_blocked_cast_hooks = ()
        return sam
    encoder._sam_blocked_cast_hooks = (
        encoder.register_forward_pre_hook(lambda module, args: tuple(a.to(dtype) for a in args)),
        encoder.register_forward_hook(lambda module, args, output: output.float()),
    )
    return sam
