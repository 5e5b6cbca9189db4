"""Models: the registry of encoder shapes, checkpoints, and loading a patched model from settings."""
