"""A huge image read window by window, as (h, w, 3) uint8 RGB: never whole when it is a TIFF,
an OME-Zarr or zarr array, a whole-slide image or a lazy array.

`open_image(input)` looks at what it is given:

- a numpy, zarr or dask array: its slices, window by window (sam_blocked.inputs.arrays);
- a zarr store (a folder holding zarr.json / .zattrs / .zgroup / .zarray, or a URL ending in
  .zarr): OME-Zarr (NGFF 0.4, 0.5) or a plain zarr array, chunk by chunk (sam_blocked.inputs.ngff);
- a whole-slide file (.svs, .ndpi, .mrxs, .scn, .bif, ...): OpenSlide, else tiffslide, else a
  TIFF-based slide as a plain TIFF; without a reader a non-TIFF slide is refused with
  `pip install "sam-blocked[slide]"` (sam_blocked.inputs.slide);
- TIFF and BigTIFF, by their first bytes (tiled or striped, also pyramids, OME-TIFF, slide
  scanners' TIFFs, GeoTIFF): window by window through tifffile (sam_blocked.inputs.tiff): a
  40000 x 40000 slide never sits in memory whole, and no pixel limit applies; the limit
  is the disk.
- Every other format (JPEG, PNG, ...) is decoded whole by `sam_blocked.inputs.images.read_image`,
  which keeps its --max-pixels guard and applies EXIF orientation, then windowed.

`ReadSettings` picks a pyramid level (`level`, or `mpp`: the nearest level, resampled to
exactly that mpp) and channels (`channels`). The source then reads in that level's frame:
its `level`, `downsample` (one pixel read in level-0 pixels) and `mpp` say which, and
level-0 coordinates are the source's times `downsample`.

Either way the pixels are converted as read_image converts them: grayscale, palette,
RGBA, CMYK and 1-bit to RGB (alpha dropped), 16-bit, 32-bit and float stretched linearly
from the image's minimum..maximum to 0..255; the source's `notes` say what was converted.
Bad input raises `InputError`, the error that makes one image fail while a run goes on.
This module only picks a source.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import numpy as np

from sam_blocked.errors import InputError
from sam_blocked.inputs.arrays import AxesSource, array_source
from sam_blocked.inputs.base import ArraySource, ImageSource, ReadSettings, scale_record
from sam_blocked.inputs.images import DEFAULT_MAX_PIXELS, is_zarr, read_image
from sam_blocked.inputs.levels import resampled
from sam_blocked.inputs.ngff import open_zarr
from sam_blocked.inputs.slide import SlideSource, is_slide, missing_reader, slide_backend
from sam_blocked.inputs.tiff import TiffSource

TIFF_MAGIC = (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+")  # classic TIFF, BigTIFF; little and big endian
WHOLE_NOTE_BYTES = 256 * 2**20  # decoded-whole images above this get a note pointing to tiled TIFF
OVERVIEW_PIXELS = 64 * 2**20  # the largest level read whole for an overview

__all__ = ["ArraySource", "ImageSource", "ReadSettings", "SlideSource", "TiffSource", "is_tiff", "is_zarr", "open_image", "overview", "read_whole"]


def is_tiff(path: str | os.PathLike) -> bool:
    """Whether the file starts like a TIFF or BigTIFF (False when it cannot be read)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) in TIFF_MAGIC
    except OSError:
        return False


