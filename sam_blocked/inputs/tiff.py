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

The image used is the first series, first page of any stack, at level 0 or the pyramid
level `level` / `mpp` picks (ReadSettings; mpp from an SVS description, OME-XML or the
resolution tags); 16-bit, 32-bit and float images are stretched from the level's min..max,
computed window by window when it is opened (with `channels`, each picked channel from its own).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

import numpy as np
import tifffile
import zarr
from tifffile import PHOTOMETRIC

from sam_blocked.inputs.images import InputError, stretch_to_uint8
from sam_blocked.inputs.geo import read_geo, scaled_geo
from sam_blocked.inputs.base import ImageSource, ReadSettings
from sam_blocked.inputs.channels import pick_channels, range_note, scan_ranges
from sam_blocked.inputs.levels import Level, downsample_of, level_note, pick_level

CHUNK_LIMIT = 256 * 2**20  # decoded bytes of one tile or strip above which a file is decoded whole
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
        read: the level, mpp and channels to read.
    """

    def __init__(self, path: Path, max_pixels: int, read: ReadSettings = ReadSettings()) -> None:
        self.notes, self.geo = [], None
        self._fd: Optional[int] = None
        self._store = self._whole = self._band = None
        try:
            self._tif = tifffile.TiffFile(path)
        except Exception as error:  # TiffFileError, struct.error, OSError, ...
            raise InputError(_open_error(error)) from error
        try:
            self._open(path, max_pixels, read)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------------- layout

    def _open(self, path: Path, max_pixels: int, read: ReadSettings) -> None:
        tif = self._tif
        if not tif.series:
            raise InputError("a TIFF with no image in it")
        series = tif.series[0]
        if len(tif.series) > 1:
            self.notes.append(f"holds {len(tif.series)} images (e.g. a slide's label and macro); using the first, {series.shape}")
        axes = series.axes
        if "Y" not in axes or "X" not in axes:
            raise InputError(f"TIFF image with axes {axes} {series.shape} has no Y and X: not a 2-D image")
        sizes = [(lv.shape[axes.index("X")], lv.shape[axes.index("Y")]) for lv in series.levels]  # (w, h)
        mpp0 = _mpp(tif, series)
        levels = [Level(w, h, d, None if mpp0 is None else mpp0 * d) for (w, h), d in ((wh, downsample_of(*sizes[0], *wh)) for wh in sizes)]
        index, self.resample = pick_level(levels, read, f"TIFF {path.name}")
        self.level, self.downsample, self.mpp = index, levels[index].downsample, levels[index].mpp
        self.levels = tuple(levels)
        self.notes += level_note(levels, index)
        chosen = series.levels[index]
        page = chosen.keyframe
        shape = chosen.shape
        sample = "S" if "S" in axes else "C" if "C" in axes else None
        others = [a for a in axes if a not in ("Y", "X", sample) and shape[axes.index(a)] > 1]
        if others:
            self.notes.append(f"image of axes {axes} {shape}: using index 0 of {', '.join(others)}")
        self.height, self.width = shape[axes.index("Y")], shape[axes.index("X")]
        self._axes, self._sample = axes, sample
        kept = [a for a in axes if a in ("Y", "X", sample)]
        self._order = [kept.index(a) for a in ("Y", "X", sample) if a is not None]  # to (Y, X[, S])
        self._samples = shape[axes.index(sample)] if sample else 1
        self._plan_color(page, series.dtype, read.channels, path)
        self._check_complete(path, chosen)

        self._itemsize = series.dtype.itemsize
        first = chosen.pages[0]
        try:
            if _contiguous_rows(first, sample, series.dtype):
                self._fd = os.open(path, os.O_RDONLY)
                self._offset = int(first.dataoffsets[0])
                self._dtype = series.dtype.newbyteorder(tif.byteorder)
                self._band_rows = 1
            else:
                self._store = series.aszarr(level=index)
                self._zarr = zarr.open(self._store, mode="r")
                chunks = dict(zip(axes, self._zarr.chunks))
                self._band_rows = chunks["Y"] if chunks["X"] == self.width else None  # strips: keep rows
                chunk_bytes = int(np.prod(self._zarr.chunks)) * self._itemsize
                if chunk_bytes > CHUNK_LIMIT:
                    self._decode_whole(chunks, chunk_bytes, max_pixels)
            self._raw(0, 0, 1, 1)  # decode one tile now: a missing codec or corrupt data fails at open
            self._ranges = self._scan_range(read.channels is not None) if self._stretch else None
        except (InputError, MemoryError):
            raise
        except Exception as error:
            raise InputError(_decode_error(error, "it")) from error
        orientation = page.tags.get(274)
        if orientation is not None and orientation.value != 1:
            self.notes.append(f"TIFF orientation tag {orientation.value} is not applied: masks are in the stored pixel frame")
        if page.is_geotiff or series.levels[0].keyframe.is_geotiff:
            geo, notes = read_geo(path)
            self.geo, self.notes = scaled_geo(geo, self.downsample), self.notes + notes

    def _plan_channels(self, page: tifffile.TiffPage, channels: tuple[int, ...], path: Path) -> None:
        if page.photometric in (PHOTOMETRIC.PALETTE, PHOTOMETRIC.SEPARATED):
            raise InputError(
                f"TIFF {path.name} is {page.photometric.name.lower()}: {{channels}} picks channels of an RGB or multichannel image; drop it",
                "channels",
            )
        self._pick, notes = pick_channels(self._samples, channels, f"TIFF {path.name}")
        self.notes += notes

    def _plan_color(self, page: tifffile.TiffPage, dtype: np.dtype, channels: tuple[int, ...] | None, path: Path) -> None:
        photometric, n = page.photometric, self._samples
        self._pick = None
        if channels is not None:
            self._plan_channels(page, channels, path)
        if photometric not in _COLOR:
            raise InputError(f"TIFF photometric {photometric.name} is not supported: convert it to RGB or grayscale")
        self._cmyk = photometric == PHOTOMETRIC.SEPARATED and self._pick is None
        if self._cmyk and n < 4:
            raise InputError(f"TIFF marked CMYK with {n} sample(s): convert it to RGB")
        self._lut = None
        if photometric == PHOTOMETRIC.PALETTE:
            self._lut = (np.asarray(page.colormap).T // 256).astype(np.uint8)  # (N, 3), as PIL reads it
            self.notes.append("converted from palette to RGB")
        self._invert = photometric == PHOTOMETRIC.MINISWHITE
        self._used = 4 if self._cmyk else 3 if n >= 3 else 1
        self._stretch = self._lut is None and dtype not in (np.uint8, np.bool_)
        if self._pick is not None:  # the channels note says it
            self._used = len(self._pick)
        elif self._cmyk:
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

    def _check_complete(self, path: Path, series: tifffile.TiffPageSeries) -> None:  # series: the level read
        size = os.path.getsize(path)
        for page in series.pages[:4]:  # the first page, and separate channel pages
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

    def _scan_range(self, per_channel: bool) -> list[tuple[float, float]]:
        row_bytes = self.width * self._samples * self._itemsize
        ranges = scan_ranges(lambda y0, y1: self._values(self._raw(0, y0, self.width, y1)), self.height, row_bytes, per_channel)
        self._band = None
        gray = " and copied to RGB" if self._used == 1 else ""
        self.notes.append(range_note(self._dtype_name, ranges) + gray)
        return ranges

    def _values(self, raw: np.ndarray) -> np.ndarray:
        """(h, w, s) -> (h, w, k): the samples shown."""
        return raw[:, :, list(self._pick)] if self._pick is not None else raw[:, :, : self._used]

    def _convert(self, raw: np.ndarray) -> np.ndarray:
        """(h, w, s) stored values -> (h, w, 3) uint8 RGB."""
        if self._lut is not None:
            return self._lut[np.minimum(raw[:, :, 0], len(self._lut) - 1)]  # (h, w, 3)
        values = self._values(raw)
        if values.dtype == np.bool_:
            values = values.view(np.uint8) * np.uint8(255)
        elif self._stretch and len(self._ranges) == 1:
            values = stretch_to_uint8(values, *self._ranges[0])
        elif self._stretch:
            values = np.stack([stretch_to_uint8(values[:, :, i], *r) for i, r in enumerate(self._ranges)], axis=2)  # (h, w, k)
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


def _mpp(tif: tifffile.TiffFile, series: tifffile.TiffPageSeries) -> float | None:
    """Level 0's microns per pixel: an SVS description's MPP, OME-XML's PhysicalSizeX, else the
    resolution tags in cm or inch; None when the file does not say."""
    try:
        if tif.is_svs and tif.pages[0].description:
            for part in tif.pages[0].description.split("|"):
                key, _, value = part.partition("=")
                if key.strip() == "MPP":
                    return float(value)
        if tif.is_ome and tif.ome_metadata:
            match = re.search(r'PhysicalSizeX="([0-9.eE+-]+)"', tif.ome_metadata)
            unit = re.search(r'PhysicalSizeXUnit="([^"]+)"', tif.ome_metadata)
            if match and (unit is None or unit[1] in ("µm", "um", "micron")):
                return float(match[1])
        page = series.levels[0].keyframe
        xres, unit = page.tags.get(282), page.tags.get(296)
        if xres is None or not xres.value[0]:
            return None
        per_pixel = xres.value[1] / xres.value[0]  # units per pixel
        if tif.is_imagej and str((tif.imagej_metadata or {}).get("unit", "")) in ("micron", "um", "µm"):
            return per_pixel
        unit = unit.value if unit is not None else 2  # TIFF's default unit is the inch
        if unit == 3:
            return per_pixel * 1e4
        if unit == 2 and per_pixel * 25400 <= 25.4:  # 1000 dpi or finer: a scan, not a photo's nominal 72-300 dpi
            return per_pixel * 25400
    except (ValueError, TypeError, ZeroDivisionError, IndexError):
        return None
    return None


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
