"""Outputs: atomic writing, the whole-image and huge-image writers, label images, COCO and object tables."""
