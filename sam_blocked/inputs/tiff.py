"""TIFF and BigTIFF read window by window (tifffile), converted to RGB uint8 like images.read_image.

Three ways to the pixels, chosen when the file is opened:

- chunked (tiled, or compressed strips): tifffile's zarr store decodes only the tiles or
  strips a window covers. Strips span the full width, so for striped files the rows of the
  last window are kept (full width): the windows of one row of tiles decode each strip once.
- rows: uncompressed pixels stored in one contiguous run are read with plain file reads,
  the rows a window covers (full width, kept as above), whatever the strip size.
- whole: a file whose single tile or strip decodes to more than CHUNK_LIMIT bytes (e.g. a
  compressed image in one strip) would decode it whole for every window; it is decoded
  once, under the max_pixels guard, or refused with the commands that make it tiled.

The image used is the first series' full-resolution level 0, first page of any stack;
16-bit, 32-bit and float images are stretched from the image's min..max, computed window
by window over the whole file when it is opened.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np
import tifffile
import zarr
from tifffile import PHOTOMETRIC

from sam_blocked.inputs.images import InputError, stretch_to_uint8
from sam_blocked.inputs.geo import read_geo
from sam_blocked.inputs.base import ImageSource

CHUNK_LIMIT = 256 * 2**20  # decoded bytes of one tile or strip above which a file is decoded whole
SCAN_BYTES = 64 * 2**20  # raw bytes per window while scanning a 16-bit / float image for its range
MAKE_TILED = (
    "convert it to a tiled TIFF (`gdal_translate -co TILED=YES -co COMPRESS=DEFLATE -co BIGTIFF=IF_SAFER IN OUT` "
    "or `vips tiffsave IN OUT --tile --bigtiff --compression deflate`)"
)
_COLOR = (PHOTOMETRIC.MINISBLACK, PHOTOMETRIC.MINISWHITE, PHOTOMETRIC.RGB, PHOTOMETRIC.YCBCR, PHOTOMETRIC.PALETTE, PHOTOMETRIC.SEPARATED)


class TiffSource(ImageSource):
    """A TIFF read window by window. Use `open_image`, which picks this class for TIFFs.

    Args:
        path: the TIFF or BigTIFF file.
        max_pixels: the limit for files that must be decoded whole (see module doc).
    """

    def __init__(self, path: Path, max_pixels: int) -> None:
        self.notes, self.geo = [], None
        self._fd: Optional[int] = None
        self._store = self._whole = self._band = None
        try:
            self._tif = tifffile.TiffFile(path)
        except Exception as error:  # TiffFileError, struct.error, OSError, ...
            raise InputError(_open_error(error)) from error
        try:
            self._open(path, max_pixels)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------------- layout

    def _open(self, path: Path, max_pixels: int) -> None:
        tif = self._tif
        if not tif.series:
            raise InputError("a TIFF with no image in it")
        series = tif.series[0]
        if len(tif.series) > 1:
            self.notes.append(f"holds {len(tif.series)} images (e.g. a slide's label and macro); using the first, {series.shape}")
        if len(series.levels) > 1:
            self.notes.append(f"pyramid of {len(series.levels)} levels; using the full-resolution level 0")
        page = series.keyframe
        axes, shape = series.axes, series.shape
        if "Y" not in axes or "X" not in axes:
            raise InputError(f"TIFF image with axes {axes} {shape} has no Y and X: not a 2-D image")
        sample = "S" if "S" in axes else "C" if "C" in axes else None
        others = [a for a in axes if a not in ("Y", "X", sample) and shape[axes.index(a)] > 1]
        if others:
            self.notes.append(f"image of axes {axes} {shape}: using index 0 of {', '.join(others)}")
        self.height, self.width = shape[axes.index("Y")], shape[axes.index("X")]
        self._axes, self._sample = axes, sample
        kept = [a for a in axes if a in ("Y", "X", sample)]
        self._order = [kept.index(a) for a in ("Y", "X", sample) if a is not None]  # to (Y, X[, S])
        self._samples = shape[axes.index(sample)] if sample else 1
        self._plan_color(page, series.dtype)
        self._check_complete(path, series)

        self._itemsize = series.dtype.itemsize
        first = series.levels[0].pages[0]
        try:
            if _contiguous_rows(first, sample, series.dtype):
                self._fd = os.open(path, os.O_RDONLY)
                self._offset = int(first.dataoffsets[0])
                self._dtype = series.dtype.newbyteorder(tif.byteorder)
                self._band_rows = 1
            else:
                self._store = series.aszarr(level=0)
                self._zarr = zarr.open(self._store, mode="r")
                chunks = dict(zip(axes, self._zarr.chunks))
                self._band_rows = chunks["Y"] if chunks["X"] == self.width else None  # strips: keep rows
                chunk_bytes = int(np.prod(self._zarr.chunks)) * self._itemsize
                if chunk_bytes > CHUNK_LIMIT:
                    self._decode_whole(chunks, chunk_bytes, max_pixels)
            self._raw(0, 0, 1, 1)  # decode one tile now: a missing codec or corrupt data fails at open
            self._range = self._scan_range() if self._stretch else None
        except (InputError, MemoryError):
            raise
        except Exception as error:
            raise InputError(_decode_error(error, "it")) from error
        orientation = page.tags.get(274)
        if orientation is not None and orientation.value != 1:
            self.notes.append(f"TIFF orientation tag {orientation.value} is not applied: masks are in the stored pixel frame")
        if page.is_geotiff:
            self.geo, notes = read_geo(path)
            self.notes += notes

    def _plan_color(self, page: tifffile.TiffPage, dtype: np.dtype) -> None:
        photometric, n = page.photometric, self._samples
        if photometric not in _COLOR:
            raise InputError(f"TIFF photometric {photometric.name} is not supported: convert it to RGB or grayscale")
        self._cmyk = photometric == PHOTOMETRIC.SEPARATED
        if self._cmyk and n < 4:
            raise InputError(f"TIFF marked CMYK with {n} sample(s): convert it to RGB")
        self._lut = None
        if photometric == PHOTOMETRIC.PALETTE:
            self._lut = (np.asarray(page.colormap).T // 256).astype(np.uint8)  # (N, 3), as PIL reads it
            self.notes.append("converted from palette to RGB")
        self._invert = photometric == PHOTOMETRIC.MINISWHITE
        self._used = 4 if self._cmyk else 3 if n >= 3 else 1
        self._stretch = self._lut is None and dtype not in (np.uint8, np.bool_)
        if self._cmyk:
            self.notes.append("converted from CMYK to RGB")
        elif n > self._used:
            used = "samples 1-3 as RGB" if self._used == 3 else "sample 1 as grayscale"
            extra = "alpha" if page.extrasamples and page.extrasamples[0] in (1, 2) else f"{n - self._used} more"
            self.notes.append(f"{n} samples (bands) per pixel: using {used}, {extra} dropped")
        elif n == 1 and self._lut is None and not self._stretch:  # the stretch note says it
            self.notes.append(f"{'1-bit' if dtype == np.bool_ else 'grayscale'} image copied to RGB")
        if self._invert:
            self.notes.append("min-is-white image inverted")
        self._dtype_name = str(dtype)

    def _check_complete(self, path: Path, series: tifffile.TiffPageSeries) -> None:
        size = os.path.getsize(path)
        for page in series.levels[0].pages[:4]:  # the first page, and separate channel pages
            ends = [o + n for o, n in zip(page.dataoffsets, page.databytecounts) if n]
            if ends and max(ends) > size:
                raise InputError(
                    f"truncated TIFF: its pixel data runs to byte {max(ends):,} but the file has {size:,} bytes; "
                    "the file is incomplete: copy it again"
                )

    def _decode_whole(self, chunks: dict, chunk_bytes: int, max_pixels: int) -> None:
        what = f"in {'strips' if chunks['X'] == self.width else 'tiles'} of {chunks['X']} x {chunks['Y']} px ({chunk_bytes / 2**20:,.0f} MiB decoded)"
        if self.height * self.width > max_pixels:
            raise InputError(
                f"{self.width} x {self.height} TIFF stored {what}: reading it by windows would decode a whole "
                f"strip or tile each time, and decoding it whole is above {{max_pixels}} {max_pixels:,}: {MAKE_TILED}, "
                "or raise {max_pixels} if it fits in memory",
                "max_pixels",
            )
        self._whole = self._raw_zarr(0, 0, self.width, self.height)
        self.notes.append(f"stored {what}: decoded whole; a tiled TIFF keeps memory to the window")

    # ------------------------------------------------------------------------- pixels

    def _read(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        try:
            return self._convert(self._raw(x0, y0, x1, y1))
        except (InputError, MemoryError):
            raise
        except Exception as error:  # codec errors, short reads: corrupt or cut files
            raise InputError(_decode_error(error, f"pixels {(x0, y0, x1, y1)}")) from error

    def _raw(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        """(h, w, samples) of the stored dtype."""
        if self._whole is not None:
            return self._whole[y0:y1, x0:x1]
        if self._band_rows is None:
            return self._raw_zarr(x0, y0, x1, y1)
        top, bottom = y0 // self._band_rows * self._band_rows, min(self.height, -(-y1 // self._band_rows) * self._band_rows)
        if self._band is None or not (self._band[0] <= y0 and y1 <= self._band[1]):
            self._band = None  # free the last rows before reading the next
            rows = self._raw_rows(top, bottom) if self._fd is not None else self._raw_zarr(0, top, self.width, bottom)
            self._band = (top, bottom, rows)
        start, _, rows = self._band
        return rows[y0 - start : y1 - start, x0:x1]

    def _raw_zarr(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        ranges = {"Y": slice(y0, y1), "X": slice(x0, x1), self._sample: slice(None)}
        key = tuple(ranges.get(a, 0) for a in self._axes)
        raw = np.asarray(self._zarr[key]).transpose(self._order)  # (h, w[, s])
        return raw if raw.ndim == 3 else raw[:, :, None]

    def _raw_rows(self, y0: int, y1: int) -> np.ndarray:
        row = self.width * self._samples * self._dtype.itemsize
        data = os.pread(self._fd, (y1 - y0) * row, self._offset + y0 * row)
        if len(data) < (y1 - y0) * row:
            raise InputError(f"truncated TIFF: rows {y0}..{y1} run past the end of the file; the file is incomplete: copy it again")
        return np.frombuffer(data, self._dtype).reshape(y1 - y0, self.width, self._samples)  # (h, W, s)

    def _scan_range(self) -> tuple[float, float]:
        lo, hi = np.inf, -np.inf
        step = max(1, SCAN_BYTES // (self.width * self._samples * self._itemsize))
        for y0 in range(0, self.height, step):
            values = self._raw(0, y0, self.width, min(self.height, y0 + step))[..., : self._used]
            if values.dtype.kind == "f":
                values = values[np.isfinite(values)]
            if values.size:
                lo, hi = min(lo, float(values.min())), max(hi, float(values.max()))
        self._band = None
        lo, hi = (lo, hi) if lo <= hi else (0.0, 0.0)
        gray = " and copied to RGB" if self._used == 1 else ""
        self.notes.append(f"{self._dtype_name} image stretched from [{lo:g}, {hi:g}] to [0, 255]{gray} (range read over the whole file)")
        return lo, hi

    def _convert(self, raw: np.ndarray) -> np.ndarray:
        """(h, w, s) stored values -> (h, w, 3) uint8 RGB."""
        if self._lut is not None:
            return self._lut[np.minimum(raw[:, :, 0], len(self._lut) - 1)]  # (h, w, 3)
        values = raw[:, :, : self._used]
        if values.dtype == np.bool_:
            values = values.view(np.uint8) * np.uint8(255)
        elif self._stretch:
            values = stretch_to_uint8(values, *self._range)
        if self._invert:
            values = 255 - values
        if self._cmyk:  # PIL's CMYK -> RGB: (255 - c) * (255 - k) / 255
            ink = values.astype(np.uint16)
            rgb = ((255 - ink[:, :, :3]) * (255 - ink[:, :, 3:4]) + 127) // 255
            return rgb.astype(np.uint8)
        if self._used == 1:
            return np.repeat(values, 3, axis=2)  # (h, w, 3)
        return values.copy(order="C")  # never a view of the kept rows

    def close(self) -> None:
        self._band = self._whole = None
        if self._store is not None:
            self._store.close()
            self._store = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._tif.close()


def _contiguous_rows(page: tifffile.TiffPage, sample: Optional[str], dtype: np.dtype) -> bool:
    """Whether `page` holds uncompressed pixels in one contiguous row-major run (Y, X[, S])."""
    plain = page.compression == 1 and page.predictor == 1 and page.fillorder == 1 and dtype != np.bool_
    interleaved = sample in (None, "S") and (page.planarconfig == 1 or page.samplesperpixel == 1)
    return bool(plain and interleaved and not page.is_tiled and page.is_contiguous)


def _open_error(error: Exception) -> str:
    if isinstance(error, FileNotFoundError):
        return "no such file"
    if isinstance(error, PermissionError):
        return "cannot read it: permission denied"
    return f"not a readable TIFF ({type(error).__name__}: {error}): the file is incomplete or corrupt; copy it again"


def _decode_error(error: Exception, what: str) -> str:
    if "imagecodecs" in str(error):
        hint = "its compression needs the imagecodecs package: pip install imagecodecs"
    else:
        hint = "the file may be corrupt or incomplete: copy it again"
    return f"cannot decode {what} ({type(error).__name__}: {error}): {hint}"
