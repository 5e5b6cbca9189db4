"""A huge image read window by window, as (h, w, 3) uint8 RGB: never whole when it is a TIFF.

`open_image(path)` looks at the file's first bytes:

- TIFF and BigTIFF (tiled or striped, also pyramids, OME-TIFF, slide scanners' TIFFs,
  GeoTIFF) are read window by window through tifffile (`sam_blocked.inputs.tiff`): a
  40000 x 40000 slide never sits in memory whole, and no pixel limit applies; the limit
  is the disk.
- Every other format (JPEG, PNG, ...) is decoded whole by `sam_blocked.inputs.images.read_image`,
  which keeps its --max-pixels guard and applies EXIF orientation, then windowed.

Either way the pixels are converted as read_image converts them: grayscale, palette,
RGBA, CMYK and 1-bit to RGB (alpha dropped), 16-bit, 32-bit and float stretched linearly
from the image's minimum..maximum to 0..255; the source's `notes` say what was converted.
Bad input raises `InputError`, the error that makes one image fail while a run goes on.
The sources themselves: `ImageSource` and `ArraySource` in sam_blocked.inputs.base,
`TiffSource` in sam_blocked.inputs.tiff; this module only picks one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from sam_blocked.inputs.base import ArraySource, ImageSource
from sam_blocked.inputs.images import DEFAULT_MAX_PIXELS, read_image
from sam_blocked.inputs.tiff import TiffSource

TIFF_MAGIC = (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+")  # classic TIFF, BigTIFF; little and big endian
WHOLE_NOTE_BYTES = 256 * 2**20  # decoded-whole images above this get a note pointing to tiled TIFF

__all__ = ["ArraySource", "ImageSource", "TiffSource", "is_tiff", "open_image"]  # the sources live in base.py and tiff.py


def is_tiff(path: str | os.PathLike) -> bool:
    """Whether the file starts like a TIFF or BigTIFF (False when it cannot be read)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) in TIFF_MAGIC
    except OSError:
        return False


def open_image(path: str | os.PathLike, max_pixels: Optional[int] = None) -> ImageSource:
    """Open an image for reading by windows.

    Args:
        path: the image file. TIFF / BigTIFF (recognised by content, not by extension) is
            read window by window; any other format PIL reads is decoded whole.
        max_pixels: the decompression-bomb guard for images that are decoded whole
            (default images.DEFAULT_MAX_PIXELS). Windowed TIFFs have no pixel limit.

    Returns:
        The ImageSource; close it (or use `with`) when done.

    Raises:
        InputError: the file is missing, not an image, truncated, corrupt, in a layout
            that cannot be converted to RGB, or too big to decode whole.
    """
    limit = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
    if is_tiff(path):
        return TiffSource(Path(path), limit)
    image, notes = read_image(path, limit)
    if image.nbytes > WHOLE_NOTE_BYTES:
        notes.append(
            f"decoded whole ({image.nbytes / 2**30:.1f} GiB in memory): only TIFF is read window by window; "
            "a tiled TIFF of this image keeps memory to the tile"
        )
    return ArraySource(image, notes)
