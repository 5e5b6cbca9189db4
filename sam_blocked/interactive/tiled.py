"""Interactive segmentation of an image larger than the model's input: the tile around the prompts.

The web demo's tiled path, without Gradio. Such an image is segmented at native resolution,
tile by tile, with sam_blocked.tiles' own pieces: the prompts go to the tile that holds
them with the largest margin, or to one centred on them (tiles.plan.plan_prompts); that
tile is encoded once (interactive.encode: patched, its memory measured) and kept in a
`TileCache`, so further clicks in it only run the decoder; its three candidate masks come
back as MaskCrops in whole-image pixels (tiles.work.prompt_crops). "Segment everything" is
tiles.tiled.segment_tiled. The image is shown as a `Preview`: clicks map back to full
resolution, masks are drawn reduced, and the full-resolution mask is pasted only to be saved.

Memory per session, bounded: the image decoded whole (at most the demo's pixel cap x 3
bytes: 453 MiB at 12288 x 12288), its preview (at most PREVIEW_SIDE px a side), the kept
tile embeddings (TILE_CACHE_BYTES, the newest always kept: 4 MiB each at 1024 px), three
candidate crops of at most a tile each, and, while a mask is saved, one (H, W) uint8 array.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Hashable, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw
from segment_anything import SamPredictor
from segment_anything.modeling import Sam

from sam_blocked.inputs.images import InputError
from sam_blocked.interactive.whole import Embedding, MemoryReport, Prompts, encode, predictor_for, render_overlay
from sam_blocked.memory.measure import MIB
from sam_blocked.patch import patched
from sam_blocked.inputs.prompts import Prompt
from sam_blocked.tiles.crops import MaskCrop
from sam_blocked.outputs.labels import write_label_tiff
from sam_blocked.tiles.plan import TileTask, Tiling, plan_prompts, prompt_extent, tile_to_hold
from sam_blocked.tiles.loop import TiledResult, segment_tiled
from sam_blocked.tiles.tile import DecodeSettings, prompt_crops, read_tile

# 12288 x 12288 (151 M pixels, 453 MiB decoded): under 2 x PIL's bomb limit, above which Gradio's upload
# refuses an image before the demo sees it.
MAX_TILED_PIXELS = 12288 * 12288
PREVIEW_SIDE = 1536  # the longest side of the reduced image the user clicks on
TILE_CACHE_BYTES = 256 * MIB  # tile embeddings kept per session (the newest always)
TILE_COLOR = (255, 0, 200)


# ---------------------------------------------------------------------------- the preview


@dataclass(frozen=True)
class Preview:
    """A reduced copy of a large image for display: preview pixel (i, j) of an (h, w) preview covers
    full rows i * H // h .. (i + 1) * H // h - 1 and columns likewise (at least one each).

    Args:
        image: (h, w, 3) uint8, the reduced image (the image itself when it is small).
        full_size: (H, W) of the full-resolution image.
    """

    image: np.ndarray
    full_size: tuple[int, int]

    @classmethod
    def of(cls, image: np.ndarray, max_side: int = PREVIEW_SIDE, low: Optional[np.ndarray] = None) -> "Preview":
        """`image` (H, W, 3) reduced by area averaging so that its longest side is at most `max_side`.

        Args:
            image: the full-resolution image, or anything with its `.shape` (an ImageSource read
                window by window) when `low` is given.
            low: (h, w, 3) the same image at a lower resolution (a pyramid level,
                sam_blocked.inputs.sources.overview), resized to the preview instead of `image`.
        """
        height, width = image.shape[:2]
        factor = max(1.0, max(height, width) / max_side)
        size = (max(1, round(width / factor)), max(1, round(height / factor)))  # PIL's (w, h)
        pixels = image if low is None else low
        same = pixels.shape[1] == size[0] and pixels.shape[0] == size[1]
        reduced = pixels if same else np.asarray(Image.fromarray(pixels).resize(size, Image.Resampling.BOX))
        return cls(reduced, (height, width))

    @property
    def scale(self) -> tuple[float, float]:
        """(sx, sy): full-resolution pixels per preview pixel along x and y."""
        return self.full_size[1] / self.image.shape[1], self.full_size[0] / self.image.shape[0]

    def to_full(self, x: float, y: float) -> tuple[float, float]:
        """A click at preview pixel (x, y) in full-resolution pixels: the middle of the pixels it covers
        (pixel indices as the untiled demo takes them: (x, y) itself when nothing is reduced)."""
        (h, w), (height, width) = self.image.shape[:2], self.full_size
        i, j = min(max(int(y), 0), h - 1), min(max(int(x), 0), w - 1)
        return (j * width // w + (j + 1) * width // w - 1) / 2, (i * height // h + (i + 1) * height // h - 1) / 2

    def prompts(self, prompts: Prompts) -> Prompts:
        """`prompts` in preview pixels, for drawing."""
        sx, sy = self.scale
        point = lambda x, y: ((x + 0.5) / sx - 0.5, (y + 0.5) / sy - 0.5)  # noqa: E731
        box = None if prompts.box is None else (prompts.box[0] / sx, prompts.box[1] / sy, prompts.box[2] / sx, prompts.box[3] / sy)
        corner = None if prompts.corner is None else point(*prompts.corner)
        return Prompts(tuple(point(x, y) for x, y in prompts.points), prompts.labels, box, corner)

    def mask(self, crop: MaskCrop) -> np.ndarray:
        """The crop's mask in preview pixels, (h, w) bool: a preview pixel is set when any full pixel it covers is."""
        h, w = self.image.shape[:2]
        out = np.zeros((h, w), bool)
        rows, cols = _cover(crop.y0, crop.box[3], h, self.full_size[0]), _cover(crop.x0, crop.box[2], w, self.full_size[1])
        if rows is None or cols is None or not crop.mask.any():
            return out
        (r0, r1, row_starts), (c0, c1, col_starts) = rows, cols
        pooled = np.logical_or.reduceat(crop.mask, row_starts, axis=0)  # (r1 - r0, crop w)
        out[r0:r1, c0:c1] = np.logical_or.reduceat(pooled, col_starts, axis=1)  # (r1 - r0, c1 - c0)
        return out

    def box(self, box: Sequence[float]) -> tuple[float, float, float, float]:
        """A whole-image box (x0, y0, x1, y1) in preview pixels."""
        sx, sy = self.scale
        return box[0] / sx, box[1] / sy, box[2] / sx, box[3] / sy


