"""Tile geometry at scale 1: where tiles lie, which tile owns a point, where a prompt set goes.

Pure functions of integers and arrays, apart from the code that runs the model. Boxes are
(x0, y0, x1, y1) in whole-image pixels, end-exclusive. Prompt coordinates are continuous
pixel coordinates as SAM takes them (0 <= x <= width).

- Tiles are `tile` px squares (the model's input size, so pixels go in at scale 1), one
  every `tile - overlap` px, the last row and column shifted back to end at the image
  edge, as SAHI's get_slice_bboxes does: every tile is full size, except along a side
  shorter than a tile, where the tile is the whole side.
- Cores partition the image: between two neighbouring tiles the border is the middle of
  their overlap, so a point owned by a tile lies about overlap / 2 px or more inside it.
- A prompt set goes to the tile that holds all its points and its box with the largest
  margin to the tile edges that are not image edges (an object cut there is not cut by
  the tile). Any extent of `overlap` px or less fits some tile; a larger one that straddles
  a border gets a tile of its own, centred on it (centred_box).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

from sam_blocked.errors import SettingError
from sam_blocked.models.registry import PATCH_SIZE

Box = tuple[int, int, int, int]


def check_tiling(tile: int, overlap: int, patch: int = PATCH_SIZE) -> None:
    """Refuse a tile size that is not a positive multiple of the patch size, or an overlap outside [0, tile).

    Raises:
        SettingError: naming the setting (tile, overlap) and a value that works.
    """
    whole = not isinstance(tile, bool) and isinstance(tile, (int, np.integer))
    if not whole or tile < patch or tile % patch:
        lower = int(tile) // patch * patch if whole else 0
        hint = f"{lower} or {lower + patch}" if lower >= patch else f"{patch * 64} (SAM's 1024)"
        raise SettingError(
            f"{{tile}} {tile!r} must be a positive multiple of the patch size {patch} (the tile is the model's input size): use {hint}", "tile"
        )
    if isinstance(overlap, bool) or not isinstance(overlap, (int, np.integer)) or not 0 <= overlap < tile:
        raise SettingError(
            f"{{overlap}} {overlap!r} px must be a whole number in [0, {tile}) for {{tile}} {tile}: "
            f"neighbouring tiles share this many pixels (default {default_overlap(tile)})",
            "overlap", "tile",
        )  # fmt: skip


def default_overlap(tile: int) -> int:
    """A quarter of the tile: objects up to this size along each axis are seen whole by some tile."""
    return tile // 4


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Tile starts along one axis of `length` px: 0, stride, 2 * stride, ..., the last shifted back to end at `length`.

    Args:
        length: the image side in pixels (>= 1).
        tile, overlap: as check_tiling accepts them; stride = tile - overlap.
    """
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, tile - overlap))  # those ending before the image edge
    return starts + [length - tile]


def core_bounds(length: int, tile: int, overlap: int) -> list[int]:
    """Borders of the cores along one axis: 0 = b0 < b1 < ... < bn = length; core i is [b_i, b_{i+1}).

    The border between tiles i and i + 1 is the middle of their overlap, so core i lies in tile i.
    """
    starts = tile_starts(length, tile, overlap)
    ends = [min(s + tile, length) for s in starts]
    middles = [(starts[i + 1] + ends[i]) // 2 for i in range(len(starts) - 1)]
    return [0, *middles, length]


def tile_grid(height: int, width: int, tile: int, overlap: int) -> tuple[int, int]:
    """(rows, columns) of tiles."""
    return len(tile_starts(height, tile, overlap)), len(tile_starts(width, tile, overlap))


def tile_boxes(height: int, width: int, tile: int, overlap: int) -> list[Box]:
    """Every tile box, row by row (index = row * columns + column)."""
    ys, xs = tile_starts(height, tile, overlap), tile_starts(width, tile, overlap)
    return [(x, y, min(x + tile, width), min(y + tile, height)) for y in ys for x in xs]


def tile_cores(height: int, width: int, tile: int, overlap: int) -> list[Box]:
    """The core of each tile, in tile_boxes' order: disjoint, covering the image."""
    ys, xs = core_bounds(height, tile, overlap), core_bounds(width, tile, overlap)
    return [(xs[c], ys[r], xs[c + 1], ys[r + 1]) for r in range(len(ys) - 1) for c in range(len(xs) - 1)]


def owners(points: np.ndarray, height: int, width: int, tile: int, overlap: int) -> np.ndarray:
    """The tile whose core holds each point.

    Args:
        points: (N, 2) x, y in continuous pixel coordinates, 0 <= x <= width; a point on
            the image's right or bottom edge belongs to the last pixel.

    Returns:
        (N,) int tile indices, as in tile_boxes.
    """
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)  # (N, 2)
    ys, xs = core_bounds(height, tile, overlap), core_bounds(width, tile, overlap)
    col = np.clip(np.floor(points[:, 0]), 0, width - 1)  # (N,) pixel column
    row = np.clip(np.floor(points[:, 1]), 0, height - 1)
    c = np.searchsorted(xs[1:-1], col, side="right")
    r = np.searchsorted(ys[1:-1], row, side="right")
    return r * (len(xs) - 1) + c


