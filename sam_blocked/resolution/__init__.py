"""Input sizes other than 1024 px: resample the position embedding, for segment_anything, SAM-HQ and transformers."""

from sam_blocked.resolution.pos_embed import resample_pos_embed
from sam_blocked.resolution.sam import resized, set_image_size

__all__ = ["resample_pos_embed", "resized", "set_image_size"]
