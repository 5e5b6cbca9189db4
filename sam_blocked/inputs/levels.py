"""Pyramid levels: which level `level` or `mpp` picks (pure), and `ResampledSource`, a level's pixels
resampled to exactly the mpp asked for, window by window.

Every pyramidal source (TIFF, OME-Zarr, slide) describes its levels as `Level`s and asks
`pick_level`; `mpp` picks the level whose mpp is nearest in ratio (|log(level mpp / mpp)|,
ties to the finer level) and `resampled` then brings its pixels to exactly that mpp.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from sam_blocked.errors import InputError
from sam_blocked.inputs.base import ImageSource, ReadSettings
from sam_blocked.inputs.geo import scaled_geo

SAME_MPP = 1e-3  # a level within this relative distance of the mpp asked is read as it is


@dataclass(frozen=True)
class Level:
    """One level of a pyramid.

    Args:
        width, height: its size in pixels.
        downsample: one of its pixels in level-0 pixels (level 0: 1.0).
        mpp: its microns per pixel, when the input says it.
    """

    width: int
    height: int
    downsample: float
    mpp: Optional[float] = None


def pick_level(levels: Sequence[Level], read: ReadSettings, what: str) -> tuple[int, Optional[float]]:
    """(the level to read, the resampling factor to reach read.mpp or None).

    Args:
        levels: the input's levels, level 0 first.
        read: the level or mpp asked for (neither: level 0).
        what: the input, as an error names it.

    Raises:
        InputError: a level past the last, naming `level`; an mpp for an input that states none, naming `mpp`.
    """
    n = len(levels)
    if read.level is not None:
        if read.level >= n:
            raise InputError(
                f"{what} has {n} level(s), 0..{n - 1} ({describe(levels)}): {{level}} {read.level} is past the last: pick 0..{n - 1}",
                "level",
            )
        return read.level, None
    if read.mpp is None:
        return 0, None
    if levels[0].mpp is None:
        raise InputError(
            f"{what} does not state its microns per pixel, so {{mpp}} {read.mpp:g} cannot pick a level: "
            f"give {{level}} instead ({describe(levels)})",
            "mpp", "level",
        )  # fmt: skip
    index = min(range(n), key=lambda i: (abs(math.log(levels[i].mpp / read.mpp)), i))
    factor = read.mpp / levels[index].mpp
    return index, None if abs(factor - 1) < SAME_MPP else factor


def describe(levels: Sequence[Level]) -> str:
    """'levels 0..2: 4000 x 3000 (x1, 0.25 um/px), 2000 x 1500 (x2, 0.5 um/px), ...'"""
    parts = [f"{lv.width} x {lv.height} (x{lv.downsample:g}{'' if lv.mpp is None else f', {lv.mpp:g} um/px'})" for lv in levels]
    return f"level{'s 0..' + str(len(levels) - 1) if len(levels) > 1 else ' 0'}: " + ", ".join(parts)


def level_note(levels: Sequence[Level], index: int) -> list[str]:
    if len(levels) == 1:
        return []
    chosen = levels[index]
    return [f"pyramid of {len(levels)} levels; reading level {index}, {chosen.width} x {chosen.height} px, x{chosen.downsample:g} of level 0: coordinates are level {index}'s"]


def downsample_of(width0: int, height0: int, width: int, height: int) -> float:
    """A level's downsample from its size, as OpenSlide computes it (the mean of x and y)."""
    return (width0 / width + height0 / height) / 2


class ResampledSource(ImageSource):
    """`inner`'s pixels resampled by `factor` (one pixel here = factor pixels of inner), window by window.

    A window reads the inner pixels it covers plus a margin for the filter's support, so
    neighbouring windows agree where they meet. Antialiased bilinear (PIL) both ways.

    Args:
        inner: the level picked (its range already read; it is closed with this source).
        factor: target mpp over the level's mpp (> 1 shrinks).
    """

    def __init__(self, inner: ImageSource, factor: float) -> None:
        self.inner, self.factor = inner, float(factor)
        self.width = max(1, round(inner.width / self.factor))
        self.height = max(1, round(inner.height / self.factor))
        self.level, self.levels = inner.level, inner.levels
        self.downsample = inner.downsample * self.factor
        self.mpp = None if inner.mpp is None else inner.mpp * self.factor
        self.geo = scaled_geo(inner.geo, self.factor)
        self.notes = list(inner.notes) + [
            f"resampled from {inner.width} x {inner.height} to {self.width} x {self.height} px "
            f"({'' if self.mpp is None else f'{self.mpp:g} um/px, '}x{self.downsample:g} of level 0): coordinates are in this frame"
        ]
        self._sx, self._sy = inner.width / self.width, inner.height / self.height  # exact, so the last column maps to the last

    def _read(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        margin = math.ceil(max(self._sx, self._sy, 1.0)) + 2
        fx0, fy0, fx1, fy1 = x0 * self._sx, y0 * self._sy, x1 * self._sx, y1 * self._sy
        ix0, iy0 = max(0, math.floor(fx0) - margin), max(0, math.floor(fy0) - margin)
        ix1, iy1 = min(self.inner.width, math.ceil(fx1) + margin), min(self.inner.height, math.ceil(fy1) + margin)
        pixels = self.inner.read((ix0, iy0, ix1, iy1))  # (ih, iw, 3)
        box = (fx0 - ix0, fy0 - iy0, fx1 - ix0, fy1 - iy0)
        out = Image.fromarray(pixels).resize((x1 - x0, y1 - y0), Image.Resampling.BILINEAR, box=box)
        return np.asarray(out).copy()  # (h, w, 3)

    def close(self) -> None:
        self.inner.close()


def resampled(source: ImageSource, factor: Optional[float]) -> ImageSource:
    """`source` itself, or resampled by `factor` (what pick_level returned)."""
    return source if factor is None else ResampledSource(source, factor)