def margins(extent: Sequence[float], boxes: Sequence[Box], height: int, width: int) -> np.ndarray:
    """How far `extent` lies inside each tile from the tile edges that are not image edges.

    Args:
        extent: (x0, y0, x1, y1) continuous, x0 <= x1: what must lie in the tile.
        boxes: tile boxes.

    Returns:
        (T,) float margins in px: -inf where the tile does not hold the extent, +inf where
        it holds it and every tile edge is an image edge (the tile is the whole image).
    """
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)  # (T, 4)
    x0, y0, x1, y1 = (float(v) for v in extent)
    inner = np.stack([b[:, 0] > 0, b[:, 1] > 0, b[:, 2] < width, b[:, 3] < height], axis=1)  # (T, 4) edge is not an image edge
    gaps = np.stack([x0 - b[:, 0], y0 - b[:, 1], b[:, 2] - x1, b[:, 3] - y1], axis=1)  # (T, 4)
    holds = (gaps >= 0).all(axis=1)
    out = np.where(inner, gaps, np.inf).min(axis=1)
    return np.where(holds, out, -np.inf)


def route(extent: Sequence[float], boxes: Sequence[Box], height: int, width: int) -> Optional[int]:
    """The tile holding `extent` with the largest margin (the first such in tile order), or None if none holds it."""
    m = margins(extent, boxes, height, width)
    best = int(np.argmax(m))  # argmax returns the first of equal maxima
    return None if m[best] == -np.inf else best


def centred_box(extent: Sequence[float], tile: int, height: int, width: int) -> Optional[Box]:
    """A full-size tile at whole pixels, inside the image, holding `extent` (x0, y0, x1, y1) as
    near its centre as possible; None if no tile holds it (the extent is too large)."""
    start = []
    for lo, hi, side in ((extent[0], extent[2], width), (extent[1], extent[3], height)):
        if side <= tile:
            start.append(0)
            continue
        first, last = max(math.ceil(hi - tile), 0), min(math.floor(lo), side - tile)  # starts that hold [lo, hi]
        if first > last:
            return None
        start.append(min(max(round((lo + hi - tile) / 2), first), last))
    x, y = start
    return x, y, min(x + tile, width), min(y + tile, height)


def boxes_meet(a: Sequence[float], b: Sequence[float]) -> bool:
    """Whether two end-exclusive boxes share at least one pixel."""
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def boxes_meeting(box: Sequence[float], boxes: np.ndarray) -> np.ndarray:
    """(N,) bool: which of `boxes` (N, 4) share a pixel with `box`."""
    boxes = np.asarray(boxes).reshape(-1, 4)
    return (boxes[:, 0] < box[2]) & (box[0] < boxes[:, 2]) & (boxes[:, 1] < box[3]) & (box[1] < boxes[:, 3])


def touches_inner_edge(box: Box, tile: Box, height: int, width: int) -> bool:
    """Whether a mask's box (end-exclusive, inside `tile`) reaches a tile edge that is not an image edge:
    the mask may go on beyond the tile, so it is `truncated`."""
    return (
        (box[0] <= tile[0] and tile[0] > 0)
        or (box[1] <= tile[1] and tile[1] > 0)
        or (box[2] >= tile[2] and tile[2] < width)
        or (box[3] >= tile[3] and tile[3] < height)
    )


def grid_points(height: int, width: int, spacing: float) -> np.ndarray:
    """A point grid over the whole image at a fixed pixel spacing, offset by half a spacing
    (segment_anything's build_point_grid at spacing = side / points_per_side).

    Returns:
        (N, 2) float x, y, row by row.
    """
    if not spacing > 0 or not math.isfinite(spacing):
        raise ValueError(f"point spacing must be > 0 px, got {spacing}")
    xs = (np.arange(math.ceil(width / spacing)) + 0.5) * spacing
    ys = (np.arange(math.ceil(height / spacing)) + 0.5) * spacing
    xs, ys = xs[xs < width], ys[ys < height]
    gx, gy = np.meshgrid(xs, ys)  # (rows, cols)
    return np.stack([gx.ravel(), gy.ravel()], axis=1)  # (N, 2)
