"""OME-Zarr (OME-NGFF 0.4 and 0.5) images and plain zarr arrays, read window by window with zarr.

The image read is the first of the group's `multiscales`: its axes (names and types) give
t, c, z, y and x; its datasets, level 0 first, are the pyramid; each dataset's `scale`
transform (times the multiscale's own, if any) gives its downsample and, when the x axis
has a unit of length, its microns per pixel. NGFF 0.5 keeps the metadata under `ome`
in zarr.json, 0.4 in .zattrs: both are read. A bioformats2raw store (series under 0/, 1/...)
reads series 0; an HCS plate is refused with the path of one field to give instead. A
plain zarr array (no multiscales) is one level whose axes come from its dimension names
or its shape (sam_blocked.inputs.arrays).

A path or an fsspec URL (`s3://bucket/image.ome.zarr`) is opened as zarr opens it.
"""

from __future__ import annotations

import os
from typing import Optional

import zarr

from sam_blocked.errors import InputError
from sam_blocked.inputs.arrays import AXES, AxesSource, axes_of
from sam_blocked.inputs.base import ReadSettings
from sam_blocked.inputs.images import is_zarr  # noqa: F401  (here for callers: what this module opens)

MICRONS = {"micrometer": 1.0, "micron": 1.0, "nanometer": 1e-3, "angstrom": 1e-4, "millimeter": 1e3, "centimeter": 1e4, "meter": 1e6}


def open_zarr(path: str | os.PathLike, read: ReadSettings = ReadSettings()) -> AxesSource:
    """The OME-Zarr image or zarr array at `path` (see the module doc).

    Raises:
        InputError: not readable as zarr, a group with no image, an HCS plate, axes that
            are not t, c, z, y, x, or a level / mpp / channel the image does not have.
    """
    what = f"zarr store {os.fspath(path)}"
    try:
        node = zarr.open(os.fspath(path), mode="r")
    except Exception as error:  # FileNotFoundError, ValueError, JSON errors, ...
        raise InputError(f"cannot open it as zarr ({type(error).__name__}: {error}): the store is incomplete or not zarr") from error
    if isinstance(node, zarr.Array):
        return AxesSource([node], axes_of(node, what), read, f"zarr array {os.fspath(path)}")
    return image_of_group(node, read, what)


def image_of_group(group: zarr.Group, read: ReadSettings, what: str) -> AxesSource:
    attrs = dict(group.attrs)
    ome = attrs.get("ome", attrs)  # 0.5: {"ome": {...}}; 0.4: at the top
    notes = []
    if "multiscales" not in ome and "bioformats2raw.layout" in ome and "0" in group:
        series = sum(1 for key in group.group_keys() if key.isdigit())
        notes.append(f"bioformats2raw store of {series} series: reading series 0")
        group, what = group["0"], f"{what} (series 0)"
        attrs = dict(group.attrs)
        ome = attrs.get("ome", attrs)
    if "plate" in ome or "well" in ome:
        raise InputError(f"{what} is an HCS {'plate' if 'plate' in ome else 'well'}: give one field's image, e.g. PLATE.zarr/A/1/0")
    if "multiscales" not in ome:
        arrays = sorted(group.array_keys())
        hint = f"give one of its arrays' paths ({', '.join(arrays[:5])})" if arrays else "it holds no array"
        raise InputError(f"{what} is a zarr group without OME-NGFF multiscales metadata: {hint}")
    multiscale = ome["multiscales"][0]
    if len(ome["multiscales"]) > 1:
        notes.append(f"{len(ome['multiscales'])} multiscale images; reading the first")
    version = ome.get("version") or multiscale.get("version") or "?"
    try:
        arrays = [group[dataset["path"]] for dataset in multiscale["datasets"]]
    except KeyError as error:
        raise InputError(f"{what}: its multiscales metadata names dataset {error} that the store does not hold: copy it again") from error
    axes = _axes(multiscale.get("axes"), len(arrays[0].shape), what)
    scales = [_scale(dataset, multiscale, len(axes)) for dataset in multiscale["datasets"]]
    downsamples = mpps = None
    if all(s is not None for s in scales):
        ix = axes.index("x")
        downsamples = [s[ix] / scales[0][ix] for s in scales]
        unit = _unit(multiscale.get("axes"), ix)
        mpps = [s[ix] * MICRONS[unit] for s in scales] if unit in MICRONS else None
    source = AxesSource(arrays, axes, read, f"OME-Zarr {version} image {what.removeprefix('zarr store ')}", downsamples, mpps)
    source.notes[:0] = notes
    return source


def _axes(axes: Optional[list], ndim: int, what: str) -> str:
    if axes is None:  # NGFF 0.1 / 0.2: always 5-D tczyx
        return AXES[-ndim:]
    letters = []
    for axis in axes:
        name = (axis["name"] if isinstance(axis, dict) else str(axis)).lower()
        kind = axis.get("type") if isinstance(axis, dict) else None
        letter = name if name in AXES else {"channel": "c", "time": "t"}.get(kind)
        if letter is None:
            raise InputError(f"{what}: axis {name!r} ({kind or 'no type'}) is not one of t, c, z, y, x: rename it in its metadata")
        letters.append(letter)
    return "".join(letters)


def _scale(dataset: dict, multiscale: dict, ndim: int) -> Optional[list[float]]:
    """The dataset's scale times the multiscale's own, or None when there is none."""
    scale = None
    for transforms in (dataset.get("coordinateTransformations"), multiscale.get("coordinateTransformations")):
        for transform in transforms or []:
            if transform.get("type") == "scale" and "scale" in transform and len(transform["scale"]) == ndim:
                values = [float(v) for v in transform["scale"]]
                scale = values if scale is None else [a * b for a, b in zip(scale, values)]
    return scale


def _unit(axes: Optional[list], index: int) -> Optional[str]:
    if not axes or not isinstance(axes[index], dict):
        return None
    return axes[index].get("unit")

