"""The label image painted window by window, at full resolution or every 2**k-th pixel, from mask crops.

Every raster writer (pyramidal OME-TIFF, NGFF labels, COG) asks `LabelPainter.window` for the
pixels of one tile or chunk, so none of them ever holds the (height, width) label image.

Level k of a pyramid is nearest down-sampling of level 0 by 2**k, taking the top-left pixel
of each 2**k x 2**k block: `level_k == level_0[::2**k, ::2**k]`, of shape
(ceil(height / 2**k), ceil(width / 2**k)). Labels are never averaged (an average of ids 3
and 5 is id 4, another object); nearest keeps every pixel an id that is really there, and
it is what QuPath, napari and GDAL's "nearest" overviews expect of labels. Painting the
sub-sampled crops gives that level directly, without reading level 0 back.

Where masks overlap the smaller mask wins (fewer pixels; equal sizes: the higher id), the
rule of sam_blocked.outputs.labels, so every level agrees with the flat label TIFF.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

from sam_blocked.outputs.labels import check_crops, paint_order
from sam_blocked.tiles.crops import MaskCrop


def level_shapes(height: int, width: int, tile: int) -> list[tuple[int, int]]:
    """(height, width) of each pyramid level, level 0 first, halving until the image fits one tile."""
    shapes = [(height, width)]
    while max(shapes[-1]) > tile:
        k = len(shapes)
        shapes.append((-(-height // 2**k), -(-width // 2**k)))
    return shapes


class LabelPainter:
    """Paints windows of the label image (or of one of its levels) from mask crops.

    Args:
        masks: mask i has id i + 1; crops in whole-image (level 0) pixels.
        height, width: the level-0 image size.
    """

    def __init__(self, masks: Sequence[MaskCrop], height: int, width: int) -> None:
        check_crops(masks, height, width)
        self.masks, self.height, self.width = masks, height, width
        self.order = np.asarray(paint_order(masks), dtype=np.int64)  # (N,) largest first: the last painted wins
        self.boxes = np.array([m.box for m in masks], dtype=np.int64).reshape(-1, 4)[self.order]  # (N, 4) in paint order

    def window(self, x0: int, y0: int, x1: int, y1: int, step: int = 1) -> np.ndarray:
        """The label pixels of a window of the level whose pixel (i, j) is level 0's (i * step, j * step).

        Args:
            x0, y0, x1, y1: the window in that level's pixels, end-exclusive; it may pass the
                level's right and bottom edges (zeros there).
            step: 2**k for level k.

        Returns:
            (y1 - y0, x1 - x0) uint32, 0 where no mask is.
        """
        out = np.zeros((y1 - y0, x1 - x0), np.uint32)  # (h, w)
        X0, Y0, X1, Y1 = x0 * step, y0 * step, (x1 - 1) * step + 1, (y1 - 1) * step + 1  # level-0 extent
        b = self.boxes
        meet = (b[:, 0] < X1) & (b[:, 2] > X0) & (b[:, 1] < Y1) & (b[:, 3] > Y0)
        for i in self.order[meet]:
            crop = self.masks[i]
            cx0, cy0, cx1, cy1 = crop.box
            # level rows i with cy0 <= i * step < cy1, inside the window
            r0, r1 = max(y0, -(-cy0 // step)), min(y1, -(-cy1 // step))
            c0, c1 = max(x0, -(-cx0 // step)), min(x1, -(-cx1 // step))
            if r0 >= r1 or c0 >= c1:
                continue
            sub = crop.mask[r0 * step - cy0 : (r1 - 1) * step - cy0 + 1 : step, c0 * step - cx0 : (c1 - 1) * step - cx0 + 1 : step]
            np.putmask(out[r0 - y0 : r1 - y0, c0 - x0 : c1 - x0], sub, i + 1)  # (r1 - r0, c1 - c0)
        return out

    def tiles(self, level: int, tile: int) -> Iterator[np.ndarray]:
        """Level `level` as TIFF tiles: row of tiles by row, left to right, each (tile, tile)
        uint32, zeros beyond the level's edges. One band of tile rows is held at a time."""
        step = 2**level
        height, width = -(-self.height // step), -(-self.width // step)
        padded = -(-width // tile) * tile
        for top in range(0, height, tile):
            band = self.window(0, top, padded, top + tile, step)  # (tile, W'): new per band, tiles may still be queued
            for left in range(0, padded, tile):
                yield band[:, left : left + tile]  # (tile, tile)
