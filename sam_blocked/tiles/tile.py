"""The unit of work of a tiled image: encode one tile once, decode its prompts or points, return crops.

`segment_tile(predictor, source, task, settings)` is what every engine calls, here in a
loop (sam_blocked.tiles.loop) or in a worker of another process: its inputs are a
predictor, an image source and a TileTask, its output MaskCrops whose records are small,
picklable and in whole-image pixels. Pixels go in at scale 1: the tile is the model's
input size, so SamPredictor's resize is the identity and masks come back at native
resolution.

Automatic masks follow SamAutomaticMaskGenerator's per-crop steps with amg.py's own
utilities (MaskData, batch_iterator, calculate_stability_score, batched_mask_to_box,
batched_nms, remove_small_regions): predicted-IoU and stability filters, box NMS within
the tile, then small regions. A mask touching a tile edge that is not an image edge is
kept, marked `truncated` (SAM would drop it; stitching prefers a tile that sees it whole)
and ranked after whole masks in the tile's NMS.

For one prompt at a time (a click in an app): route it, encode its tile once, decode:

    (task,) = plan_prompts(tiling, height, width, [prompt])
    encode_tile(predictor, image, task.box)           # keep the predictor while the tile is in use
    crops = prompt_crops(predictor, task)             # MaskCrops at native resolution
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Protocol, Union

import numpy as np
import torch
from segment_anything import SamPredictor
from segment_anything.utils.amg import MaskData, batch_iterator, batched_mask_to_box, remove_small_regions
from torchvision.ops.boxes import batched_nms

from sam_blocked.automatic.batch import Filters, decode_steps, mask_boxes
from sam_blocked.automatic.generator import decoder_budget_mb
from sam_blocked.automatic.decoder import budget_bytes
from sam_blocked.masks import prompt_masks
from sam_blocked.inputs.prompts import Prompt
from sam_blocked.inputs.sources import open_image
from sam_blocked.tiles.crops import MaskCrop
from sam_blocked.tiles.geometry import Box, touches_inner_edge
from sam_blocked.tiles.plan import TileTask


class TileSource(Protocol):
    """What a tile is read from: an ImageSource (window by window) or anything with `read`."""

    def read(self, box: Box) -> np.ndarray: ...


Source = Union[str, os.PathLike, np.ndarray, TileSource, Any]  # Any: a zarr or dask array


@contextlib.contextmanager
def opened(source: Source) -> Iterator[Union[np.ndarray, TileSource]]:
    """A path, or a zarr / dask array, opened with sam_blocked.inputs.sources.open_image (closed on
    exit); an (H, W, 3) numpy array or a source as it is. To read an array's channels or a path's
    level, or to open it once for many tiles, pass open_image(...) instead."""
    lazy_array = not isinstance(source, np.ndarray) and not hasattr(source, "read") and hasattr(source, "shape")
    if isinstance(source, (str, os.PathLike)) or lazy_array:
        with open_image(source) as image:
            yield image
    else:
        yield source


@dataclass(frozen=True)
class DecodeSettings:
    """How a tile's masks are decoded and filtered (amg.py's names and SAM's defaults).

    Args:
        multimask: prompt mode: keep all three masks per prompt set, not SAM's best.
        points_per_batch: grid points decoded together; each wants 3 tile-sized float32 masks.
        pred_iou_thresh, stability_score_thresh, stability_score_offset, box_nms_thresh,
        min_mask_region_area: SamAutomaticMaskGenerator's filters, applied per tile.
        crop_nms_thresh: only as SAM uses it without crop layers: the NMS after small-region
            removal runs at max(box_nms_thresh, crop_nms_thresh).
    """

    multimask: bool = False
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    box_nms_thresh: float = 0.7
    crop_nms_thresh: float = 0.7
    min_mask_region_area: int = 0

    @classmethod
    def from_amg(cls, amg: Mapping[str, Any], multimask: bool = False) -> "DecodeSettings":
        """From SegmentOptions.amg; settings that are not per tile (points_per_side, crop_*) are left out."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(multimask=multimask, **{k: v for k, v in amg.items() if k in names})


def read_tile(source: Source, box: Box) -> np.ndarray:
    """(h, w, 3) uint8 RGB pixels of `box` from an image file, an in-memory image or a source with `read`."""
    x0, y0, x1, y1 = box
    with opened(source) as image:
        if isinstance(image, np.ndarray):
            return np.ascontiguousarray(image[y0:y1, x0:x1])
        return np.ascontiguousarray(image.read(box))


def encode_tile(predictor: SamPredictor, source: Source, box: Box) -> None:
    """Read the tile and run the encoder on it once; the embedding stays in `predictor`.

    The tile's long side must be the model's input size (or the whole image): pixels at scale 1.
    """
    pixels = read_tile(source, box)
    size = predictor.model.image_encoder.img_size
    if max(pixels.shape[:2]) > size:
        raise ValueError(f"tile {box} is {pixels.shape[1]} x {pixels.shape[0]} px, larger than the model's {size} px input")
    predictor.set_image(pixels)


