"""Interactive segmentation on a kept embedding, and the memory of the encode that made it.

SamPredictor and SamAutomaticMaskGenerator unchanged underneath: `encode` runs the
encoder once (patched, measuring its peak memory beside stock's), `predict` decodes masks
for prompts from the kept `Embedding` without touching the encoder again, and
`segment_everything` runs the automatic generator on it. Plus reading images with size
caps (segment.read_image underneath), checking prompts, and drawing masks. No Gradio here: the web demo (`demo.py`)
and scripts use the same functions.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from PIL import Image, ImageDraw
from segment_anything import SamPredictor
from segment_anything.modeling import Sam

from sam_blocked.automatic.generator import BlockedMaskGenerator, decoder_budget_mb
from sam_blocked.attention.common import DEFAULT_CHUNKS
from sam_blocked.memory.measure import MIB, available_bytes, format_bytes, measure_peak
from sam_blocked.memory.planner import planned_encoder_bytes
from sam_blocked.patch import patched, stock
from sam_blocked.inputs.images import InputError, read_image

MAX_PIXELS = 4096 * 4096  # images encoded whole: three candidate masks at full size per click
MAX_UPLOAD_MB = 200.0  # the transfer; what an image costs in memory is bounded by the pixel caps
MASK_COLOR = np.array([30, 144, 255], dtype=np.float32)
POINT_COLORS = {1: (0, 200, 70), 0: (230, 40, 40)}
BOX_COLOR = (255, 200, 0)


# ---------------------------------------------------------------------------- images and prompts


def load_image(path: str | os.PathLike, max_pixels: int = MAX_PIXELS, max_upload_mb: float = MAX_UPLOAD_MB) -> tuple[np.ndarray, list[str]]:
    """Read an image file as (H, W, 3) uint8 RGB: segment.read_image behind a file-size cap.

    Args:
        path: an image file (anything Pillow reads; EXIF orientation applied, frame 0).
        max_pixels: refuse images with more pixels than this (checked before decoding).
        max_upload_mb: refuse files larger than this many MiB.

    Returns:
        (image, notes): notes say what was converted (mode, orientation, frames).

    Raises:
        InputError: the file is too large, unreadable or not an image; the refusal of a
            large image names the setting max_pixels, for the front end to spell.
    """
    name = Path(path).name
    size = os.path.getsize(path)
    if size > max_upload_mb * MIB:
        raise ValueError(f"{name} is {size / MIB:.1f} MiB, over the {max_upload_mb:g} MiB upload limit: send a smaller file")
    try:
        return read_image(path, max_pixels)
    except InputError as error:
        raise InputError(f"{name}: {error.template}", *error.settings) from None


@dataclass(frozen=True)
class Prompts:
    """Prompts in image pixels: points (x, y) with labels 1 (foreground) / 0 (background), one box."""

    points: tuple[tuple[float, float], ...] = ()
    labels: tuple[int, ...] = ()
    box: Optional[tuple[float, float, float, float]] = None  # x0, y0, x1, y1
    corner: Optional[tuple[float, float]] = None  # first click of a box not yet closed

    @property
    def empty(self) -> bool:
        return not self.points and self.box is None


def check_clicks(prompts: Prompts, size: tuple[int, int]) -> Prompts:
    """Refuse clicked points or a box outside an image of `size` (H, W); returns `prompts`.
    (A batch run's prompt sets are checked by sam_blocked.inputs.prompts.check_prompts.)"""
    h, w = size
    for x, y in prompts.points:
        if not (0 <= x < w and 0 <= y < h):
            raise ValueError(f"point ({x:g}, {y:g}) lies outside the {w} x {h} image: x must be in [0, {w}), y in [0, {h})")
    if prompts.box is not None:
        x0, y0, x1, y1 = prompts.box
        if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
            raise ValueError(
                f"box {list(prompts.box)} is not x0 < x1, y0 < y1 inside the {w} x {h} image: "
                "give [x0, y0, x1, y1] with the top-left corner first"
            )
    return prompts


def parse_prompts(text: str, size: tuple[int, int]) -> tuple[Prompts, Optional[int]]:
    """Read the API's JSON prompts: {"points": [[x, y], ...], "labels": [1, 0, ...], "box": [x0, y0, x1, y1],
    "mask_index": 0-2}. Labels default to 1; returns (prompts, mask_index or None for the best)."""
    try:
        data = json.loads(text or "{}")
    except json.JSONDecodeError as error:
        raise ValueError(f"prompts are not valid JSON ({error}): send e.g. {{\"points\": [[120, 80]], \"labels\": [1]}}") from None
    if not isinstance(data, dict):
        raise ValueError('prompts must be a JSON object with "points", "labels", "box" and/or "mask_index"')
    unknown = sorted(set(data) - {"points", "labels", "box", "mask_index"})
    if unknown:
        raise ValueError(f"unknown prompt keys {unknown}: use points, labels, box, mask_index")
    points = data.get("points") or []
    if not isinstance(points, list) or not all(_numbers(p, 2) for p in points):
        raise ValueError(f"points must be a list of [x, y] pixel pairs, got {points!r}")
    labels = data.get("labels", [1] * len(points))
    if not isinstance(labels, list) or len(labels) != len(points) or any(label not in (0, 1) for label in labels):
        raise ValueError(f"labels must list one 1 (foreground) or 0 (background) per point, got {labels!r} for {len(points)} points")
    box = data.get("box")
    if box is not None and not _numbers(box, 4):
        raise ValueError(f"box must be [x0, y0, x1, y1] in pixels, got {box!r}")
    index = data.get("mask_index")
    if index is not None and index not in (0, 1, 2):
        raise ValueError(f"mask_index must be 0, 1 or 2 (or left out for the best-scoring mask), got {index!r}")
    prompts = Prompts(tuple((float(x), float(y)) for x, y in points), tuple(int(v) for v in labels), None if box is None else tuple(map(float, box)))
    if prompts.empty:
        raise ValueError('no prompt given: send at least one point ("points": [[x, y]]) or a "box"')
    return check_clicks(prompts, size), index


def _numbers(value: object, n: int) -> bool:
    return isinstance(value, list) and len(value) == n and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)