def _cover(lo: int, hi: int, n: int, full: int) -> Optional[tuple[int, int, np.ndarray]]:
    """Of n preview cells over `full` pixels, the cells r0..r1-1 meeting pixels [lo, hi), and where each starts inside [lo, hi)."""
    if hi <= lo:
        return None
    edges = np.arange(n + 1, dtype=np.int64) * full // n  # (n+1,): cell i covers [edges[i], edges[i+1])
    r0 = int(np.searchsorted(edges, lo, side="right")) - 1
    r1 = int(np.searchsorted(edges, hi, side="left"))
    return r0, r1, np.clip(edges[r0:r1], lo, hi) - lo


def render_tile(preview: Preview, crop: Optional[MaskCrop], prompts: Prompts, tile: Optional[Sequence[int]]) -> np.ndarray:
    """The preview with the mask tinted, the prompts drawn, and the tile's outline."""
    canvas = render_overlay(preview.image, None if crop is None else preview.mask(crop), preview.prompts(prompts))
    if tile is None:
        return canvas
    out = Image.fromarray(canvas)
    x0, y0, x1, y1 = preview.box(tile)
    width = max(2, round(max(preview.image.shape[:2]) / 400))
    ImageDraw.Draw(out).rectangle((x0, y0, x1 - 1, y1 - 1), outline=TILE_COLOR, width=width)
    return np.asarray(out)


