"""Where the segmented pixels sit: which level of the input, its down-sampling and pixel size.

A slide or OME-Zarr input may be segmented at a level other than full resolution (the
input's `level`, `downsample` and `mpp`, when its source has them; otherwise level 0,
down-sampling 1, pixel size unknown). The label images (flat TIFF, OME-TIFF, COG, NGFF
labels) are written in the segmented level's pixels and say their physical pixel size;
polygons in pixel coordinates are written in the input's level-0 pixels, the frame QuPath
and the slide's own viewers use, by multiplying by `downsample`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional


@dataclass(frozen=True)
class Frame:
    """The segmented pixels' place in the input.

    Args:
        level: the input's pyramid level that was segmented (0: full resolution).
        downsample: level-0 pixels per segmented pixel along each axis (1 at level 0).
        mpp: micrometres per segmented pixel, when the input says; None when unknown.
    """

    level: int = 0
    downsample: float = 1.0
    mpp: Optional[float] = None

    def __post_init__(self) -> None:
        if not self.downsample > 0 or (self.mpp is not None and not self.mpp > 0):
            raise ValueError(f"downsample {self.downsample} and mpp {self.mpp} must be > 0")

    @classmethod
    def of(cls, source: Any) -> "Frame":
        """The frame of an image source, or of a mapping such as its summary's `scale` entry: its
        `level`, `downsample` and `mpp` where it has them (None or absent: level 0, down-sampling 1,
        size unknown). A pair (x, y) for `downsample` or `mpp` gives its x value: pixels are taken as square."""
        get = source.get if isinstance(source, Mapping) else lambda name: getattr(source, name, None)
        level, downsample, mpp = (_x(get(name)) for name in ("level", "downsample", "mpp"))
        return cls(int(level or 0), float(downsample or 1.0), None if mpp is None else float(mpp))


def _x(value: Any) -> Any:
    return value[0] if isinstance(value, (tuple, list)) else value
