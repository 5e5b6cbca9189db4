"""COCO RLE of masks kept as crops, at full image size, and the huge image's COCO JSON.

`coco_rle` gives what `pycocotools.mask.encode` gives for the mask pasted into a full
(height, width) array, without building that array: COCO RLE runs go down each column
(column-major), so the runs are found in the crop's columns, placed at their whole-image
offsets (column * height + row), joined where a run reaches the image's bottom edge and
the next column's starts at its top, and counted; pycocotools packs the counts into its
string. The JSON is SA-1B's per-image layout, as sam_blocked.outputs.images writes it:

    {"image": {"file_name", "height", "width"[, "crs", "transform"]},
     "annotations": [{"id", "segmentation": {"size", "counts"}, "area", "bbox", "predicted_iou",
                      "point_coords", "stability_score", "crop_box", "truncated", ...}, ...]}

with ids as in the label image and object table (position + 1), `crop_box` the tile the mask
came from (XYWH), and the image's CRS (WKT) and affine transform when it is georeferenced.
`area` and `bbox` are measured on the mask (tiles.table.crop_stats); `bbox` is amg.py's XYWH,
box_xyxy_to_xywh(batched_mask_to_box(mask)): w = last column - first column, one less than
the pixel extent that pycocotools' toBbox gives. So a mask has the same bbox here as in an
untiled run's JSON and metadata.csv.
It is written one annotation at a time. pycocotools counts in 32 bits, so images of 2**32
pixels or more (65536 x 65536) have no COCO RLE: use the label TIFF and object table.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, BinaryIO, Optional, Sequence

import numpy as np
from pycocotools import mask as mask_utils

from sam_blocked.outputs.images import write_atomic
from sam_blocked.tiles.crops import MaskCrop
from sam_blocked.inputs.geo import GeoInfo
from sam_blocked.outputs.table import object_records

MAX_RLE_PIXELS = 2**32 - 1  # pycocotools' counts are uint32


def rle_counts(crop: MaskCrop, height: int, width: int) -> np.ndarray:
    """Uncompressed COCO RLE counts (int64): alternating runs of 0s and 1s, column-major over the
    full (height, width) image, starting with 0s (a possibly empty run), as pycocotools counts them."""
    h, w = crop.mask.shape
    padded = np.zeros((w, h + 2), np.int8)  # (w, h+2): each crop column, a 0 above and below
    padded[:, 1:-1] = crop.mask.T
    col, row = np.nonzero(np.diff(padded, axis=1))  # (n,): run starts and ends, alternating, in order
    edges = (crop.x0 + col).astype(np.int64) * height + crop.y0 + row  # whole-image column-major offsets
    joined = np.flatnonzero(edges[1:-1:2] == edges[2::2])  # an end that is the next start: one run
    if joined.size:
        edges = np.delete(edges, np.concatenate([2 * joined + 1, 2 * joined + 2]))
    counts = np.diff(np.concatenate([[0], edges, [height * width]]))
    return counts[:-1] if counts.size > 1 and counts[-1] == 0 else counts


def coco_rle(crop: MaskCrop, height: int, width: int) -> dict[str, Any]:
    """The COCO RLE of one mask at full image size, as pycocotools.mask.encode writes it.

    Args:
        crop: the mask, inside the height x width image.
        height, width: the image size.

    Returns:
        {"size": [height, width], "counts": str}, the compressed string form.
    """
    if height * width > MAX_RLE_PIXELS:
        raise ValueError(f"a {width} x {height} image has no COCO RLE (pycocotools counts in 32 bits): use the label TIFF and object table")
    x0, y0, x1, y1 = crop.box
    if not (0 <= x0 <= x1 <= width and 0 <= y0 <= y1 <= height):
        raise ValueError(f"crop box {crop.box} lies outside the {width} x {height} image")
    counts = rle_counts(crop, height, width)
    rle = mask_utils.frPyObjects({"size": [height, width], "counts": counts.tolist()}, height, width)
    return {"size": [height, width], "counts": rle["counts"].decode("ascii")}


def save_coco(f: BinaryIO, masks: Sequence[MaskCrop], height: int, width: int, *, file_name: str, geo: Optional[GeoInfo] = None) -> None:
    """Write the COCO JSON into the binary file `f`, one annotation at a time. Arguments as write_coco."""
    image = {"file_name": file_name, "height": height, "width": width, **(geo.to_json() if geo else {})}
    f.write(b'{"image": ' + json.dumps(image).encode() + b', "annotations": [')
    for i, (record, crop) in enumerate(zip(object_records(masks), masks)):
        annotation = {"id": record.pop("id"), "segmentation": coco_rle(crop, height, width), **record}
        f.write((", " if i else "").encode() + json.dumps(annotation, default=_plain).encode())
    f.write(b"]}")


def write_coco(
    path: str | os.PathLike,
    masks: Sequence[MaskCrop],
    height: int,
    width: int,
    *,
    file_name: str,
    geo: Optional[GeoInfo] = None,
) -> None:
    """Write the COCO RLE JSON of `masks` (mask i has id i + 1), atomically.

    Args:
        path: the .json to write.
        masks: the masks in id order, crops in whole-image pixels.
        height, width: the image size.
        file_name: the image's name, as the run names it.
        geo: the image's georeferencing, recorded in "image" when given.
    """
    write_atomic(Path(path), lambda f: save_coco(f, masks, height, width, file_name=file_name, geo=geo))


def _plain(value: Any) -> Any:
    """numpy scalars and arrays in records as JSON numbers and lists."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} in a mask record is not JSON serialisable")
