"""The object table of a huge image: one CSV row per mask, the key between the label image and the COCO JSON.

Columns: amg.py's metadata.csv columns (id, area, bbox_x0, bbox_y0, bbox_w, bbox_h,
point_input_x, point_input_y, predicted_iou, stability_score, crop_box_x0, crop_box_y0,
crop_box_w, crop_box_h), then truncated, then in prompt mode prompt, prompt_name and
mask_index. Here `id` is the mask's value in the label image (position + 1; 0 is
background), and the same id as in the COCO JSON; `crop_box` is the tile the mask came
from (XYWH); `predicted_iou` is SAM's score; `truncated` says the mask touches a tile edge
that is not an image edge (it may continue beyond it). `area` and `bbox` are measured on
the mask itself: they agree with its RLE (a mask partly covered by a smaller one in the
label image shows fewer pixels there).
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from sam_blocked.outputs import AMG_COLUMNS, PROMPT_COLUMNS, write_atomic
from sam_blocked.tiles.crops import MaskCrop

COLUMNS = [*AMG_COLUMNS, "truncated"]


def crop_stats(crop: MaskCrop) -> tuple[int, list[int]]:
    """(area, bbox [x, y, w, h]) of the mask in whole-image pixels; an empty mask has bbox [0, 0, 0, 0]
    (amg.py's batched_mask_to_box gives an empty mask a zero box too)."""
    rows, cols = np.any(crop.mask, axis=1), np.any(crop.mask, axis=0)  # (h,), (w,)
    if not rows.any():
        return 0, [0, 0, 0, 0]
    top, bottom = int(rows.argmax()), len(rows) - int(rows[::-1].argmax())
    left, right = int(cols.argmax()), len(cols) - int(cols[::-1].argmax())
    return int(np.count_nonzero(crop.mask)), [crop.x0 + left, crop.y0 + top, right - left, bottom - top]


def object_records(masks: Sequence[MaskCrop]) -> list[dict[str, Any]]:
    """Each mask's record as written: id (position + 1) first, area and bbox measured on the mask,
    truncated (False when absent), then the rest of its record."""
    out = []
    for i, crop in enumerate(masks):
        area, bbox = crop_stats(crop)
        record = {"id": i + 1, **crop.record, "area": area, "bbox": bbox}
        record.setdefault("truncated", False)
        out.append(record)
    return out


def object_table(records: Sequence[dict[str, Any]]) -> str:
    """The CSV text of `object_records`' output."""
    prompted = any("prompt" in r for r in records)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(COLUMNS + (PROMPT_COLUMNS if prompted else []))
    for r in records:
        point = r["point_coords"][0] if r.get("point_coords") else ["", ""]
        tile = r.get("crop_box") or ["", "", "", ""]
        row = [r["id"], r["area"], *r["bbox"], *point, r.get("predicted_iou", ""), r.get("stability_score", ""), *tile, bool(r["truncated"])]
        writer.writerow(row + ([r.get(k, "") for k in PROMPT_COLUMNS] if prompted else []))
    return out.getvalue()


def write_object_table(path: str | os.PathLike, masks: Sequence[MaskCrop]) -> None:
    """Write the object table of `masks` (mask i has id i + 1), atomically.

    Args:
        path: the .csv to write.
        masks: the masks in id order, crops in whole-image pixels.
    """
    text = object_table(object_records(masks))
    write_atomic(Path(path), lambda f: f.write(text.encode()))