def open_image(
    image: str | os.PathLike | Any, max_pixels: Optional[int] = None, read: ReadSettings = ReadSettings(), axes: Optional[str] = None
) -> ImageSource:
    """Open an image for reading by windows.

    Args:
        image: a file, a zarr store (folder or URL), or an array: numpy, zarr.Array or
            dask.array (not copied; windows are its slices), or an ImageSource (returned as
            it is). See the module doc for which source each gets.
        max_pixels: the decompression-bomb guard for images that are decoded whole
            (default images.DEFAULT_MAX_PIXELS). Windowed inputs have no pixel limit.
        read: the pyramid level or mpp, and the channels, to read (default: level 0, the
            input's own colours).
        axes: an array's axes when its metadata does not name them (e.g. "cyx"; see
            sam_blocked.inputs.arrays); arrays only.

    Returns:
        The ImageSource; close it (or use `with`) when done.

    Raises:
        InputError: the input is missing, not an image, truncated, corrupt, in a layout
            that cannot be converted to RGB, too big to decode whole, or has no such level,
            mpp or channel (naming level, mpp or channels).
    """
    if isinstance(image, ImageSource):
        return image  # already open: as it is (its level and channels were chosen when it was)
    if not isinstance(image, (str, os.PathLike)):
        if not hasattr(image, "shape") or not hasattr(image, "__getitem__"):
            raise TypeError(f"open_image takes a path or an array (numpy, zarr, dask), not {type(image).__name__}")
        return _finish(array_source(image, read, axes))
    if axes is not None:
        raise ValueError("axes names an array's axes: files and zarr stores say their own")
    path = image
    if is_zarr(path):
        return _finish(open_zarr(path, read))
    limit = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
    tiff = is_tiff(path)
    if is_slide(path):
        backend = slide_backend(tiff)
        if backend is not None:
            return _finish(SlideSource(path, read, backend))
        if not tiff:
            raise missing_reader(path)
    if tiff:
        source = TiffSource(Path(path), limit, read)
        if is_slide(path):
            source.notes.insert(0, 'whole-slide image read as a plain TIFF: pip install "sam-blocked[slide]" for its vendor metadata')
        return _finish(source)
    image, notes = read_image(path, limit)
    if image.nbytes > WHOLE_NOTE_BYTES:
        notes.append(
            f"decoded whole ({image.nbytes / 2**30:.1f} GiB in memory): only TIFF, zarr and slides are read window by window; "
            "a tiled TIFF of this image keeps memory to the tile"
        )
    if read.default:
        return ArraySource(image, notes)
    source = AxesSource([image], "yxc", read, f"image {Path(path).name}")
    source.notes[:0] = notes
    return _finish(source)


def read_whole(path: str | os.PathLike, max_pixels: int, read: ReadSettings = ReadSettings()) -> tuple[np.ndarray, list[str], dict]:
    """(image, notes, scale): the whole image as (H, W, 3) uint8 RGB, what was converted, and its
    frame (ImageSource.scale). read_image for an image file PIL reads (TIFFs too, as ever) when
    nothing is asked of it, else the source open_image gives, read in one window under max_pixels.

    Raises:
        InputError: as open_image, or more pixels than max_pixels (naming it).
    """
    if read.default and not is_zarr(path) and not is_slide(path):  # TIFFs too, as ever (PIL applies their orientation)
        return (*read_image(path, max_pixels), scale_record())
    with open_image(path, max_pixels, read) as source:
        if source.height * source.width > max_pixels:
            raise InputError(
                f"{source.width} x {source.height} = {source.width * source.height:,} pixels is above {{max_pixels}} {max_pixels:,}: "
                "segment it tile by tile with {tile}, pick a smaller {level}, or raise {max_pixels}",
                "max_pixels", "tile", "level",
            )  # fmt: skip
        return source.read((0, 0, source.width, source.height)), list(source.notes), source.scale


def overview(path: str | os.PathLike, read: ReadSettings, max_side: int) -> np.ndarray:
    """The whole image small, for display: the coarsest pyramid level whose long side is still at least
    `max_side` (or the image's own, if smaller), no finer than the level `read` picks, read whole in
    read's channels. An image of one level is read whole.

    Returns:
        (h, w, 3) uint8; resize it to the display size (its frame is the level's, not `read`'s).

    Raises:
        InputError: that level has more than OVERVIEW_PIXELS pixels (no pyramid to show it from).
    """
    with open_image(path, read=read) as source:
        chosen, levels, long_side = source.level, source.levels, max(source.width, source.height)
        if not levels or len(levels) == 1:
            return _whole_small(source, path)
    wanted = min(max_side, long_side)
    index = max([i for i, lv in enumerate(levels) if i >= chosen and max(lv.width, lv.height) >= wanted], default=chosen)
    with open_image(path, read=ReadSettings(level=index, channels=read.channels)) as source:
        return _whole_small(source, path)


def _whole_small(source: ImageSource, path: str | os.PathLike) -> np.ndarray:
    if source.width * source.height > OVERVIEW_PIXELS:
        raise InputError(
            f"{Path(path).name}: its smallest level is {source.width} x {source.height}, too large to show whole "
            f"(above {OVERVIEW_PIXELS:,} pixels): give it a pyramid (e.g. `vips tiffsave IN OUT --tile --pyramid`)"
        )
    return source.read((0, 0, source.width, source.height))


def _finish(source: ImageSource) -> ImageSource:
    """The source, resampled when an mpp asked for it (the level's `resample` factor)."""
    factor = getattr(source, "resample", None)
    return resampled(source, factor)
