"""A mask crop as a polygon along its pixel edges: holes kept, several parts a MultiPolygon.

`mask_polygon` traces the mask exactly: each run of mask pixels in a row is a 1-pixel-high
rectangle (runs repeated down consecutive rows are merged into one taller rectangle), and
the union of those rectangles (GEOS's unary union: they share edges, never overlap) is the
mask's outline with its holes, in whole-image pixel coordinates (pixel (r, c) is the unit
square [c, c + 1] x [r, r + 1]). Pixels meeting at a corner only are one polygon touching
itself at that point, or two parts, as GEOS builds it; the result is valid either way.
`simplify` (pixels) then drops vertices with Douglas-Peucker, keeping the topology; at 0
only collinear vertices go, so the polygon still rasterizes back to the mask exactly.

Works on the crop alone: memory is the crop and its runs, never the image. Needs shapely
(the `polygons` extra).
"""

from __future__ import annotations

from importlib.util import find_spec
from typing import Any, Optional

import numpy as np

from sam_blocked.tiles.crops import MaskCrop

INSTALL_POLYGONS = 'pip install "sam-blocked[polygons]"'


def have_shapely() -> bool:
    return find_spec("shapely") is not None


def row_runs(mask: np.ndarray) -> np.ndarray:
    """(n, 4) int64 rectangles (x0, y0, x1, y1), end-exclusive, covering the (h, w) bool mask
    without overlap: its runs of pixels along rows, merged down rows where a run repeats."""
    h, w = mask.shape
    padded = np.zeros((h, w + 2), np.int8)  # (h, w+2): a 0 left and right of each row
    padded[:, 1:-1] = mask
    row, col = np.nonzero(np.diff(padded, axis=1))  # starts and ends alternate along each row
    y, x0, x1 = row[0::2], col[0::2], col[1::2]  # (n,) each
    if not y.size:
        return np.zeros((0, 4), np.int64)
    order = np.lexsort((y, x1, x0))  # runs with the same columns together, by row
    y, x0, x1 = y[order], x0[order], x1[order]
    new = np.ones(y.size, bool)
    new[1:] = (x0[1:] != x0[:-1]) | (x1[1:] != x1[:-1]) | (y[1:] != y[:-1] + 1)
    start = np.flatnonzero(new)
    stop = np.append(start[1:], y.size) - 1  # the last run of each merged rectangle
    return np.stack([x0[start], y[start], x1[start], y[stop] + 1], axis=1).astype(np.int64)


def mask_polygon(crop: MaskCrop, simplify: float = 0.0, scale: float = 1.0) -> Optional[Any]:
    """The mask's outline as a shapely Polygon or MultiPolygon, or None for an empty mask.

    Args:
        crop: the mask and its place in the image.
        simplify: Douglas-Peucker tolerance in (segmented) pixels; 0 keeps the pixel edges.
        scale: multiply the coordinates by this (the input's downsample: level-0 pixels).

    Raises:
        ValueError: shapely is not installed, or simplify is negative.
    """
    if not have_shapely():
        raise ValueError(f"polygons need shapely: {INSTALL_POLYGONS}")
    if simplify < 0:
        raise ValueError(f"simplify {simplify} must be >= 0 pixels")
    import shapely

    rects = row_runs(crop.mask)  # (n, 4)
    if not len(rects):
        return None
    rects = rects + np.array([crop.x0, crop.y0, crop.x0, crop.y0])
    shape = shapely.union_all(shapely.box(rects[:, 0], rects[:, 1], rects[:, 2], rects[:, 3]))
    shape = shapely.simplify(shape, simplify, preserve_topology=True)
    if not shape.is_valid:  # not seen; a refusal would lose the mask, a repair keeps its area
        shape = shapely.make_valid(shape)
    if scale != 1.0:
        shape = shapely.affinity.scale(shape, scale, scale, origin=(0, 0))
    return shape