def segment_tile(predictor: SamPredictor, source: Source, task: TileTask, settings: DecodeSettings = DecodeSettings()) -> list[MaskCrop]:
    """Encode `task`'s tile once and decode its prompt sets and grid points.

    Args:
        predictor: a SamPredictor on the model, whose input size is the tile size.
        source: the whole image: its path (what a worker in another process gets; opened
            with open_image, window by window for a TIFF), an ImageSource or an (H, W, 3) array.
        task: from plan_prompts or plan_points.
        settings: decoding and filters.

    Returns:
        MaskCrops in whole-image pixels, tight to each mask's box: prompt masks in prompt
        order, then the tile's automatic masks.
    """
    encode_tile(predictor, source, task.box)
    try:
        return prompt_crops(predictor, task, settings.multimask) + point_crops(predictor, task, settings)
    finally:
        predictor.reset_image()


def prompt_crops(predictor: SamPredictor, task: TileTask, multimask: bool = False) -> list[MaskCrop]:
    """The masks of `task.prompts` on the tile set in `predictor` (encode_tile first).

    Records as sam_blocked.masks.prompt_masks gives them, in whole-image pixels: prompt is
    the index in the image's prompt list, crop_box the tile, plus truncated and tile.
    """
    x0, y0 = task.box[:2]
    local = [_shift(prompt, -x0, -y0) for _, prompt in task.prompts]
    crops = []
    for record, mask in prompt_masks(predictor, local, multimask):  # mask: (h, w) bool, the tile
        index, prompt = task.prompts[record["prompt"]]
        record.update(
            point_coords=[list(p) for p in prompt.foreground + prompt.background],
            box=None if prompt.box is None else list(prompt.box),
            prompt=index,
        )
        crops.append(_crop(mask, record, task))
    return crops


@torch.no_grad()
def point_crops(predictor: SamPredictor, task: TileTask, settings: DecodeSettings = DecodeSettings()) -> list[MaskCrop]:
    """Automatic masks from `task.points` on the tile set in `predictor`, filtered as SAM filters a crop."""
    if len(task.points) == 0:
        return []
    x0, y0, x1, y1 = task.box
    local = np.asarray(task.points, dtype=np.float64) - [x0, y0]  # (N, 2) tile pixels
    data = MaskData()
    for (points,) in batch_iterator(settings.points_per_batch, local):
        data.cat(_decode_points(predictor, points, (y1 - y0, x1 - x0), settings))
    if len(data["iou_preds"]) == 0:
        return []
    data["truncated"] = torch.tensor([_truncated(b, task) for b in data["boxes"].tolist()], dtype=torch.bool)
    keep = batched_nms(data["boxes"].float(), _whole_first(data), torch.zeros(len(data["boxes"])), settings.box_nms_thresh)
    data.filter(keep)
    data["crops"] = [np.unpackbits(bits, count=h * w).reshape(h, w).view(bool) for bits, (h, w) in data["crops"]]
    if settings.min_mask_region_area > 0:
        _remove_small_regions(data, task, settings)
    crops = []
    for crop, box, iou, point, stability in zip(data["crops"], data["boxes"].tolist(), data["iou_preds"].tolist(), data["points"].tolist(), data["stability_score"].tolist()):
        record = {"area": int(crop.sum()), "bbox": None, "predicted_iou": iou, "point_coords": [[point[0] + x0, point[1] + y0]], "stability_score": stability}
        crops.append(_crop_from_box(crop, box, record, task))
    return crops


def _decode_points(predictor: SamPredictor, points: np.ndarray, size: tuple[int, int], settings: DecodeSettings) -> MaskData:
    """SamAutomaticMaskGenerator._process_batch on one tile, keeping each mask as the crop of its box.

    The steps are sam_blocked.automatic.batch.decode_steps': a chunk of points decoded at a
    time, the IoU filter before upsampling, a few tile-sized masks at a time."""
    filters = Filters(settings.pred_iou_thresh, settings.stability_score_thresh, settings.stability_score_offset)
    budget = budget_bytes(decoder_budget_mb(predictor.model))
    data = MaskData()
    for step in decode_steps(predictor, points, size, filters, budget):
        masks = step.pop("masks")
        keep = masks.flatten(1).any(dim=1)  # an empty mask has no box, no crop
        part = MaskData(**{key: value[keep].cpu() for key, value in step.items()})  # small; NMS and stitching run on the CPU
        masks = masks[keep]
        part["boxes"] = mask_boxes(masks).long().cpu()  # (M, 4) x0, y0, x1, y1 inclusive (zeros when M = 0)
        # Candidates wait for the tile's NMS as bits: 1/8 of a byte a pixel (3 x points_per_side**2 of them, up to tile size each).
        crops = (m[b[1] : b[3] + 1, b[0] : b[2] + 1].cpu().numpy() for m, b in zip(masks, part["boxes"].tolist()))
        part["crops"] = [(np.packbits(c), c.shape) for c in crops]
        data.cat(part)
    return data


