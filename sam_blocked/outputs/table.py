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

`bbox` is amg.py's: box_xyxy_to_xywh(batched_mask_to_box(mask)), in whole-image pixels, so
x0, y0 are the first column and row of the mask and w = x1 - x0, h = y1 - y0 with x1, y1
its last column and row: one less than the pixel extent (a one-pixel mask has w = h = 0;
an empty mask has [0, 0, 0, 0]). It is the untiled run's bbox (metadata.csv, COCO JSON)
for the same mask, not COCO's (pycocotools' toBbox gives the extent, w + 1).
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from segment_anything.utils.amg import batched_mask_to_box, box_xyxy_to_xywh

from sam_blocked.outputs.images import AMG_COLUMNS, PROMPT_COLUMNS, write_atomic
from sam_blocked.tiles.crops import MaskCrop

COLUMNS = [*AMG_COLUMNS, "truncated"]


def crop_stats(crop: MaskCrop) -> tuple[int, list[int]]:
    """(area, bbox [x, y, w, h]) of the mask in whole-image pixels, bbox as amg.py computes it
    (w = last column - first column); an empty mask has bbox [0, 0, 0, 0], as amg.py gives it."""
    area = int(np.count_nonzero(crop.mask))
    if area == 0:
        return 0, [0, 0, 0, 0]
    x, y, w, h = box_xyxy_to_xywh(batched_mask_to_box(torch.as_tensor(np.ascontiguousarray(crop.mask)))).tolist()  # within the crop
    return area, [crop.x0 + int(x), crop.y0 + int(y), int(w), int(h)]


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
