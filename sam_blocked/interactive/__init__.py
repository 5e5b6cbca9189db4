"""Interactive segmentation on a kept embedding, whole images and tiled ones. No Gradio here."""
