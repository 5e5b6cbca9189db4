"""Input sizes other than 1024 px: resample the position embedding, for segment_anything, SAM-HQ and transformers."""
