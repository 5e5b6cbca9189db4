"""What a segment run is asked to do, checked when built so a bad option fails before any work.

Formats: "png" (amg.py's mask folder) and "coco" (RLE JSON) for images segmented whole, as
ever; "labels" (uint32 label TIFF), "table" (object CSV), "ome-tiff", "cog", "ngff",
"geojson" and "gpkg" (sam_blocked.outputs.huge) for huge ones. With a tiling and no formats
asked for, each image gets its kind's (outputs.huge.default_tiled_formats: labels, coco and
table for plain images, as before; ome-tiff, geojson, table for slides; ngff, geojson, table
for OME-Zarr; cog, gpkg, table for GeoTIFFs); without one it stays png. Asking for a huge
image's format without a tiling writes it too, for images segmented whole.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from importlib.util import find_spec
from typing import Any, Callable, Optional

from sam_blocked.errors import SettingError
from sam_blocked.inputs.base import ReadSettings
from sam_blocked.inputs.images import DEFAULT_MAX_PIXELS
from sam_blocked.outputs.images import FORMATS
from sam_blocked.outputs.huge import DEFAULT_TILED_FORMATS, TILED_FORMATS, missing_packages
from sam_blocked.tiles.plan import Tiling

ALL_FORMATS = tuple(dict.fromkeys(FORMATS + TILED_FORMATS))  # png, coco, labels, table

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
        formats: any of ALL_FORMATS: "png" (mask folder + metadata.csv), "coco" (RLE JSON),
            "labels" (label TIFF), "table" (object CSV); None: png, or with a tiling
            labels, coco and table.
        multimask: prompt mode: keep SAM's three masks per prompt set, not the best one.
        overlay: also write a preview PNG with the masks blended in (png/coco runs only).
        overwrite: redo images whose outputs are already complete.
        max_pixels: images decoded whole (all but TIFF with a tiling) above this many
            pixels fail (decompression-bomb guard).
        amg: SamAutomaticMaskGenerator keyword arguments (amg.py's settings), auto mode.
        tiling: segment images larger than one tile tile by tile at native resolution
            (sam_blocked.tiles); the model's input size must be tiling.tile. Images that
            fit in one tile take the untiled path.
        read: the pyramid level (or mpp) and channels read from every image (ReadSettings);
            masks, boxes and prompts are then in that level's pixels, and each image's
            summary entry records its `scale` (level, downsample, mpp) to map them to level 0.
        simplify: polygon tolerance in pixels (geojson, gpkg); 0 keeps the exact pixel edges.
        labels_into_input: ngff labels go into the input (an OME-Zarr image), not beside it.
    """

    formats: Optional[tuple[str, ...]] = None
    multimask: bool = False
    overlay: bool = False
    overwrite: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS
    amg: dict[str, Any] = field(default_factory=dict)
    tiling: Optional[Tiling] = None
    read: ReadSettings = field(default_factory=ReadSettings)
    simplify: float = 0.0
    labels_into_input: bool = False
    per_input_formats: bool = field(default=False, init=False)  # formats not asked for: each input's kind picks

    def __post_init__(self) -> None:
        if not isinstance(self.read, ReadSettings):
            raise TypeError(f"read must be a ReadSettings, not {type(self.read).__name__}")
        if self.formats is None:
            self.per_input_formats = self.tiling is not None
            self.formats = DEFAULT_TILED_FORMATS if self.tiling is not None else ("png",)
        self.formats = tuple(dict.fromkeys(self.formats))
        if not self.formats or any(f not in ALL_FORMATS for f in self.formats):
            raise SettingError(f"{{formats}} {','.join(map(str, self.formats))}: choose one or more of {', '.join(ALL_FORMATS)}", "formats")
        missing = missing_packages(self.formats)
        if missing:
            raise SettingError(f"{{formats}} {','.join(missing)} needs packages that are not installed: {'; '.join(sorted(set(missing.values())))}", "formats")
        if isinstance(self.simplify, bool) or not isinstance(self.simplify, (int, float)) or not math.isfinite(self.simplify) or self.simplify < 0:
            raise SettingError(f"{{simplify}} {self.simplify!r} must be a number of pixels >= 0", "simplify")
        if self.simplify and not {"geojson", "gpkg"} & set(self.formats) and not self.per_input_formats:
            raise SettingError("{simplify} applies to polygons: add geojson or gpkg to {formats}, or drop it", "simplify", "formats")
        if self.labels_into_input and "ngff" not in self.formats and not self.per_input_formats:
            raise SettingError("{labels_into_input} places the ngff labels: add ngff to {formats}", "labels_into_input", "formats")
        if self.overlay and self.huge_outputs:
            raise SettingError(
                "{overlay} draws the masks on the whole image: it goes with {formats} png/coco, "
                "not with {tiling} or {formats} labels/table",
                "overlay", "formats", "tiling",
            )  # fmt: skip
        if self.tiling is not None and self.amg.get("crop_n_layers", 0) > 0:
            raise SettingError(
                "{crop_n_layers} re-runs SAM on crops of one 1024 px view to find small objects; with {tiling} "
                "every pixel is seen at native resolution already: leave {crop_n_layers} at 0",
                "crop_n_layers", "tiling",
            )  # fmt: skip
        if isinstance(self.max_pixels, bool) or not isinstance(self.max_pixels, int) or self.max_pixels < 1:
            raise SettingError(f"{{max_pixels}} {self.max_pixels!r} must be a whole number >= 1", "max_pixels")
        for key, value in self.amg.items():
            if key not in AMG_SETTINGS:
                raise ValueError(f"unknown automatic-mask setting {key!r}: choose from {', '.join(AMG_SETTINGS)}")
            kind, ok, rule = AMG_SETTINGS[key]
            number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if not number or (kind is int and value != int(value)) or not ok(value):
                raise SettingError(f"{{{key}}} {value!r} must be {'a whole number ' if kind is int else ''}{rule}", key)
        if self.amg.get("min_mask_region_area", 0) > 0 and find_spec("cv2") is None:
            raise SettingError(
                "{min_mask_region_area} > 0 needs OpenCV, which segment_anything uses to remove small regions: "
                "pip install opencv-python-headless, or leave it at 0",
                "min_mask_region_area",
            )

    @property
    def huge_outputs(self) -> bool:
        """Whether images are written as huge images are (sam_blocked.outputs.huge): with a
        tiling, or when the label TIFF or the object table is asked for."""
        return self.tiling is not None or any(f not in FORMATS for f in self.formats)
