"""Whole-slide images through OpenSlide or tiffslide (the optional extra `slide`), window by window.

OpenSlide (openslide-python with openslide-bin) reads MRXS, NDPI, SVS, SCN, BIF and the
other formats it knows; tiffslide reads the TIFF-based ones in pure Python. `open_image`
uses OpenSlide when it is installed, else tiffslide for a TIFF-based slide, else reads a
TIFF-based slide as a plain TIFF (sam_blocked.inputs.tiff); a slide that is not a TIFF
(MRXS, VMS) without OpenSlide is refused with the install command.

A window at level N is read with the slide's `read_region`, whose location is in level-0
pixels: x * downsample, rounded. Pixels come as RGBA, premultiplied (OpenSlide) with alpha 0
where nothing was scanned; they are composited over white.
"""

from __future__ import annotations

import os
from importlib.util import find_spec
from pathlib import Path
from typing import Optional

import numpy as np

from sam_blocked.errors import InputError
from sam_blocked.inputs.base import ImageSource, ReadSettings
from sam_blocked.inputs.channels import pick_channels
from sam_blocked.inputs.images import WSI_SUFFIXES
from sam_blocked.inputs.levels import Level, level_note, pick_level

INSTALL_SLIDE = 'pip install "sam-blocked[slide]"'
BACKENDS = ("openslide", "tiffslide")


def is_slide(path: str | os.PathLike) -> bool:
    """Named as a whole-slide format only slide readers know (.svs, .ndpi, .mrxs, .scn, .bif, ...)."""
    return Path(path).suffix.lower() in WSI_SUFFIXES


def slide_backend(tiff_based: bool) -> Optional[str]:
    """The reader installed for a slide: openslide, else tiffslide for a TIFF-based one, else None."""
    if find_spec("openslide") is not None:
        return "openslide"
    if tiff_based and find_spec("tiffslide") is not None:
        return "tiffslide"
    return None


def missing_reader(path: str | os.PathLike) -> InputError:
    return InputError(f"{Path(path).name} is a {Path(path).suffix} whole-slide image, which only OpenSlide reads: {INSTALL_SLIDE}")


class SlideSource(ImageSource):
    """A whole-slide image read window by window at one level.

    Args:
        path: the slide (for MRXS, the .mrxs file beside its data folder).
        read: the level, mpp and channels asked for (channels index R, G, B).
        backend: "openslide" or "tiffslide".
    """

    def __init__(self, path: str | os.PathLike, read: ReadSettings = ReadSettings(), backend: str = "openslide") -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend {backend!r}: choose one of {', '.join(BACKENDS)}")
        self.notes, self.geo = [], None
        self.backend = backend
        what = f"slide {Path(path).name}"
        try:
            if backend == "openslide":
                import openslide

                self._slide = openslide.OpenSlide(os.fspath(path))
            else:
                import tiffslide

                self._slide = tiffslide.TiffSlide(os.fspath(path))
        except ImportError as error:
            raise InputError(f"{Path(path).name}: the {backend} reader is not installed ({error}): {INSTALL_SLIDE}") from error
        except Exception as error:  # OpenSlideUnsupportedFormatError, OpenSlideError, TiffFileError, OSError
            raise InputError(f"{backend} cannot read {Path(path).name} ({type(error).__name__}: {error}): the file is incomplete, corrupt or not a slide") from error
        try:
            properties = self._slide.properties
            mpp0 = _mpp(properties.get(f"{backend}.mpp-x"))
            vendor = properties.get(f"{backend}.vendor") or "unknown vendor"
            levels = [
                Level(int(w), int(h), float(d), None if mpp0 is None else mpp0 * float(d))
                for (w, h), d in zip(self._slide.level_dimensions, self._slide.level_downsamples)
            ]
            index, self.resample = pick_level(levels, read, what)
            self.level, self.downsample, self.mpp = index, levels[index].downsample, levels[index].mpp
            self.levels = tuple(levels)
            self.width, self.height = levels[index].width, levels[index].height
            self.notes.append(f"whole-slide image ({vendor}) read with {backend}{'' if mpp0 else '; it states no microns per pixel'}")
            self.notes += level_note(levels, index)
            self._channels, notes = pick_channels(3, read.channels, what)
            self.notes += notes
        except BaseException:
            self.close()
            raise

    def _read(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        location = (round(x0 * self.downsample), round(y0 * self.downsample))  # level-0 pixels
        try:
            region = np.asarray(self._slide.read_region(location, self.level, (x1 - x0, y1 - y0)))  # (h, w, 4) or (h, w, 3)
        except Exception as error:
            raise InputError(f"{self.backend} cannot decode pixels {(x0, y0, x1, y1)} ({type(error).__name__}: {error}): the file may be corrupt") from error
        rgb = region[:, :, :3]
        if region.shape[2] == 4:  # premultiplied alpha over white: rgb + (255 - alpha)
            rgb = (rgb.astype(np.uint16) + (255 - region[:, :, 3:4])).clip(0, 255).astype(np.uint8)
        picked = rgb[:, :, list(self._channels)]
        return np.ascontiguousarray(np.repeat(picked, 3, axis=2) if picked.shape[2] == 1 else picked)  # (h, w, 3)

    def close(self) -> None:
        slide = getattr(self, "_slide", None)
        if slide is not None:
            slide.close()
            self._slide = None


def _mpp(value: Optional[str]) -> Optional[float]:
    try:
        mpp = float(value) if value is not None else None
    except ValueError:
        return None
    return mpp if mpp is not None and mpp > 0 else None
