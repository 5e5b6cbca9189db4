"""What every image source shares: `ImageSource`, the RGB image read by windows, `ArraySource`,
an image already decoded whole, and `ReadSettings`, which level and channels of an input are read.
TIFFs, OME-Zarr, slides and arrays have their own sources (tiff, ngff, slide, arrays); which
one an input gets is `sam_blocked.inputs.sources.open_image`'s choice.

The frame of a source is the pixels it reads: at a pyramid level, or resampled to an mpp,
not level 0. Every box, mask and record is in that frame; `downsample` maps it back:
level-0 x = x * downsample (the same for y).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from sam_blocked.errors import SettingError
from sam_blocked.inputs.geo import GeoInfo

Box = tuple[int, int, int, int]


class ImageSource:
    """An RGB image read by windows. Use as a context manager, or call close(). One reader per
    thread or process: open the path again there (a source keeps file handles and a cache).

    Attributes:
        height, width: the image size in pixels (full resolution).
        notes: what was converted or ignored on the way (shown in a run's summary).
        geo: the CRS and affine transform of a georeferenced input, else None (of the frame read).
        level: the pyramid level read (0: full resolution, or an input with one level).
        downsample: the size of one pixel read in level-0 pixels (level 0: 1.0; level 2 of a
            x2 pyramid: 4.0; with an mpp, that mpp over level 0's). Level-0 x = x * downsample.
        mpp: microns per pixel of the pixels read, when the input says it (else None).
        levels: the input's pyramid levels (width, height, downsample, mpp), level 0 first.
    """

    height: int
    width: int
    notes: list[str]
    geo: Optional[GeoInfo] = None
    level: int = 0
    downsample: float = 1.0
    mpp: Optional[float] = None
    levels: tuple = ()  # the input's pyramid (sam_blocked.inputs.levels.Level), level 0 first; () for one level

    @property
    def shape(self) -> tuple[int, int, int]:
        """(height, width, 3), as the (H, W, 3) array it stands for."""
        return self.height, self.width, 3

    @property
    def scale(self) -> dict:
        """level, downsample and mpp, as outputs record them (plain values for JSON)."""
        return scale_record(self.level, self.downsample, self.mpp)

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


def scale_record(level: int = 0, downsample: float = 1.0, mpp: Optional[float] = None) -> dict:
    """{"level", "downsample", "mpp"}: the frame of an image's pixels as records state it (default level 0)."""
    return {"level": int(level), "downsample": round(float(downsample), 6), "mpp": None if mpp is None else round(float(mpp), 6)}


def check_box(box: Box, height: int, width: int) -> Box:
    """`box` as four ints after checking x0 < x1 <= width and y0 < y1 <= height (ValueError if not)."""
    if len(box) != 4:
        raise ValueError(f"window {box!r} must be (x0, y0, x1, y1)")
    x0, y0, x1, y1 = (int(v) for v in box)
    if (x0, y0, x1, y1) != tuple(box) or not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise ValueError(f"window {tuple(box)} is not whole pixels with 0 <= x0 < x1 <= {width} and 0 <= y0 < y1 <= {height}")
    return x0, y0, x1, y1


@dataclass(frozen=True)
class ReadSettings:
    """Which part of a multi-level, multichannel input is read: plain values, so they cross to a
    worker process with the run's options. Checked when built (SettingError names the setting).

    Args:
        level: the pyramid level to read (0: full resolution); None: level 0, or the level `mpp` picks.
        mpp: microns per pixel to read at: the level whose mpp is nearest (in ratio), its pixels
            resampled to exactly this mpp. Needs an input that states its mpp.
        channels: three channel indices shown as R, G, B (e.g. (2, 1, 0)), or one shown as gray;
            None: the input's own rule (RGB, or the first channel(s)). Values that are not
            8-bit are stretched from each picked channel's min..max over the level read.
    """

    level: Optional[int] = None
    mpp: Optional[float] = None
    channels: Optional[tuple[int, ...]] = None

    def __post_init__(self) -> None:
        if self.level is not None and (isinstance(self.level, bool) or not isinstance(self.level, int) or self.level < 0):
            raise SettingError(f"{{level}} {self.level!r} must be a whole number >= 0 (0 is full resolution)", "level")
        if self.mpp is not None:
            number = isinstance(self.mpp, (int, float)) and not isinstance(self.mpp, bool) and math.isfinite(self.mpp)
            if not number or self.mpp <= 0:
                raise SettingError(f"{{mpp}} {self.mpp!r} must be microns per pixel > 0, e.g. 0.5", "mpp")
        if self.level is not None and self.mpp is not None:
            raise SettingError("give {level} or {mpp}, not both: {mpp} picks the level nearest to it", "level", "mpp")
        if self.channels is not None:
            object.__setattr__(self, "channels", parse_channels(self.channels))

    @property
    def default(self) -> bool:
        """Nothing asked: level 0, the input's own colours."""
        return self.level is None and self.mpp is None and self.channels is None


def parse_channels(value: str | Sequence[int]) -> tuple[int, ...]:
    """"2,1,0" or (2, 1, 0) -> (2, 1, 0): three channels (R, G, B) or one (gray), indices >= 0."""
    try:
        items = [v.strip() for v in value.split(",")] if isinstance(value, str) else list(value)
        channels = tuple(int(v) for v in items)
        whole = all(not isinstance(v, bool) and str(int(v)) == str(v).strip() for v in items)
    except (TypeError, ValueError):
        channels, whole = (), False
    if not whole or len(channels) not in (1, 3) or min(channels) < 0:
        raise SettingError(
            f"{{channels}} {value!r}: give three channel indices shown as R,G,B (e.g. 2,1,0) or one shown as gray (e.g. 1), from 0",
            "channels",
        )
    return channels
