"""Small SAM image encoders of every library sam_blocked patches, with seeded weights that make attention peaked.

Each builder returns (model, run), where run(model, pixels) gives the tensor(s) that
library's own encoder call returns, for pixels of shape (B, 3, SIZE, SIZE). 256 px inputs
with 16 px patches give a 16 x 16 token grid: the global blocks see 256 tokens and the
7 x 7 windows need padding (16 is not a multiple of 7), both paths SAM has.
"""

from __future__ import annotations

import math
from functools import partial

import torch

SIZE = 256
EMBED, HEADS, WINDOW, DEPTH, GLOBAL = 64, 2, 7, 2, (1,)
NECK = 32


def peaked(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Seeded weights for every parameter, the qkv ones scaled so scores reach tens (near one-hot rows),
    rel-pos tables and position embeddings of order one; norms left at their defaults."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "rel_pos" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif "pos_embed" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            elif p.dim() >= 2:
                fan_in = math.prod(p.shape[1:])
                gain = 3.0 if "qkv" in name else 1.0
                p.copy_(torch.randn(p.shape, generator=g) * gain / math.sqrt(fan_in))
            elif "norm" in name:
                continue
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model.eval()


def pixels(batch: int = 1, seed: int = 1, size: int = SIZE) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


# --- segment_anything and segment_anything_hq ------------------------------------------------


def _vit_kwargs():
    return dict(
        img_size=SIZE, patch_size=16, embed_dim=EMBED, depth=DEPTH, num_heads=HEADS, mlp_ratio=4,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), qkv_bias=True, use_rel_pos=True,
        global_attn_indexes=GLOBAL, window_size=WINDOW, out_chans=NECK,
    )  # fmt: skip


def segment_anything_encoder(seed: int = 0):
    from segment_anything.modeling import ImageEncoderViT

    return peaked(ImageEncoderViT(**_vit_kwargs()), seed), lambda m, x: m(x)


def sam_hq_encoder(seed: int = 0):
    from segment_anything_hq.modeling import ImageEncoderViT

    return peaked(ImageEncoderViT(**_vit_kwargs()), seed), lambda m, x: m(x)  # (embedding, [global blocks' outputs])


def sam_hq_sam(seed: int = 0):
    """A whole segment_anything_hq Sam at SIZE px (HQ mask decoder), for its own SamPredictor."""
    from segment_anything_hq.modeling import ImageEncoderViT, MaskDecoderHQ, PromptEncoder, Sam, TwoWayTransformer

    grid = SIZE // 16
    sam = Sam(
        image_encoder=ImageEncoderViT(**{**_vit_kwargs(), "out_chans": 256}),
        prompt_encoder=PromptEncoder(embed_dim=256, image_embedding_size=(grid, grid), input_image_size=(SIZE, SIZE), mask_in_chans=16),
        mask_decoder=MaskDecoderHQ(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=512, num_heads=8),
            transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=64, vit_dim=EMBED,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )  # fmt: skip
    return peaked(sam, seed)


# --- transformers ------------------------------------------------------------------------


def _hf_vision_config(**overrides):
    from transformers import SamVisionConfig

    kwargs = dict(
        hidden_size=EMBED, num_hidden_layers=DEPTH, num_attention_heads=HEADS, image_size=SIZE, patch_size=16,
        window_size=WINDOW, global_attn_indexes=list(GLOBAL), output_channels=NECK, mlp_dim=4 * EMBED,
    )  # fmt: skip
    return SamVisionConfig(**{**kwargs, **overrides})


def transformers_vision(impl: str = "sdpa", seed: int = 0, hq: bool = False):
    if hq:
        from transformers import SamHQVisionConfig, SamHQVisionModel

        config = SamHQVisionConfig(**_hf_vision_config().to_dict())
        model = SamHQVisionModel._from_config(config, attn_implementation=impl)
    else:
        from transformers import SamVisionModel

        model = SamVisionModel._from_config(_hf_vision_config(), attn_implementation=impl)
    return peaked(model, seed), lambda m, x: m(pixel_values=x).last_hidden_state


def transformers_sam_config(hq: bool = False):
    """A small SamConfig (or SamHQConfig): the vision encoder above, a 256-wide prompt encoder and decoder."""
    from transformers import SamConfig, SamHQConfig

    vision = _hf_vision_config(output_channels=256).to_dict()
    prompt = dict(image_size=SIZE, image_embedding_size=SIZE // 16, hidden_size=256)
    decoder = dict(hidden_size=256, mlp_dim=512, num_hidden_layers=2, num_attention_heads=8, iou_head_hidden_dim=64)
    if hq:
        decoder["vit_dim"] = EMBED
        return SamHQConfig(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder)
    return SamConfig(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder)


def transformers_sam(impl: str = "sdpa", seed: int = 0, hq: bool = False):
    from transformers import SamHQModel, SamModel

    cls = SamHQModel if hq else SamModel
    model = peaked(cls._from_config(transformers_sam_config(hq), attn_implementation=impl), seed)
    return model, lambda m, x: m.get_image_embeddings(x)


# --- timm --------------------------------------------------------------------------------


def timm_vit(seed: int = 0, **overrides):
    from timm.models.vision_transformer_sam import VisionTransformerSAM

    kwargs = dict(
        img_size=SIZE, patch_size=16, embed_dim=EMBED, depth=DEPTH, num_heads=HEADS, window_size=WINDOW,
        global_attn_indexes=GLOBAL, use_rel_pos=True, neck_chans=NECK, num_classes=0,
    )  # fmt: skip
    return peaked(VisionTransformerSAM(**{**kwargs, **overrides}), seed), lambda m, x: m.forward_features(x)


# name -> builder of (model, run); every library's stock forward is its own oracle.
ENCODERS = {
    "segment_anything": segment_anything_encoder,
    "segment_anything_hq": sam_hq_encoder,
    "transformers-eager": partial(transformers_vision, "eager"),
    "transformers-sdpa": partial(transformers_vision, "sdpa"),
    "transformers-hq-eager": partial(transformers_vision, "eager", hq=True),
    "transformers-hq-sdpa": partial(transformers_vision, "sdpa", hq=True),
    "timm": timm_vit,
    "timm-qk-norm": partial(timm_vit, qk_norm=True),
    "timm-unfused": partial(timm_vit),  # fused_attn switched off by the test
}


def flat(output) -> torch.Tensor:
    """All tensors of an encoder's output, flattened into one float64 vector (tuples and lists too)."""
    if isinstance(output, torch.Tensor):
        return output.double().flatten()
    return torch.cat([flat(o) for o in output])
