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
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np

from sam_blocked.inputs.images import DEFAULT_MAX_PIXELS, read_image
from sam_blocked.inputs.geo import GeoInfo

TIFF_MAGIC = (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+")  # classic TIFF, BigTIFF; little and big endian
WHOLE_NOTE_BYTES = 256 * 2**20  # decoded-whole images above this get a note pointing to tiled TIFF
Box = tuple[int, int, int, int]


class ImageSource:
    """An RGB image read by windows. Use as a context manager, or call close(). One reader per
    thread or process: open the path again there (a source keeps file handles and a cache).

    Attributes:
        height, width: the image size in pixels (full resolution).
        notes: what was converted or ignored on the way (shown in a run's summary).
        geo: the CRS and affine transform of a georeferenced input, else None.
    """

    height: int
    width: int
    notes: list[str]
    geo: Optional[GeoInfo] = None

    def read(self, box: Box) -> np.ndarray:
        """The pixels of one window.

        Args:
            box: (x0, y0, x1, y1), end-exclusive, inside the image.

        Returns:
            (y1 - y0, x1 - x0, 3) uint8 RGB, a new array.
        """
        x0, y0, x1, y1 = check_box(box, self.height, self.width)
        return self._read(x0, y0, x1, y1)

    def _read(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        """Release the file; reading after this fails."""

    def __enter__(self) -> "ImageSource":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ArraySource(ImageSource):
    """An image already decoded whole: windows are copies of its slices.

    Args:
        image: (H, W, 3) uint8 RGB.
        notes: what was converted.
        geo: its georeferencing, if any.
    """

    def __init__(self, image: np.ndarray, notes: Optional[list[str]] = None, geo: Optional[GeoInfo] = None) -> None:
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"ArraySource takes an (H, W, 3) uint8 RGB image, got {image.shape} {image.dtype}")
        self.image = image
        self.height, self.width = image.shape[:2]
        self.notes = list(notes or [])
        self.geo = geo

    def _read(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        return self.image[y0:y1, x0:x1].copy()  # (h, w, 3)


def check_box(box: Box, height: int, width: int) -> Box:
    """`box` as four ints after checking x0 < x1 <= width and y0 < y1 <= height (ValueError if not)."""
    if len(box) != 4:
        raise ValueError(f"window {box!r} must be (x0, y0, x1, y1)")
    x0, y0, x1, y1 = (int(v) for v in box)
    if (x0, y0, x1, y1) != tuple(box) or not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise ValueError(f"window {tuple(box)} is not whole pixels with 0 <= x0 < x1 <= {width} and 0 <= y0 < y1 <= {height}")
    return x0, y0, x1, y1


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
        from sam_blocked.inputs.tiff import TiffSource  # tiff.py builds on ImageSource, defined above

        return TiffSource(Path(path), limit)
    image, notes = read_image(path, limit)
    if image.nbytes > WHOLE_NOTE_BYTES:
        notes.append(
            f"decoded whole ({image.nbytes / 2**30:.1f} GiB in memory): only TIFF is read window by window; "
            "a tiled TIFF of this image keeps memory to the tile"
        )
    return ArraySource(image, notes)