# ---------------------------------------------------------------------------- model calls


@dataclass(frozen=True)
class Embedding:
    """What SamPredictor.set_image leaves behind, kept so clicks only run the decoder."""

    features: torch.Tensor  # (1, 256, g, g)
    original_size: tuple[int, int]  # (H, W) of the image
    input_size: tuple[int, int]  # (h, w) after ResizeLongestSide


@dataclass(frozen=True)
class MemoryReport:
    """Peak memory of one encode (over what was in use before it), patched and stock."""

    device: str
    img_size: int
    blocking: str
    patched_bytes: int  # measured
    stock_bytes: int  # measured, or estimated when stock_measured is False
    stock_measured: bool
    stock_planned_bytes: int  # the planner's estimate of stock's encoder peak (sam-blocked plan)
    patched_planned_bytes: int  # the same, patched
    reason: str = ""  # why stock was estimated rather than run
    seconds: float = 0.0  # of the patched encode


def encode(
    sam: Sam,
    image: np.ndarray,
    *,
    chunks: int = DEFAULT_CHUNKS,
    max_block_mb: Optional[float] = None,
    stock_limit_bytes: Optional[int] = None,
    backend: str = "auto",
) -> tuple[Embedding, MemoryReport]:
    """Run the image encoder once on `image`, patched, and measure its peak memory beside stock's.

    Args:
        sam: a stock (unpatched) Sam; it is patched for the encode and restored after.
        image: (H, W, 3) uint8 RGB.
        chunks, max_block_mb, backend: the patch (see `patch_sam`); the planned figures are for it too.
        stock_limit_bytes: run stock too, on the same image, when the planner's estimate of
            its encoder peak is below this and below half the free memory; otherwise (and
            when None) stock's peak is the planner's estimate.
    """
    device = sam.device
    predictor = SamPredictor(sam)
    with patched(sam, chunks, max_block_mb, backend):
        start = time.perf_counter()
        patched_bytes = measure_peak(device, lambda: predictor.set_image(image))
        seconds = time.perf_counter() - start
    embedding = Embedding(predictor.features, predictor.original_size, predictor.input_size)

    stock_plan, patched_plan = planned_encoder_bytes(sam.image_encoder, chunks, max_block_mb, backend)
    limit = None if stock_limit_bytes is None else min(stock_limit_bytes, (available_bytes(device) or 0) // 2)  # unknown: stock is not run
    if limit is not None and stock_plan <= limit:
        with stock(sam):
            stock_bytes = measure_peak(device, lambda: SamPredictor(sam).set_image(image))
        reason = ""
    else:
        # Everything but the encoder (the image's preprocessing) is the same in both: swap the one for the other.
        stock_bytes = max(stock_plan, patched_bytes - patched_plan + stock_plan)
        reason = "stock comparison is off" if limit is None else f"stock's encoder would need {format_bytes(stock_plan)}, over the {format_bytes(limit)} allowed here"
    blocking = f"chunks {chunks}" if max_block_mb is None else f"blocks <= {max_block_mb:g} MiB"
    blocking += "" if backend == "auto" else f", {backend}"
    report = MemoryReport(str(device), sam.image_encoder.img_size, blocking, patched_bytes, stock_bytes, not reason, stock_plan, patched_plan, reason, seconds)
    return embedding, report


def predict(sam: Sam, embedding: Embedding, prompts: Prompts) -> tuple[np.ndarray, np.ndarray]:
    """Decode three candidate masks for `prompts` from a kept embedding (no encoder run).

    Returns:
        masks (3, H, W) bool and their predicted IoU scores (3,).
    """
    predictor = predictor_for(sam, embedding)
    masks, scores, _ = predictor.predict(
        point_coords=np.array(prompts.points, dtype=np.float32) if prompts.points else None,
        point_labels=np.array(prompts.labels, dtype=np.int64) if prompts.points else None,
        box=np.array(prompts.box, dtype=np.float32) if prompts.box is not None else None,
        multimask_output=True,
    )
    return masks, scores


def predictor_for(sam: Sam, embedding: Embedding) -> SamPredictor:
    """A SamPredictor on `sam` holding a kept embedding, as if set_image had just run: it decodes, never encodes."""
    predictor = SamPredictor(sam)
    _install(predictor, embedding)
    return predictor


def _install(predictor: SamPredictor, embedding: Embedding) -> None:
    predictor.features = embedding.features
    predictor.original_size = embedding.original_size
    predictor.input_size = embedding.input_size
    predictor.is_image_set = True


def segment_everything(
    sam: Sam,
    image: np.ndarray,
    embedding: Embedding,
    *,
    points_per_side: int = 32,
    pred_iou_thresh: float = 0.88,
    stability_score_thresh: float = 0.95,
    progress: Optional[Callable[[float, str], None]] = None,
) -> list[dict]:
    """SamAutomaticMaskGenerator's masks for `image`, reusing its kept `embedding`.

    The generator is sam_blocked.automatic's BlockedMaskGenerator (stock's records in bounded
    memory); on this instance only, set_image installs the embedding
    instead of encoding again (one crop: the whole image), and each decoded batch of
    points reports `progress(fraction, text)`.
    """
    if not 1 <= points_per_side <= 128:
        raise ValueError(f"points per side {points_per_side} must be between 1 and 128")
    generator = BlockedMaskGenerator(
        sam, max_block_mb=decoder_budget_mb(sam), points_per_side=points_per_side, pred_iou_thresh=pred_iou_thresh, stability_score_thresh=stability_score_thresh
    )
    assert hasattr(generator, "_process_batch") and generator.crop_n_layers == 0, "segment_anything's generator changed"
    predictor = generator.predictor
    encode_again = predictor.set_image

    def set_image(crop: np.ndarray, image_format: str = "RGB") -> None:
        if crop.shape[:2] == embedding.original_size:
            _install(predictor, embedding)
        else:
            encode_again(crop, image_format)

    predictor.set_image = set_image
    if progress is not None:
        total = math.ceil(points_per_side**2 / generator.points_per_batch)
        decode_batch = generator._process_batch
        done = [0]

        def counted(*args, **kwargs):
            out = decode_batch(*args, **kwargs)
            done[0] += 1
            progress(done[0] / total, f"decoding point batch {done[0]} / {total}")
            return out

        generator._process_batch = counted
        progress(0.0, f"decoding {points_per_side ** 2} points")
    return generator.generate(image)


# ---------------------------------------------------------------------------- rendering


def render_overlay(image: np.ndarray, mask: Optional[np.ndarray], prompts: Prompts) -> np.ndarray:
    """`image` (H, W, 3) uint8 with `mask` (H, W) bool tinted and the prompts drawn on it."""
    out = image.copy()
    if mask is not None:
        out[mask] = (0.45 * out[mask] + 0.55 * MASK_COLOR).astype(np.uint8)
    canvas = Image.fromarray(out)
    draw = ImageDraw.Draw(canvas)
    r = max(4, round(max(image.shape[:2]) / 120))
    if prompts.box is not None:
        draw.rectangle(prompts.box, outline=BOX_COLOR, width=max(2, r // 2))
    if prompts.corner is not None:
        x, y = prompts.corner
        draw.line([(x - 2 * r, y), (x + 2 * r, y)], fill=BOX_COLOR, width=max(2, r // 2))
        draw.line([(x, y - 2 * r), (x, y + 2 * r)], fill=BOX_COLOR, width=max(2, r // 2))
    for (x, y), label in zip(prompts.points, prompts.labels):
        draw.ellipse([x - r, y - r, x + r, y + r], fill=POINT_COLORS[label], outline=(255, 255, 255), width=max(1, r // 3))
    return np.asarray(canvas)


def render_everything(image: np.ndarray, records: list[dict]) -> np.ndarray:
    """`image` with every automatic mask tinted in its own colour, smaller masks on top."""
    out = image.astype(np.float32)
    colors = np.random.default_rng(0).integers(40, 256, size=(len(records), 3))
    for record, color in zip(sorted(records, key=lambda r: -r["area"]), colors):
        m = record["segmentation"]
        out[m] = 0.45 * out[m] + 0.55 * color
    return out.astype(np.uint8)


def mask_image(mask: np.ndarray) -> Image.Image:
    """A (H, W) bool mask as an 8-bit grey image, 255 inside: saved as PNG it is lossless."""
    return Image.fromarray(mask.astype(np.uint8) * 255)


def label_image(records: list[dict], size: tuple[int, int]) -> Image.Image:
    """Automatic masks as one label image: 0 background, i+1 for the i-th largest mask
    (smaller masks win where they overlap); 8-bit up to 255 masks, else 16-bit."""
    labels = np.zeros(size, dtype=np.uint8 if len(records) < 256 else np.uint16)
    for i, record in enumerate(sorted(records, key=lambda r: -r["area"])):
        labels[record["segmentation"]] = i + 1
    return Image.fromarray(labels)