def render_crops(preview: Preview, crops: Sequence[MaskCrop]) -> np.ndarray:
    """The preview with every mask tinted in its own colour, smaller masks on top (interactive.render_everything's colours)."""
    out = preview.image.astype(np.float32)
    colors = np.random.default_rng(0).integers(40, 256, size=(len(crops), 3))
    for crop, color in zip(sorted(crops, key=lambda c: -int(np.count_nonzero(c.mask))), colors):
        m = preview.mask(crop)
        out[m] = 0.45 * out[m] + 0.55 * color
    return out.astype(np.uint8)


def preview_labels(preview: Preview, crops: Sequence[MaskCrop]) -> Image.Image:
    """The label image in preview pixels (ids as tiles.labels paints them: smaller masks on top); 8-bit up to 255 masks."""
    labels = np.zeros(preview.image.shape[:2], np.uint8 if len(crops) < 256 else np.uint16)
    areas = [int(np.count_nonzero(c.mask)) for c in crops]
    for i in sorted(range(len(crops)), key=lambda i: -areas[i]):
        labels[preview.mask(crops[i])] = i + 1
    return Image.fromarray(labels)


# ---------------------------------------------------------------------------- one tile per prompt set


class TileCache:
    """Tile embeddings of one session, newest last, up to `max_bytes` in all (the newest is always kept).

    Keys name the tile box and everything the encode depended on (model, blocking).
    """

    def __init__(self, max_bytes: int = TILE_CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self.entries: OrderedDict[Hashable, tuple[Embedding, MemoryReport]] = OrderedDict()

    def get(self, key: Hashable) -> Optional[tuple[Embedding, MemoryReport]]:
        entry = self.entries.get(key)
        if entry is not None:
            self.entries.move_to_end(key)
        return entry

    def put(self, key: Hashable, entry: tuple[Embedding, MemoryReport]) -> None:
        self.entries[key] = entry
        self.entries.move_to_end(key)
        while len(self.entries) > 1 and self.nbytes > self.max_bytes:
            self.entries.popitem(last=False)

    @property
    def nbytes(self) -> int:
        return sum(e.features.numel() * e.features.element_size() for e, _ in self.entries.values())


def as_prompt(prompts: Prompts) -> Prompt:
    """The demo's prompts as one library prompt set."""
    foreground = tuple(p for p, label in zip(prompts.points, prompts.labels) if label == 1)
    background = tuple(p for p, label in zip(prompts.points, prompts.labels) if label == 0)
    return Prompt("click", foreground, background, prompts.box)


def tile_for_prompts(prompts: Prompts, size: tuple[int, int], tiling: Tiling) -> TileTask:
    """The tile to encode for the clicked `prompts` (plan_prompts: the grid tile holding them with the largest margin, else one centred on them).

    Raises:
        ValueError: the prompts span more than a tile, saying what to do.
    """
    prompt = as_prompt(prompts)
    try:
        (task,) = plan_prompts(tiling, *size, [prompt])
    except InputError:
        x0, y0, x1, y1 = prompt_extent(prompt)
        what = "the box" if prompts.box is not None and not prompts.points else "these prompts"
        raise ValueError(
            f"{what} span {x1 - x0:g} x {y1 - y0:g} px, more than one {tiling.tile} px tile (the model's input size) holds: "
            f"undo the last click and prompt within one tile, or raise the input size under Settings to {tile_to_hold((x0, y0, x1, y1))} or more"
        ) from None
    return task


@dataclass
class TileMasks:
    """What a prompt set gave on its tile.

    Args:
        task: the tile (box, index) and the prompt set in whole-image pixels.
        crops: three candidate masks as MaskCrops (mask_index 0-2, predicted_iou, truncated).
        report: the memory report of the tile's encode.
        encoded: whether the tile was encoded now (False: its kept embedding was reused).
    """

    task: TileTask
    crops: list[MaskCrop]
    report: MemoryReport
    encoded: bool

    @property
    def scores(self) -> np.ndarray:
        return np.array([c.record["predicted_iou"] for c in self.crops])


def segment_in_tile(
    sam: Sam,
    image: np.ndarray,
    prompts: Prompts,
    tiling: Tiling,
    cache: TileCache,
    settings_key: Hashable,
    *,
    chunks: int,
    max_block_mb: Optional[float],
    stock_limit_bytes: Optional[int],
    backend: str = "auto",
) -> TileMasks:
    """Find the tile for `prompts` (tile_for_prompts), encode it unless `cache` holds it, and decode three candidates there.

    Args:
        sam: a stock model whose input size is tiling.tile (patched for the encode only).
        image: (H, W, 3) uint8, the whole image.
        prompts: in whole-image pixels.
        cache: the session's kept tile embeddings; the key is (tile box, settings_key).
        settings_key: what the encode depends on besides the tile (model settings, blocking).
        chunks, max_block_mb, stock_limit_bytes, backend: as interactive.encode.
    """
    task = tile_for_prompts(prompts, image.shape[:2], tiling)
    key = (task.box, settings_key)
    entry = cache.get(key)
    encoded = entry is None
    if entry is None:
        entry = encode(sam, read_tile(image, task.box), chunks=chunks, max_block_mb=max_block_mb, backend=backend, stock_limit_bytes=stock_limit_bytes)
        cache.put(key, entry)
    embedding, report = entry
    crops = prompt_crops(predictor_for(sam, embedding), task, multimask=True)
    return TileMasks(task, crops, report, encoded)


def segment_everything_tiled(
    sam: Sam,
    image: np.ndarray,
    tiling: Tiling,
    *,
    chunks: int,
    max_block_mb: Optional[float],
    points_per_side: int,
    pred_iou_thresh: float,
    stability_score_thresh: float,
    progress: Optional[Callable[[float, str], None]] = None,
    backend: str = "auto",
) -> TiledResult:
    """Automatic masks over the whole image, tile by tile (tiles.tiled.segment_tiled), the encoder patched.

    points_per_side is per tile (SAM's density on each tile); progress gets (fraction, text) per tile.
    """
    height, width = image.shape[:2]
    total = len(tiling.boxes(height, width))
    settings = DecodeSettings(pred_iou_thresh=pred_iou_thresh, stability_score_thresh=stability_score_thresh)
    if progress is not None:
        progress(0.0, f"tile 1 / {total}: encoding")
    on_tile = None if progress is None else (lambda done, n: progress(done / n, f"tile {done} / {n} done"))
    with patched(sam, chunks, max_block_mb, backend):
        return segment_tiled(SamPredictor(sam), image, height, width, tiling, points_per_side=points_per_side, settings=settings, on_tile=on_tile)


def tiles_of(size: tuple[int, int], tiling: Tiling) -> int:
    """How many tiles cover an image of `size` (H, W)."""
    return len(tiling.boxes(*size))


# ---------------------------------------------------------------------------- saving at full resolution


def full_mask(crop: MaskCrop, size: tuple[int, int]) -> np.ndarray:
    """The crop pasted into an (H, W) bool array of the image's `size`."""
    full = np.zeros(size, bool)  # (H, W)
    x0, y0, x1, y1 = crop.box
    full[y0:y1, x0:x1] = crop.mask
    return full


def save_mask_png(crop: MaskCrop, size: tuple[int, int], path: str | Path) -> Path:
    """The mask at full image size as a 0/255 8-bit PNG, as the untiled demo saves it (one (H, W) array while writing)."""
    Image.fromarray(full_mask(crop, size).view(np.uint8) * np.uint8(255)).save(path, format="PNG", compress_level=1)
    return Path(path)


def save_labels_tiff(crops: Sequence[MaskCrop], size: tuple[int, int], path: str | Path) -> Path:
    """The automatic masks as the batch run's label image: uint32 tiled TIFF, id i + 1 = mask i (tiles.labels)."""
    write_label_tiff(path, crops, *size)
    return Path(path)