def _whole_first(data: MaskData) -> torch.Tensor:
    """NMS scores: the predicted IoU, every truncated mask ranked below every whole one."""
    scores = data["iou_preds"].float()
    span = float(scores.max() - scores.min()) + 1.0
    return scores - span * data["truncated"].float()


def _remove_small_regions(data: MaskData, task: TileTask, settings: DecodeSettings) -> None:
    """SamAutomaticMaskGenerator.postprocess_small_regions on crops: holes and islands below
    the area removed, boxes recomputed, box NMS again preferring unchanged masks.

    A crop is padded with background on the sides where it does not reach the tile edge, so
    background around the mask is connected as it is in the whole tile."""
    h, w = task.box[3] - task.box[1], task.box[2] - task.box[0]
    unchanged = []
    for i, (crop, box) in enumerate(zip(data["crops"], data["boxes"].tolist())):
        pads = ((int(box[1] > 0), int(box[3] < h - 1)), (int(box[0] > 0), int(box[2] < w - 1)))
        padded = np.pad(crop, pads)
        mask, holes = remove_small_regions(padded, settings.min_mask_region_area, mode="holes")
        mask, islands = remove_small_regions(mask, settings.min_mask_region_area, mode="islands")
        unchanged.append(not (holes or islands))
        if holes or islands:
            mask = mask[pads[0][0] : mask.shape[0] - pads[0][1], pads[1][0] : mask.shape[1] - pads[1][1]]
            (bx0, by0, bx1, by1) = batched_mask_to_box(torch.as_tensor(mask)).tolist()
            data["crops"][i] = mask[by0 : by1 + 1, bx0 : bx1 + 1].copy()
            data["boxes"][i] = torch.tensor([box[0] + bx0, box[1] + by0, box[0] + bx1, box[1] + by1])
    data["truncated"] = torch.tensor([_truncated(b, task) for b in data["boxes"].tolist()], dtype=torch.bool)
    scores = torch.tensor(unchanged, dtype=torch.float)
    threshold = max(settings.box_nms_thresh, settings.crop_nms_thresh)
    data.filter(batched_nms(data["boxes"].float(), scores, torch.zeros(len(scores)), threshold))


def _truncated(box: list[int], task: TileTask) -> bool:
    """Whether a mask box (tile pixels, inclusive) reaches a tile edge that is not an image edge."""
    x0, y0 = task.box[:2]
    glob = (box[0] + x0, box[1] + y0, box[2] + x0 + 1, box[3] + y0 + 1)
    return touches_inner_edge(glob, task.box, *task.image_size)


def crop_of_mask(mask: np.ndarray, record: dict, x0: int = 0, y0: int = 0) -> MaskCrop:
    """A mask as the crop of its bounding box; an empty mask as one background pixel at (x0, y0).

    Args:
        mask: (h, w) bool, with mask[0, 0] at whole-image column x0, row y0.
        record: its record; copied without "segmentation" (a full-size RLE), with
            truncated (False) and tile (0) added when absent.
    """
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    record = {k: v for k, v in record.items() if k != "segmentation"}
    record.setdefault("truncated", False)
    record.setdefault("tile", 0)
    if rows.size == 0:
        return MaskCrop(np.zeros((1, 1), bool), x0, y0, record)
    top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    return MaskCrop(mask[top:bottom, left:right].copy(), x0 + int(left), y0 + int(top), record)


def _crop(mask: np.ndarray, record: dict, task: TileTask) -> MaskCrop:
    """A tile-sized mask with its prompt_masks record as a MaskCrop in whole-image pixels."""
    x0, y0 = task.box[:2]
    crop = crop_of_mask(mask, record, x0, y0)
    if record["area"]:
        (bx0, by0, bx1, by1) = crop.box
        crop.record["bbox"] = [bx0, by0, bx1 - bx0 - 1, by1 - by0 - 1]  # XYWH, amg.py's (w = inclusive x1 - x0)
    crop.record.update(crop_box=task.crop_box, truncated=bool(record["area"]) and touches_inner_edge(crop.box, task.box, *task.image_size), tile=task.index)
    return crop


def _crop_from_box(crop: np.ndarray, box: list[int], record: dict, task: TileTask) -> MaskCrop:
    """A mask already cropped to its box (tile pixels, inclusive) as a MaskCrop in whole-image pixels."""
    x0, y0 = task.box[:2]
    record = {
        **record,
        "bbox": [box[0] + x0, box[1] + y0, box[2] - box[0], box[3] - box[1]],  # XYWH, amg.py's (w = inclusive x1 - x0)
        "crop_box": task.crop_box,
        "truncated": _truncated(box, task),
        "tile": task.index,
    }
    return MaskCrop(crop, box[0] + x0, box[1] + y0, record)


def _shift(prompt: Prompt, dx: float, dy: float) -> Prompt:
    move = lambda points: tuple((x + dx, y + dy) for x, y in points)  # noqa: E731
    box = None if prompt.box is None else (prompt.box[0] + dx, prompt.box[1] + dy, prompt.box[2] + dx, prompt.box[3] + dy)
    return Prompt(prompt.name, move(prompt.foreground), move(prompt.background), box)
