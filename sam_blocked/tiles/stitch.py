"""Stitching the tiles' masks into one set for the image. Pure, driver side, on crops only.

Prompt mode has nothing to merge: each prompt set was decoded once, in one tile, so its
masks are put back in prompt order.

Automatic mode: the same object can come from several tiles (its points lie in several
cores), whole from some and cut by a tile edge in others. The masks are ranked by what
they are, never by the order tiles ran in: whole before truncated, then predicted IoU,
stability score, area, position, tile, point. Then, greedily in that order, a mask is
dropped as a duplicate of one already kept when

- their mask IoU is above the threshold (box_nms_thresh), or
- it is truncated, the kept one comes from another tile, and the kept one covers more
  than the threshold of it (intersection over its area: the cut piece of an object that
  another tile saw whole, or saw a larger part of).

Overlaps are counted on the two crops, only where the two boxes meet: never on
whole-image arrays. A truncated mask that nothing covers is kept and stays marked
truncated: an object no tile sees whole is reported so, never silently split or dropped.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from sam_blocked.tiles.crops import MaskCrop
from sam_blocked.tiles.geometry import boxes_meeting


def stitch_prompts(crops: Iterable[MaskCrop]) -> list[MaskCrop]:
    """Prompt-mode masks in prompt order (then mask_index), whatever order the tiles ran in."""
    return sorted(crops, key=lambda c: (c.record["prompt"], c.record["mask_index"]))


def rank_key(crop: MaskCrop) -> tuple:
    """The order of preference of automatic masks: a function of the mask alone."""
    r = crop.record
    point = tuple(r["point_coords"][0]) if r.get("point_coords") else ()
    return (bool(r["truncated"]), -r["predicted_iou"], -r["stability_score"], -r["area"], crop.y0, crop.x0, r["tile"], point)


def intersection(a: MaskCrop, b: MaskCrop) -> int:
    """Pixels in both masks, counted on the part of the two crops where their boxes meet."""
    x0, y0 = max(a.x0, b.x0), max(a.y0, b.y0)
    x1, y1 = min(a.box[2], b.box[2]), min(a.box[3], b.box[3])
    if x0 >= x1 or y0 >= y1:
        return 0
    sa = a.mask[y0 - a.y0 : y1 - a.y0, x0 - a.x0 : x1 - a.x0]  # (y1 - y0, x1 - x0)
    sb = b.mask[y0 - b.y0 : y1 - b.y0, x0 - b.x0 : x1 - b.x0]
    return int(np.count_nonzero(sa & sb))


def is_duplicate(mask: MaskCrop, kept: MaskCrop, threshold: float) -> bool:
    """Whether `mask` repeats `kept` (see the module docstring)."""
    inter = intersection(mask, kept)
    if inter == 0:
        return False
    area, other = mask.record["area"], kept.record["area"]
    if inter / (area + other - inter) > threshold:
        return True
    return bool(mask.record["truncated"]) and mask.record["tile"] != kept.record["tile"] and inter / area > threshold


def stitch_points(crops: Sequence[MaskCrop], threshold: float) -> list[MaskCrop]:
    """Automatic masks of all tiles, duplicates across tiles removed, best first.

    Args:
        crops: every tile's point_crops, in any order.
        threshold: box_nms_thresh: no two masks returned have a mask IoU above it.

    Returns:
        The kept masks in rank order (rank_key).
    """
    ranked = sorted(crops, key=rank_key)
    kept: list[MaskCrop] = []
    boxes = np.zeros((len(ranked), 4), dtype=np.int64)  # (K, 4) boxes of the kept masks, end-exclusive
    for mask in ranked:
        near = np.flatnonzero(boxes_meeting(mask.box, boxes[: len(kept)]))
        if not any(is_duplicate(mask, kept[i], threshold) for i in near):
            boxes[len(kept)] = mask.box
            kept.append(mask)
    return kept
