"""Automatic masks ("segment everything") at the encoder's memory: SAM's mask decoder for many
prompts on one image (decoder), SamAutomaticMaskGenerator's per-batch work in bounded steps
(batch), and the generator that uses both (generator.BlockedMaskGenerator)."""

from sam_blocked.automatic.batch import mask_to_rle, postprocess_small_regions, process_batch
from sam_blocked.automatic.decoder import budget_bytes, decoder_reasons, predict_masks
from sam_blocked.automatic.generator import BlockedMaskGenerator

__all__ = ["BlockedMaskGenerator", "budget_bytes", "decoder_reasons", "mask_to_rle", "postprocess_small_regions", "predict_masks", "process_batch"]
