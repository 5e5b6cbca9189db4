"""segment_anything_hq (SAM-HQ): a copy of segment_anything's image encoder in another module.

Its `Attention` is line for line segment_anything's, so the blocked forward and the checks
are that adapter's. Only the encoder differs (it returns `(embedding, [global blocks'
outputs])`), which the attention never sees.
"""

from __future__ import annotations

from types import ModuleType
from typing import Optional

import torch

from sam_blocked.adapters import segment_anything
from sam_blocked.adapters import state
from sam_blocked.adapters.base import ClassPatch, EncoderCall, MethodPatch
from sam_blocked.automatic.batch import process_batch
from sam_blocked.automatic.decoder import budget_bytes
from sam_blocked.adapters.registry import patched_class_named

LIBRARY = "segment_anything_hq"
MODULES = ("segment_anything_hq.modeling.image_encoder",)


def class_patches(module: ModuleType) -> list[ClassPatch]:
    """The ClassPatches for a loaded segment_anything_hq.modeling.image_encoder (none for its
    automatic_mask_generator: method_patches)."""
    if not hasattr(module, "Attention"):
        return []
    return segment_anything.class_patches(module, library=LIBRARY, home=__name__)


def method_patches(module: ModuleType) -> list[MethodPatch]:
    """For segment_anything_hq.automatic_mask_generator: its generator's _process_batch (SAM-HQ's
    own decoder, a chunk of points at a time, then sam_blocked.automatic.batch's bounded
    post-processing) and postprocess_small_regions, installed by the switch."""
    generator = getattr(module, "SamAutomaticMaskGenerator", None)
    if generator is None:
        return []

    def make_batch(stock):
        def _process_batch(self, points, im_size, crop_box, orig_size, multimask_output=True):
            config = state.config
            if config is None:
                return stock(self, points, im_size, crop_box, orig_size, multimask_output)
            predictor = self.predictor
            model = predictor.model
            image_pe = model.prompt_encoder.get_dense_pe()

            def decode(sparse, dense):
                return model.mask_decoder(
                    image_embeddings=predictor.features,
                    image_pe=image_pe,
                    sparse_prompt_embeddings=sparse,
                    dense_prompt_embeddings=dense,
                    multimask_output=multimask_output,
                    hq_token_only=False,
                    interm_embeddings=predictor.interm_features,
                )

            return process_batch(self, points, im_size, crop_box, orig_size, budget_bytes(config.max_block_mb), decode)

        return _process_batch

    return [MethodPatch(LIBRARY, generator, "_process_batch", make_batch), segment_anything.small_regions_patch(LIBRARY, generator)]


def encoder_call(model: torch.nn.Module) -> Optional[EncoderCall]:
    """A segment_anything_hq Sam (its own SamPredictor) or ImageEncoderViT; None for other models."""
    return segment_anything.encoder_call(model, package=LIBRARY)


def __getattr__(name: str) -> type:  # the Blocked* classes, for unpickling (registry.patched_class_named)
    return patched_class_named(__name__, MODULES, name)
