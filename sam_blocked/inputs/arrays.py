"""Arrays with named axes as image sources: numpy, zarr and dask arrays, one per pyramid level.

`AxesSource` reads a window by slicing: a zarr array decodes only the chunks the window
covers, a dask array computes only them, so a huge array is never read whole. Axes are
NGFF's letters, `t`, `c`, `z`, `y`, `x`, in the array's order (e.g. "tczyx", "yxc", "cyx"):
y and x are the image; c the channels (sam_blocked.inputs.channels picks and stretches
them); t and z are fixed at an index, 0 unless `planes` says otherwise.

An array's axes come from, in order: the caller (`axes=`), its metadata (zarr v3
`dimension_names`, xarray's `_ARRAY_DIMENSIONS`), else a guess from its shape:
2-D "yx", 3-D "yxc" when the last axis has at most 4 entries else "cyx", 5-D "tczyx" (NGFF's
order); 4-D is refused, being ambiguous.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import numpy as np

from sam_blocked.errors import InputError
from sam_blocked.inputs.base import ImageSource, ReadSettings
from sam_blocked.inputs.channels import needs_stretch, pick_channels, range_note, scan_ranges, to_rgb
from sam_blocked.inputs.levels import Level, downsample_of, level_note, pick_level

AXES = "tczyx"
NAMES = {"t": "t", "time": "t", "c": "c", "channel": "c", "band": "c", "bands": "c", "z": "z", "y": "y", "x": "x",
         "row": "y", "rows": "y", "col": "x", "cols": "x", "lat": "y", "latitude": "y", "lon": "x", "longitude": "x"}  # fmt: skip


class AxesSource(ImageSource):
    """An image held in arrays with named axes, read window by window.

    Args:
        levels: the arrays, level 0 first (numpy, zarr.Array, dask.array: anything sliced
            with a tuple of ints and slices, whose result np.asarray takes).
        axes: their axes, e.g. "tczyx" (see the module doc).
        read: the level, mpp and channels asked for.
        what: the input, as notes and errors name it.
        downsamples: each level's downsample (default: from the sizes).
        mpps: each level's microns per pixel (default: unknown).
        planes: the index of t and z to read (default 0).
    """

    def __init__(
        self,
        levels: Sequence[Any],
        axes: str,
        read: ReadSettings = ReadSettings(),
        what: str = "array",
        downsamples: Optional[Sequence[float]] = None,
        mpps: Optional[Sequence[Optional[float]]] = None,
        planes: Optional[Mapping[str, int]] = None,
    ) -> None:
        self.notes, self.geo = [], None
        axes = check_axes(axes, levels[0].shape, what)
        if any(len(level.shape) != len(axes) for level in levels):
            raise InputError(f"{what}: its levels have {sorted({len(a.shape) for a in levels})} dimensions, not all {len(axes)}")
        iy, ix = axes.index("y"), axes.index("x")
        sizes = [(int(a.shape[ix]), int(a.shape[iy])) for a in levels]  # (w, h)
        if downsamples is None:
            downsamples = [downsample_of(*sizes[0], w, h) for w, h in sizes]
        described = [Level(w, h, float(d), None if mpps is None else mpps[i]) for i, ((w, h), d) in enumerate(zip(sizes, downsamples))]
        index, self.resample = pick_level(described, read, what)
        self.level, self.downsample, self.mpp = index, described[index].downsample, described[index].mpp
        self.levels = tuple(described)
        self.notes += level_note(described, index)
        self._array, self._axes = levels[index], axes
        self.width, self.height = sizes[index]
        self._planes = self._pick_planes(planes or {}, what)
        count = int(self._array.shape[axes.index("c")]) if "c" in axes else 1
        self._channels, notes = pick_channels(count, read.channels, what)
        self.notes += notes
        dtype = np.dtype(self._array.dtype)
        if dtype.kind not in "biuf":
            raise InputError(f"{what} holds {dtype} values: only integer, float and bool images can be shown")
        self._ranges = None
        if needs_stretch(dtype):
            chunks = getattr(self._array, "chunks", None)
            rows = _first(chunks[iy]) if chunks else 1
            self._ranges = scan_ranges(lambda y0, y1: self._raw(0, y0, self.width, y1), self.height,
                                       self.width * len(self._channels) * dtype.itemsize, read.channels is not None, rows)  # fmt: skip
            self.notes.append(range_note(dtype, self._ranges))
        elif count == 1:
            self.notes.append("one channel shown as gray")

    def _pick_planes(self, planes: Mapping[str, int], what: str) -> dict[str, int]:
        picked = {}
        for axis in self._axes:
            if axis in "cyx":
                continue
            size, index = int(self._array.shape[self._axes.index(axis)]), int(planes.get(axis, 0))
            if not 0 <= index < size:
                raise InputError(f"{what}: {axis}={index} is outside its {size} plane(s) along {axis}: pick 0..{size - 1}")
            if size > 1:
                self.notes.append(f"{axis} has {size} planes: reading {axis}={index}")
            picked[axis] = index
        return picked

    def _raw(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        """(h, w, k) stored values of the channels shown."""
        ranges = {"y": slice(y0, y1), "x": slice(x0, x1), **self._planes}
        kept = [a for a in self._axes if a in ("y", "x", "c")]
        if "c" not in self._axes:
            values = np.asarray(self._array[tuple(ranges[a] for a in self._axes)])
            return values.transpose([kept.index(a) for a in "yx"])[:, :, None]  # (h, w, 1)
        first, last = min(self._channels), max(self._channels)
        chunks = getattr(self._array, "chunks", None)
        if chunks and _first(chunks[self._axes.index("c")]) == 1 and len(self._channels) < last - first + 1:
            planes = [self._raw_channels(ranges, c, c + 1, kept) for c in self._channels]  # one chunk per channel: read only those
            return np.concatenate(planes, axis=2)  # (h, w, k)
        values = self._raw_channels(ranges, first, last + 1, kept)  # (h, w, last - first + 1)
        return values[:, :, [c - first for c in self._channels]]

    def _raw_channels(self, ranges: dict, start: int, stop: int, kept: list[str]) -> np.ndarray:
        key = tuple(slice(start, stop) if a == "c" else ranges[a] for a in self._axes)
        return np.asarray(self._array[key]).transpose([kept.index(a) for a in "yxc"])  # (h, w, stop - start)

    def _read(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        return to_rgb(self._raw(x0, y0, x1, y1), self._ranges)


def check_axes(axes: str, shape: Sequence[int], what: str) -> str:
    axes = axes.lower()
    if len(axes) != len(shape) or len(set(axes)) != len(axes) or not set(axes) <= set(AXES) or not {"y", "x"} <= set(axes):
        raise InputError(f"{what}: axes {axes!r} do not fit its shape {tuple(shape)}: name each axis once from t, c, z, y, x, with y and x")
    return axes


def axes_of(array: Any, what: str, axes: Optional[str] = None) -> str:
    """The axes of an array: given, from its metadata, or guessed from its shape (module doc)."""
    if axes is not None:
        return check_axes(axes, array.shape, what)
    names = getattr(getattr(array, "metadata", None), "dimension_names", None)
    if names is None:
        names = dict(getattr(array, "attrs", {}) or {}).get("_ARRAY_DIMENSIONS")
    if names and all(n is not None and str(n).lower() in NAMES for n in names):
        return check_axes("".join(NAMES[str(n).lower()] for n in names), array.shape, what)
    shape = tuple(array.shape)
    guess = {2: "yx", 5: "tczyx"}.get(len(shape))
    if len(shape) == 3:
        guess = "yxc" if shape[2] <= 4 else "cyx"
    if guess is None:
        raise InputError(f"{what} of shape {shape}: cannot tell its axes: name them (axes='czyx', ...), or store it as OME-Zarr, which does")
    return guess


def array_source(array: Any, read: ReadSettings = ReadSettings(), axes: Optional[str] = None, what: str = "array") -> ImageSource:
    """An in-memory or lazy array as an image source (one level): numpy, zarr.Array, dask.array."""
    return AxesSource([array], axes_of(array, what, axes), read, what)


def _first(chunk: Any) -> int:
    """A zarr chunk length (int) or dask's chunks along one axis (a tuple: its first)."""
    return int(chunk[0]) if isinstance(chunk, tuple) else int(chunk)
