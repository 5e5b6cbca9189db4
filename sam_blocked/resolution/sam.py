"""Input resolution: run a loaded SAM at another square input size (1536, 2048, 4096 px ...).

SAM is trained at 1024 px: a 64 x 64 token grid and a learned absolute position
embedding of that shape. `set_image_size` changes every place the size lives:

- image_encoder.pos_embed, (1, g, g, C), is resampled bicubically in float32 as timm's
  resample_abs_pos_embed_nhwc does for its SAM ViTs: F.interpolate, align_corners=False,
  antialias=True (timm's default). Even when upscaling that is not antialias=False:
  True uses PIL's cubic kernel (a = -0.5), False the a = -0.75 one, some 8% apart;
- image_encoder.img_size, which Sam.preprocess pads to, Sam.postprocess_masks upsamples
  to, and SamPredictor reads when it is constructed (ResizeLongestSide(img_size));
- prompt_encoder.image_embedding_size (g, g), input_image_size (size, size) and
  mask_input_size (4g, 4g), so point, box and mask prompts and get_dense_pe match.

Nothing else holds the size. Global blocks' rel-pos tables (2*64-1 rows) are left as
they are: stock get_rel_pos and the patched attention's resize_rel_pos both interpolate
them linearly to 2*g-1 at run time, by the same rule. Windowed blocks keep their 14 x 14
windows and tables; the grid is padded to whole windows, as stock already does at 1024.

SamPredictor and SamAutomaticMaskGenerator read the size when constructed: create them
after set_image_size. One made before fails SamPredictor's own assertion in set_image.

The same holds for segment_anything_hq's Sam (a copy of these classes). transformers'
SamModel keeps the size in more places: sam_blocked.resolution.transformers, which
set_image_size calls for it. timm's VisionTransformerSAM needs nothing: it resamples its
position embedding to the input's grid on every call.

The original embedding is kept on the encoder as a plain attribute, not a parameter or
buffer: state_dict keys never change, and the state_dict of a resized model holds the
resized pos_embed. Every resize starts from the original, so 1024 -> 1536 -> 2048 equals
1024 -> 2048, and going back to the original size restores it bit for bit (in the
model's current dtype and device). If pos_embed changed since it was resized (a
load_state_dict, training), the kept original is stale and is dropped: the current
embedding becomes the original. Checkpoints for 1024 px load before resizing.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any, Iterator, Optional

import torch
from segment_anything.modeling import ImageEncoderViT, PromptEncoder, Sam

from sam_blocked.resolution import transformers as resolution_transformers
from sam_blocked.resolution.pos_embed import check_size, patch_size_of, set_pos_embed_grid


def set_image_size(sam: torch.nn.Module, size: int, processor: Optional[Any] = None) -> torch.nn.Module:
    """Adapt `sam`, in place, to square inputs of `size` x `size` pixels.

    Args:
        sam: a segment_anything or segment_anything_hq Sam with a ViT image encoder, or
            transformers' SamModel / SamHQModel / SamVisionModel / SamHQVisionModel;
            patched or not, on any device and dtype.
        size: input side in pixels, a positive multiple of the patch size (16); the
            token grid is size/16 per side. The size the model was built or loaded at
            restores its original position embedding exactly.
        processor: transformers only: the model's SamProcessor or SamImageProcessor (a
            mask-generation pipeline's `pipe.image_processor`), set to the same size.

    Returns:
        `sam`, resized. Create SamPredictor / SamAutomaticMaskGenerator after this call.
    """
    if resolution_transformers.is_transformers_sam(sam):
        return resolution_transformers.set_image_size(sam, size, processor)
    if processor is not None:
        raise ValueError("processor is for transformers' SamModel only: segment_anything's Sam has none to update")
    encoder, prompt = _check_sam(sam)
    patch = _patch_size(encoder)
    size = check_size(size, patch)
    grid = size // patch
    if encoder.pos_embed is not None:
        set_pos_embed_grid(encoder, grid)
    encoder.img_size = size
    prompt.image_embedding_size = (grid, grid)
    prompt.input_image_size = (size, size)
    prompt.mask_input_size = (4 * grid, 4 * grid)
    return sam


@contextlib.contextmanager
def resized(sam: torch.nn.Module, size: int, processor: Optional[Any] = None) -> Iterator[torch.nn.Module]:
    """Run `sam` at `size` px for the `with` body, then set its previous size back, also on an exception."""
    if resolution_transformers.is_transformers_sam(sam):
        before = resolution_transformers.image_size(sam)
    else:
        before = _check_sam(sam)[0].img_size
    set_image_size(sam, size, processor)
    try:
        yield sam
    finally:
        set_image_size(sam, before, processor)


def _check_sam(sam: torch.nn.Module) -> tuple[ImageEncoderViT, PromptEncoder]:
    modelings = [m for m in (sys.modules.get("segment_anything.modeling"), sys.modules.get("segment_anything_hq.modeling")) if m]
    modeling = next((m for m in modelings if isinstance(sam, m.Sam)), None)
    if modeling is None:
        timm = sys.modules.get("timm.models.vision_transformer_sam")
        if timm is not None and isinstance(sam, timm.VisionTransformerSAM):
            raise ValueError(
                "timm's VisionTransformerSAM needs no set_image_size: it resamples its position embedding to "
                "the input's token grid on every call; pass images of any multiple of 16 px"
            )
        raise ValueError(
            "set_image_size takes a Sam of segment_anything or segment_anything_hq, or transformers' SamModel, "
            f"SamHQModel or their vision models, got {type(sam).__qualname__}"
        )
    encoder, prompt = sam.image_encoder, sam.prompt_encoder
    if not isinstance(encoder, modeling.ImageEncoderViT):
        raise ValueError(
            f"the image encoder is {type(encoder).__qualname__}, not {modeling.__name__}'s ImageEncoderViT: "
            "only SAM's ViT encoders (vit_b/vit_l/vit_h) can be resized"
        )
    if not isinstance(prompt, modeling.PromptEncoder):
        raise ValueError(f"the prompt encoder is {type(prompt).__qualname__}, not {modeling.__name__}'s PromptEncoder")
    return encoder, prompt


def _patch_size(encoder: torch.nn.Module) -> int:
    patch = patch_size_of(encoder.patch_embed.proj)
    if encoder.img_size % patch:
        raise ValueError(f"image_encoder.img_size={encoder.img_size} is not a multiple of its patch size {patch}")
    grid = encoder.img_size // patch
    if encoder.pos_embed is not None and tuple(encoder.pos_embed.shape[1:3]) != (grid, grid):
        raise ValueError(
            f"pos_embed is a {encoder.pos_embed.shape[1]} x {encoder.pos_embed.shape[2]} grid but "
            f"img_size={encoder.img_size} needs {grid} x {grid}: the model was resized outside set_image_size"
        )
    return patch


