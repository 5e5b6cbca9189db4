"""Planning a tiled image: which tiles to encode and what each one decodes. Pure, driver side.

A `TileTask` is what crosses to whoever runs a tile (this process, or a worker of another
engine): the tile box, the image size, and its prompt sets or grid points, all in
whole-image pixels; small and picklable.

    tiling = Tiling(1024, 256)
    tasks = plan_prompts(tiling, height, width, prompts)     # only the tiles the prompts need
    tasks = plan_points(tiling, height, width, points_per_side=32)   # every tile, its own points
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from sam_blocked.inputs.images import InputError
from sam_blocked.models.registry import PATCH_SIZE
from sam_blocked.inputs.prompts import Prompt
from sam_blocked.tiles.geometry import Box, centred_box, check_tiling, default_overlap, grid_points, owners, route, tile_boxes


@dataclass(frozen=True)
class Tiling:
    """Tiles of `tile` px (the model's input size) sharing `overlap` px with their neighbours.

    Args:
        tile: a positive multiple of the patch size (16).
        overlap: in [0, tile); None: a quarter of the tile. Objects up to `overlap` px
            along each axis are seen whole by some tile.
    """

    tile: int = 1024
    overlap: Optional[int] = None

    def __post_init__(self) -> None:
        if self.overlap is None and isinstance(self.tile, int) and not isinstance(self.tile, bool):
            object.__setattr__(self, "overlap", default_overlap(self.tile))
        check_tiling(self.tile, self.overlap)

    def fits(self, height: int, width: int) -> bool:
        """Whether the image is one tile: it then takes the untiled path, exactly."""
        return height <= self.tile and width <= self.tile

    def boxes(self, height: int, width: int) -> list[Box]:
        return tile_boxes(height, width, self.tile, self.overlap)


@dataclass(frozen=True, eq=False)
class TileTask:
    """One tile's work.

    Args:
        index: the tile's index in Tiling.boxes (row by row).
        box: (x0, y0, x1, y1) of the tile, end-exclusive, whole-image pixels.
        image_size: (height, width) of the whole image: which tile edges are image edges.
        prompts: (index in the image's prompt list, prompt set in whole-image pixels).
        points: (N, 2) float x, y grid points this tile owns, whole-image pixels.
    """

    index: int
    box: Box
    image_size: tuple[int, int]
    prompts: tuple[tuple[int, Prompt], ...] = ()
    points: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))

    @property
    def crop_box(self) -> list[int]:
        """The tile as amg.py's crop_box: [x0, y0, w, h]."""
        x0, y0, x1, y1 = self.box
        return [x0, y0, x1 - x0, y1 - y0]


def prompt_extent(prompt: Prompt) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) around every point and the box of a prompt set."""
    xs = [x for x, _ in prompt.foreground + prompt.background]
    ys = [y for _, y in prompt.foreground + prompt.background]
    if prompt.box is not None:
        xs += [prompt.box[0], prompt.box[2]]
        ys += [prompt.box[1], prompt.box[3]]
    return min(xs), min(ys), max(xs), max(ys)


def plan_prompts(tiling: Tiling, height: int, width: int, prompts: Sequence[Prompt]) -> list[TileTask]:
    """Route each prompt set to the tile that holds it with the largest margin; one task per tile used.

    A prompt set no grid tile holds (it straddles a border and is wider than the overlap)
    gets a tile of its own, centred on it, after the grid's (index len(grid) + k), which
    later prompt sets may share.

    Raises:
        InputError: a prompt set no tile can hold (larger than a tile), naming it, its size,
            the tile and the setting to raise (tile).
    """
    boxes = tiling.boxes(height, width)
    routed: dict[int, list[tuple[int, Prompt]]] = {}
    for index, prompt in enumerate(prompts):
        extent = prompt_extent(prompt)
        where = route(extent, boxes, height, width)
        if where is None:
            own = centred_box(extent, tiling.tile, height, width)
            if own is None:
                raise _too_big(prompt, extent, tiling)
            boxes.append(own)
            where = len(boxes) - 1
        routed.setdefault(where, []).append((index, prompt))
    return [TileTask(i, boxes[i], (height, width), prompts=tuple(routed[i])) for i in sorted(routed)]


def point_spacing(tile: int, points_per_side: int) -> float:
    """Pixels between grid points: SAM's density on a tile-sized image (points_per_side per tile side)."""
    return tile / points_per_side


def plan_points(tiling: Tiling, height: int, width: int, points_per_side: int) -> list[TileTask]:
    """A point grid over the whole image, each point given to the tile whose core owns it; tiles owning no point are left out."""
    points = grid_points(height, width, point_spacing(tiling.tile, points_per_side))  # (N, 2)
    owner = owners(points, height, width, tiling.tile, tiling.overlap)  # (N,)
    boxes = tiling.boxes(height, width)
    return [TileTask(i, boxes[i], (height, width), points=points[owner == i]) for i in np.unique(owner).tolist()]


def tile_to_hold(extent: Sequence[float]) -> int:
    """The smallest tile size (a multiple of the patch size) that holds `extent` (x0, y0, x1, y1) wherever it lies."""
    span = math.ceil(max(extent[2] - extent[0], extent[3] - extent[1]))
    return -(-(span + 1) // PATCH_SIZE) * PATCH_SIZE


def _too_big(prompt: Prompt, extent: tuple[float, ...], tiling: Tiling) -> InputError:
    x0, y0, x1, y1 = extent
    what = f"box {list(prompt.box)}" if prompt.box is not None else f"points spanning [{x0:g}, {y0:g}, {x1:g}, {y1:g}]"
    bigger = tile_to_hold(extent)
    return InputError(
        f"prompt set {prompt.name!r}: {what} is {x1 - x0:g} x {y1 - y0:g} px, too large for one {{tile}} {tiling.tile} px tile "
        f"(the model's input size): raise {{tile}} to {bigger} or more",
        "tile",
    )
