"""What every image source shares: `ImageSource`, the RGB image read by windows, and `ArraySource`,
an image already decoded whole. TIFFs have their own source (sam_blocked.inputs.tiff); which
one a file gets is `sam_blocked.inputs.sources.open_image`'s choice.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from sam_blocked.inputs.geo import GeoInfo

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
