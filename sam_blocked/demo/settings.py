"""The web demo's settings: what an encode depends on, the upload caps, the shared models.

`DemoSettings` is frozen: a session keeps the settings its embeddings were computed with,
and the tile embeddings it keeps are keyed by them. Models are built once per
`ModelSettings` (sam_blocked.models.load) by `shared_model`, an lru_cache shared by every session.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Hashable, Optional

import numpy as np
from segment_anything import SamPredictor

from sam_blocked.attention.common import DEFAULT_CHUNKS
from sam_blocked.interactive.whole import MAX_PIXELS, MAX_UPLOAD_MB
from sam_blocked.interactive.tiled import MAX_TILED_PIXELS
from sam_blocked.encoder.layer import BlockConfig, check_config
from sam_blocked.inputs.base import ReadSettings
from sam_blocked.inputs.images import collect_images
from sam_blocked.models.load import LoadedModel, ModelSettings, load_model, resolve_device
from sam_blocked.memory.measure import MIB
from sam_blocked.models.registry import MODEL_TYPE_CHOICES, PATCH_SIZE, check_dtype, check_model_type
from sam_blocked.patch import patched

STOCK_LIMIT_MB = 4096.0
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")
LARGE_IMAGES = ("tiles", "whole")  # an image larger than the input size: tile by tile at native resolution, or resized whole
MAX_EVERYTHING_TILES = 16  # "Segment everything" on a large image: about 16 x 15 s with vit_b on a CPU


@dataclass(frozen=True)
class DemoSettings:
    """Everything an encode depends on: the model, its blocking, the stock comparison, the caps.

    Args:
        model: the model; its input size is also the tile size of large images.
        chunks, max_block_mb, backend: the patch (see `patch_sam`), as `blocking` gathers them.
        measure_stock, stock_limit_mb: run stock too, for the memory panel, below this estimate.
        large_images: "tiles": an image larger than the input size is segmented tile by tile
            at native resolution (a click encodes the tile around it); "whole": resized into
            one encoder pass, as SamPredictor does.
        max_pixels: the largest image encoded whole (its three candidate masks are full size).
        max_tiled_pixels: the largest image taken tile by tile (it is decoded whole: 3 bytes a pixel).
        max_upload_mb: the largest upload; the pixel caps bound the memory, this the transfer.
        max_everything_tiles: "Segment everything" on a tiled image runs up to this many tiles.
        read: the pyramid level (or mpp) and channels of images opened on the server (slides,
            OME-Zarr, TIFF: read window by window; the preview comes from a low-resolution level).
    """

    model: ModelSettings = ModelSettings("vit_b", img_size=1024)  # the demo always names its input size
    chunks: int = DEFAULT_CHUNKS
    max_block_mb: Optional[float] = None
    backend: str = "auto"
    measure_stock: bool = True  # run stock too when its planned encoder peak is below the limit
    stock_limit_mb: float = STOCK_LIMIT_MB
    max_pixels: int = MAX_PIXELS
    max_upload_mb: float = MAX_UPLOAD_MB
    large_images: str = "tiles"
    max_tiled_pixels: int = MAX_TILED_PIXELS
    max_everything_tiles: int = MAX_EVERYTHING_TILES
    read: ReadSettings = ReadSettings()

    @property
    def random_weights(self) -> bool:
        return self.model.checkpoint is None

    @property
    def pixel_cap(self) -> tuple[int, str]:
        """The largest image an upload may hold under these settings, and the flag that sets it."""
        return (self.max_tiled_pixels, "--max-tiled-pixels") if self.large_images == "tiles" else (self.max_pixels, "--max-pixels")

    @property
    def blocking(self) -> BlockConfig:
        """The patch an encode runs with: what the memory panel's planned figures describe too."""
        return BlockConfig(self.chunks, self.max_block_mb, self.backend)

    @property
    def encode_key(self) -> Hashable:
        """What an embedding depends on besides the pixels: kept tile embeddings are keyed by it."""
        return (self.model, self.blocking)

    @property
    def stock_limit_bytes(self) -> Optional[int]:
        """`encode`'s limit for running stock too; None when the comparison is off."""
        return int(self.stock_limit_mb * MIB) if self.measure_stock else None


def check_settings(settings: DemoSettings) -> DemoSettings:
    """Refuse settings that cannot run, with what to change; returns `settings`."""
    model = settings.model
    check_model_type(model.model_type, MODEL_TYPE_CHOICES)
    check_dtype(model.dtype)
    if isinstance(model.img_size, bool) or not isinstance(model.img_size, int) or model.img_size <= 0 or model.img_size % PATCH_SIZE:
        raise ValueError(f"input size {model.img_size!r} must be a positive multiple of {PATCH_SIZE} pixels, e.g. 1024")
    if model.checkpoint is not None and not Path(model.checkpoint).is_file():
        raise ValueError(f"checkpoint {model.checkpoint} is not a file: give the path of a SAM .pth")
    if model.device is not None:
        resolve_device(model.device)
    check_config(settings.chunks, settings.max_block_mb, settings.backend)
    if settings.large_images not in LARGE_IMAGES:
        raise ValueError(f"large images {settings.large_images!r}: choose tiles (native resolution) or whole (resized)")
    if min(settings.max_pixels, settings.max_tiled_pixels, settings.max_upload_mb, settings.max_everything_tiles) <= 0:
        raise ValueError("the pixel caps, the upload cap and the tile limit of Segment everything must be > 0")
    return settings


@functools.lru_cache(maxsize=2)
def shared_model(settings: ModelSettings) -> LoadedModel:
    """The stock (unpatched) model for `settings`, built once and shared by every session.

    It encodes a blank image once, patched, so that one-time allocations (thread pools,
    allocator caches) are not counted in the first measured peak.
    """
    loaded = load_model(settings, blocking=None)
    with patched(loaded.sam):
        SamPredictor(loaded.sam).set_image(np.zeros((PATCH_SIZE, PATCH_SIZE, 3), dtype=np.uint8))
    return loaded


def banner(settings: DemoSettings) -> str:
    """The warning shown while the model has random weights ("" with a checkpoint)."""
    if not settings.random_weights:
        return ""
    model_type = shared_model(settings.model).model_type
    return (
        "⚠️ **Random weights: masks are meaningless until a checkpoint is given.** "
        f"Running {model_type} with seeded random weights (seed {settings.model.seed}). Start with "
        "`sam-blocked demo --checkpoint sam_vit_b_01ec64.pth` or pick one under Settings; "
        "the memory panel is real either way."
    )


def list_server_images(folder: str | os.PathLike | None) -> list[str]:
    """Slides, zarr stores and image files in `folder` (as `sam-blocked segment` collects a folder), sorted."""
    if folder is None or not Path(folder).is_dir():
        return []
    images, _ = collect_images([folder])
    return [str(item.path) for item in images]


def list_examples(folder: str | os.PathLike | None) -> list[str]:
    """Image files in `folder`, sorted; [] when there is none."""
    if folder is None or not Path(folder).is_dir():
        return []
    return sorted(str(p) for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
