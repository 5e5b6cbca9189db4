"""What a segment run is asked to do, checked when built so a bad option fails before any work."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from importlib.util import find_spec
from typing import Any, Callable

from sam_blocked.images import DEFAULT_MAX_PIXELS
from sam_blocked.outputs import FORMATS

# SamAutomaticMaskGenerator's settings that amg.py exposes, with the check each value must pass.
AMG_SETTINGS: dict[str, tuple[type, Callable[[float], bool], str]] = {
    "points_per_side": (int, lambda v: v >= 1, ">= 1"),
    "points_per_batch": (int, lambda v: v >= 1, ">= 1"),
    "pred_iou_thresh": (float, lambda v: 0 <= v <= 1, "in [0, 1]"),
    "stability_score_thresh": (float, lambda v: 0 <= v <= 1, "in [0, 1]"),
    "stability_score_offset": (float, lambda v: v >= 0, ">= 0"),
    "box_nms_thresh": (float, lambda v: 0 <= v <= 1, "in [0, 1]"),
    "crop_n_layers": (int, lambda v: v >= 0, ">= 0"),
    "crop_nms_thresh": (float, lambda v: 0 <= v <= 1, "in [0, 1]"),
    "crop_overlap_ratio": (float, lambda v: 0 <= v < 1, "in [0, 1)"),
    "crop_n_points_downscale_factor": (int, lambda v: v >= 1, ">= 1"),
    "min_mask_region_area": (int, lambda v: v >= 0, ">= 0"),
}


@dataclass
class SegmentOptions:
    """What to write and how; checked when built, so a bad option fails before any work.

    Args:
        formats: any of "png" (mask folder + metadata.csv) and "coco" (RLE JSON).
        multimask: prompt mode: keep SAM's three masks per prompt set, not the best one.
        overlay: also write a preview PNG with the masks blended in.
        overwrite: redo images whose outputs are already complete.
        max_pixels: images above this many pixels fail (decompression-bomb guard).
        amg: SamAutomaticMaskGenerator keyword arguments (amg.py's settings), auto mode.
    """

    formats: tuple[str, ...] = ("png",)
    multimask: bool = False
    overlay: bool = False
    overwrite: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS
    amg: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.formats = tuple(self.formats)
        if not self.formats or any(f not in FORMATS for f in self.formats):
            raise ValueError(f"formats {self.formats} must be one or both of {FORMATS}")
        if isinstance(self.max_pixels, bool) or not isinstance(self.max_pixels, int) or self.max_pixels < 1:
            raise ValueError(f"--max-pixels {self.max_pixels!r} must be a whole number >= 1")
        for key, value in self.amg.items():
            if key not in AMG_SETTINGS:
                raise ValueError(f"unknown automatic-mask setting {key!r}: choose from {', '.join(AMG_SETTINGS)}")
            kind, ok, rule = AMG_SETTINGS[key]
            flag = "--" + key.replace("_", "-")
            number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if not number or (kind is int and value != int(value)) or not ok(value):
                raise ValueError(f"{flag} {value!r} must be {'a whole number ' if kind is int else ''}{rule}")
        if self.amg.get("min_mask_region_area", 0) > 0 and find_spec("cv2") is None:
            raise ValueError(
                "--min-mask-region-area > 0 needs OpenCV, which segment_anything uses to remove small regions: "
                "pip install opencv-python-headless, or leave it at 0"
            )
