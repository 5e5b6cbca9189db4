"""Inputs: image files, image sources read window by window, georeferencing, and prompt files."""
