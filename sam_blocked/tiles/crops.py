"""A mask at native resolution, kept as the crop of its bounding box: never an (H, W) array.

Tiled segmentation produces these, stitching compares them, and the huge-image writers
(label TIFF, COCO RLE, object table) consume them. In whole-image pixel coordinates.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class MaskCrop:
    """One mask of a huge image.

    Args:
        mask: (h, w) bool, the mask inside its crop; the crop need not be tight.
        x0, y0: whole-image column and row of mask[0, 0].
        record: amg.py's fields in whole-image pixels (area, bbox XYWH, predicted_iou,
            stability_score, point_coords, crop_box = the tile it came from, XYWH), plus
            truncated (touches a tile edge that is not an image edge) and, in prompt mode,
            prompt, prompt_name and mask_index.
    """

    mask: np.ndarray
    x0: int
    y0: int
    record: dict[str, Any] = field(default_factory=dict)

    @property
    def box(self) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) of the crop, end-exclusive."""
        h, w = self.mask.shape
        return self.x0, self.y0, self.x0 + w, self.y0 + h
