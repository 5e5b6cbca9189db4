"""Input resolution for transformers' SAM: SamModel, SamHQModel and their vision models at another size.

transformers keeps the input size in more places than segment_anything; set_image_size
changes all of them, by the same rules as sam_blocked.resolution.sam:

- vision_encoder.patch_embed.image_size (its forward refuses any other input size) and
  num_patches; vision_encoder.image_size; the vision config's image_size;
- vision_encoder.pos_embed, (1, g, g, C): resampled bicubically from the original, which is
  kept as a plain attribute (resolution.pos_embed.set_pos_embed_grid), so going back restores it;
- SamModel / SamHQModel: prompt_encoder.image_embedding_size (g, g) and input_image_size
  (points and boxes are divided by it), and the prompt-encoder config's image_size and
  image_embedding_size (get_image_wide_positional_embeddings reads the grid from it);
- given the processor (SamProcessor or its image processor, as pipeline("mask-generation")
  holds it): size {"longest_edge": size}, pad_size (size, size), mask_size {"longest_edge": 4g},
  mask_pad_size (4g, 4g) and SamProcessor.target_size, which scale points, pad images and
  upsample masks.

The global blocks' rel-pos tables stay as they are: transformers' get_rel_pos interpolates
them to 2*g-1 at every call, as the blocked attention does. Windowed blocks keep their
windows and pad the grid to whole windows. A processor not given keeps its old size: the
pipeline and SamProcessor then feed 1024 px images, which the vision encoder refuses.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from sam_blocked.resolution.pos_embed import check_size, patch_size_of, set_pos_embed_grid


def is_transformers_sam(model: Any) -> bool:
    """True for transformers' SamModel, SamHQModel, SamVisionModel, SamHQVisionModel and their vision encoders."""
    return _kind(model) is not None


def image_size(model: torch.nn.Module) -> int:
    """The square input size the model takes now, in pixels."""
    height, width = _vision_encoder(model).patch_embed.image_size
    if height != width:
        raise ValueError(f"the model takes {height} x {width} px inputs: set_image_size makes square ones")
    return int(height)


def set_image_size(model: torch.nn.Module, size: int, processor: Optional[Any] = None) -> torch.nn.Module:
    """Adapt a transformers SAM, in place, to square inputs of `size` x `size` pixels.

    Args:
        model: SamModel, SamHQModel, SamVisionModel, SamHQVisionModel (or the vision
            encoder), patched or not.
        size: input side in pixels, a positive multiple of the patch size (16).
        processor: the model's SamProcessor / SamHQProcessor or SamImageProcessor, updated
            to resize, pad and post-process at `size`; a pipeline's is `pipe.image_processor`.

    Returns:
        `model`, resized.
    """

    encoder = _vision_encoder(model)
    patch = _patch_size(encoder)
    size = check_size(size, patch)
    grid = size // patch
    if encoder.pos_embed is not None:
        set_pos_embed_grid(encoder, grid)
    encoder.patch_embed.image_size = (size, size)
    encoder.patch_embed.num_patches = grid * grid
    encoder.image_size = size
    encoder.config.image_size = size
    if _kind(model) == "model":
        model.config.vision_config.image_size = size
        model.prompt_encoder.image_embedding_size = (grid, grid)
        model.prompt_encoder.input_image_size = size
        model.config.prompt_encoder_config.image_size = size
        model.config.prompt_encoder_config.image_embedding_size = grid
    if processor is not None:
        _set_processor_size(processor, size, grid)
    return model


def _kind(model: Any) -> Optional[str]:
    from sam_blocked.adapters.transformers import model_kind

    return model_kind(model)


def _vision_encoder(model: torch.nn.Module) -> torch.nn.Module:
    kind = _kind(model)
    if kind is None:
        raise ValueError(f"expected a transformers SamModel, SamHQModel or their vision model, got {type(model).__qualname__}")
    return model if kind == "encoder" else model.vision_encoder


def _patch_size(encoder: torch.nn.Module) -> int:

    patch = patch_size_of(encoder.patch_embed.projection)
    height, width = encoder.patch_embed.image_size
    grid = (height // patch, width // patch)
    if encoder.pos_embed is not None and tuple(encoder.pos_embed.shape[1:3]) != grid:
        raise ValueError(
            f"pos_embed is a {encoder.pos_embed.shape[1]} x {encoder.pos_embed.shape[2]} grid but the patch embedding "
            f"takes {height} x {width} px ({grid[0]} x {grid[1]} patches): the model was resized outside set_image_size"
        )
    return patch


def _set_processor_size(processor: Any, size: int, grid: int) -> None:
    image_processor = getattr(processor, "image_processor", processor)
    missing = [a for a in ("size", "pad_size", "mask_size", "mask_pad_size") if not hasattr(image_processor, a)]
    if missing:
        raise ValueError(
            f"processor {type(processor).__qualname__} has no {', '.join(missing)}: pass the model's SamProcessor "
            "or SamImageProcessor (a pipeline's is pipe.image_processor)"
        )
    image_processor.size = _size_like(image_processor.size, longest_edge=size)
    image_processor.pad_size = _size_like(image_processor.pad_size, height=size, width=size)
    image_processor.mask_size = _size_like(image_processor.mask_size, longest_edge=4 * grid)
    image_processor.mask_pad_size = _size_like(image_processor.mask_pad_size, height=4 * grid, width=4 * grid)
    if hasattr(processor, "target_size"):
        processor.target_size = size


def _size_like(old: Any, **size: int) -> Any:
    """A new size of old's type: transformers' SizeDict, or a plain dict in older versions."""
    return size if isinstance(old, dict) or old is None else type(old)(**size)
