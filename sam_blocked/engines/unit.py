"""The unit of work on one image: read it, segment it, write its outputs. The same in every engine.

`segment_image(segmenter, job, outputs, log)` is what the local engine calls for each image
and what a Ray worker calls for each image it is sent (sam_blocked.engines). Its inputs are
a `Job` (a path, a name, prompt sets: never pixels), the model side built once per process
(`Segmenter`) and the outputs to write; it returns the image's summary entry, with a
`reason` when the image failed: a bad image fails alone.

Images written as huge images are (label TIFF, COCO RLE, table) are cut in three so that
another engine can spread their tiles over workers: `plan_huge` (open, check, plan the
tiles) and `finish_huge` (write) where the outputs are written, `whole_crops` / `tile_crops`
where the model is. The local engine runs the three in a row (`segment_image`).
"""

from __future__ import annotations

import dataclasses
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import numpy as np
import torch
from segment_anything import SamPredictor
from segment_anything.modeling import Sam

from sam_blocked.errors import InputError, SettingError, spell
from sam_blocked.inputs.images import ImageItem
from sam_blocked.automatic.batch import POST_BYTES_PER_PIXEL
from sam_blocked.automatic.generator import BlockedMaskGenerator, decoder_budget_mb
from sam_blocked.masks import auto_masks, prompt_masks
from sam_blocked.memory.measure import available_bytes, peak_bytes, reset_peak_memory
from sam_blocked.engines.options import SegmentOptions
from sam_blocked.outputs.images import ImageOutputs
from sam_blocked.outputs.writer import OutputWriter
from sam_blocked.inputs.prompts import Prompt, check_prompts
from sam_blocked.summary import LOG_NAME
from sam_blocked.tiles.crops import MaskCrop
from sam_blocked.inputs.geo import GeoInfo
from sam_blocked.outputs.frame import Frame
from sam_blocked.outputs.huge import HugeImageOutputs, default_tiled_formats
from sam_blocked.tiles.plan import TileTask
from sam_blocked.inputs.base import ImageSource, scale_record
from sam_blocked.inputs.sources import open_image, read_whole
from sam_blocked.tiles.loop import plan_tiles, run_tiles
from sam_blocked.tiles.tile import DecodeSettings, crop_of_mask, segment_tile

Log = Callable[..., None]
OnTile = Callable[[int, int], None]


@dataclass(frozen=True)
class Job:
    """One image to segment, as it crosses to a worker: where it is and its prompt sets, no pixels.

    Args:
        position: its index in the run's list of images (the summary keeps that order).
        item: the image; a worker in another process needs an absolute path.
        prompts: its prompt sets (prompt mode); () in automatic mode.
    """

    position: int
    item: ImageItem
    prompts: tuple[Prompt, ...] = ()


class Segmenter:
    """The model side of the work, built once per process: a SamPredictor (prompt mode) or a
    SamAutomaticMaskGenerator (automatic masks: sam_blocked.automatic's BlockedMaskGenerator, the
    same records in bounded memory) on `sam`, with the run's options.

    Args:
        sam: the model (patched or not), on its device and in its dtype.
        options: the run's options; with a tiling, the tile must be the model's input size.
        prompt_mode: prompt sets (SamPredictor), else automatic masks.
    """

    def __init__(self, sam: Sam, options: SegmentOptions, prompt_mode: bool) -> None:
        if options.tiling is not None and sam.image_encoder.img_size != options.tiling.tile:
            raise SettingError(
                f"{{tile}} {options.tiling.tile} must be the model's input size ({sam.image_encoder.img_size} px), so pixels "
                f"go in at scale 1: set_image_size(sam, {options.tiling.tile}) first",
                "tile",
            )
        self.options = options
        self.prompt_mode = prompt_mode
        self.engine: Any = SamPredictor(sam) if prompt_mode else BlockedMaskGenerator(sam, output_mode="coco_rle", max_block_mb=decoder_budget_mb(sam), **options.amg)
        self.predictor: SamPredictor = self.engine if prompt_mode else self.engine.predictor
        self.decode = DecodeSettings.from_amg(options.amg, options.multimask)
        self.device = next(sam.parameters()).device


def make_outputs(output: Path, item: ImageItem, options: SegmentOptions, token: Optional[str] = None) -> OutputWriter:
    """The outputs of one image: HugeImageOutputs when written as huge images are, else
    ImageOutputs (staged under .NAME.partial.<token> names when a token is given)."""
    if options.huge_outputs:
        formats, notes = default_tiled_formats(item.path) if options.per_input_formats else (options.formats, [])
        outputs = HugeImageOutputs(output, item, formats, simplify=options.simplify, labels_into_input=options.labels_into_input)
        outputs.notes = notes
        return outputs
    return ImageOutputs(output, item, options.formats, options.overlay, token=token)


def segment_image(
    segmenter: Segmenter, job: Job, outputs: OutputWriter, log: Log, on_tile: Optional[OnTile] = None, names: Optional[Mapping[str, str]] = None
) -> dict[str, Any]:
    """Read, segment and write one image; never raises for a bad image.

    Args:
        segmenter: the model side (Segmenter).
        job: the image and its prompt sets.
        outputs: from make_outputs; written atomically, nothing partial left on failure
            but for the caller's clean().
        log: takes a line for the run log (a traceback when the failure is a bug).
        on_tile: called with (tiles done, tiles to do) after each tile of a tiled image.
        names: how the front end spells the settings a failure reason names (RunContext.names).

    Returns:
        Its summary entry: image, masks, height, width, scale (level, downsample, mpp: the
        frame of its pixels and masks), notes, seconds, peak_memory_bytes (and tiles,
        encoder_passes, truncated for huge images), or image and reason.
    """
    started = time.perf_counter()
    try:
        peak = reset_peak_memory(segmenter.device)
        body = _segment_huge if segmenter.options.huge_outputs else _segment_whole
        entry = body(segmenter, job, outputs, on_tile)
        return {
            "image": job.item.name,
            **entry,
            "seconds": round(time.perf_counter() - started, 3),
            "peak_memory_bytes": peak_bytes(segmenter.device) if peak else None,
        }
    except Exception as error:
        return {"image": job.item.name, "reason": failure_reason(error, job.item.name, segmenter.device, segmenter.options, log, names)}


def failure_reason(
    error: Exception, name: str, device: torch.device, options: SegmentOptions, log: Log, names: Optional[Mapping[str, str]] = None
) -> str:
    """Why an image failed, for its summary entry: bad input, out of memory, cannot write, or a
    bug (its traceback then goes to `log`). Call it inside the `except` that caught `error`.
    The settings a reason names are spelled as `names` has them (RunContext.names)."""
    if isinstance(error, InputError):
        return spell(error, names)
    if isinstance(error, (torch.cuda.OutOfMemoryError, MemoryError)):
        if device.type == "cuda":
            torch.cuda.empty_cache()
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        smaller = ", a smaller {tile}" if options.tiling is not None else ""
        hint = InputError(
            f"out of memory on {device} ({first}): try {{dtype}} bfloat16, a smaller {{max_block_mb}}{smaller}, "
            "a smaller {points_per_batch} ({auto}), or another {device}",
            "dtype", "max_block_mb", "tile", "points_per_batch", "auto", "device",
        )  # fmt: skip
        return spell(hint, names)
    if isinstance(error, OSError):  # reading raises InputError: this is writing
        return f"cannot write its outputs ({error})"
    log(f"traceback for {name}:\n{traceback.format_exc()}")  # a bug, not bad input: keep the traceback, go on
    return f"internal error ({type(error).__name__}: {error}); traceback in {LOG_NAME}"


def _segment_whole(segmenter: Segmenter, job: Job, outputs: ImageOutputs, on_tile: Optional[OnTile]) -> dict[str, Any]:
    """One encoder pass over the whole image; (H, W) masks written one at a time (png, coco)."""
    image, notes, scale = read_whole(job.item.path, segmenter.options.max_pixels, segmenter.options.read)
    height, width = image.shape[:2]
    check_prompts(job.prompts, height, width)
    outputs.check(height, width)
    if not segmenter.prompt_mode:
        check_auto_batch(segmenter.engine.points_per_batch, height, width, segmenter.device)
    outputs.begin(job.item, image, job.prompts)
    for record, mask in whole_image_masks(segmenter, image, job.prompts):
        outputs.add(record, mask)
    outputs.commit()
    return {"masks": len(outputs.records), "height": height, "width": width, "scale": scale, "notes": notes}


def _segment_huge(segmenter: Segmenter, job: Job, outputs: HugeImageOutputs, on_tile: Optional[OnTile]) -> dict[str, Any]:
    """plan_huge, the crops (whole, or tile by tile and stitched), finish_huge: all in this process.
    A TIFF is read window by window (sam_blocked.inputs.sources); no (H, W) array is made."""
    with open_image(job.item.path, segmenter.options.max_pixels, segmenter.options.read) as source:
        huge = plan_huge(source, job, segmenter.options, outputs, segmenter.prompt_mode)
        if huge.tasks is None:
            masks = whole_crops(segmenter, source, job.prompts)
        else:
            masks = run_tiles(huge.tasks, lambda task: tile_crops(segmenter, source, task), segmenter.prompt_mode, segmenter.decode, on_tile)
        return finish_huge(huge, masks, outputs)


@dataclass
class HugeImage:
    """An image to be written as huge images are, opened, checked and planned.

    Args:
        height, width: its size.
        notes: what was converted on reading (the source's notes).
        geo: its georeferencing, for the outputs.
        tasks: its tiles' work (TileTask), or None when it goes in one pass, whole.
        tiles: tiles in its grid (1 when whole).
        scale: the frame of its pixels (ImageSource.scale: level, downsample, mpp).
    """

    height: int
    width: int
    notes: list[str]
    geo: Optional[GeoInfo]
    tasks: Optional[list[TileTask]]
    tiles: int
    scale: dict = dataclasses.field(default_factory=scale_record)


def plan_huge(source: ImageSource, job: Job, options: SegmentOptions, outputs: HugeImageOutputs, prompt_mode: bool) -> HugeImage:
    """Check the image against the options, its prompts and formats, and plan its tiles
    (prompt mode: the tiles its prompt sets need; else every tile owning grid points).

    Raises:
        InputError: too many pixels without a tiling, a prompt outside the image or too
            large for a tile, formats that do not fit its size.
    """
    height, width, tiling = source.height, source.width, options.tiling
    if tiling is None and height * width > options.max_pixels:  # open_image reads TIFFs whatever their size
        raise InputError(
            f"{width} x {height} = {width * height:,} pixels is above {{max_pixels}} {options.max_pixels:,}: "
            "segment it tile by tile with {tile}, or raise {max_pixels}",
            "max_pixels", "tile",
        )  # fmt: skip
    check_prompts(job.prompts, height, width)
    outputs.check(height, width)
    notes = list(source.notes) + list(getattr(outputs, "notes", []))
    if tiling is None or tiling.fits(height, width):
        return HugeImage(height, width, notes, source.geo, None, 1, source.scale)
    tasks = plan_tiles(tiling, height, width, job.prompts if prompt_mode else None, options.amg.get("points_per_side", 32))
    return HugeImage(height, width, notes, source.geo, tasks, len(tiling.boxes(height, width)), source.scale)


def whole_crops(segmenter: Segmenter, source: ImageSource, prompts: Sequence[Prompt]) -> list[MaskCrop]:
    """The masks of an image that goes in one encoder pass, as crops of their boxes."""
    height, width = source.height, source.width
    if not segmenter.prompt_mode:
        check_auto_batch(segmenter.engine.points_per_batch, height, width, segmenter.device)
    image = source.read((0, 0, width, height))  # (H, W, 3)
    return [crop_of_mask(mask, record) for record, mask in whole_image_masks(segmenter, image, prompts)]


def tile_crops(segmenter: Segmenter, source: ImageSource, task: TileTask) -> list[MaskCrop]:
    """One tile's masks (segment_tile: encoded once, its prompt sets or grid points decoded)."""
    if not segmenter.prompt_mode:
        height, width = task.image_size
        tile = segmenter.options.tiling.tile
        check_auto_batch(segmenter.engine.points_per_batch, min(height, tile), min(width, tile), segmenter.device)
    return segment_tile(segmenter.predictor, source, task, segmenter.decode)


def finish_huge(huge: HugeImage, masks: Sequence[MaskCrop], outputs: HugeImageOutputs) -> dict[str, Any]:
    """Write the image's outputs (atomically) and return its summary entry's counts."""
    outputs.commit(masks, huge.height, huge.width, geo=huge.geo, frame=Frame.of(huge.scale))
    truncated = sum(bool(m.record.get("truncated")) for m in masks)
    passes = 1 if huge.tasks is None else len(huge.tasks)
    return {
        "masks": len(masks),
        "truncated": truncated,
        "height": huge.height,
        "width": huge.width,
        "tiles": huge.tiles,
        "encoder_passes": passes,
        "scale": dict(huge.scale),
        "notes": list(huge.notes),
    }


def whole_image_masks(segmenter: Segmenter, image: np.ndarray, prompts: Sequence[Prompt]) -> Iterator[tuple[dict, np.ndarray]]:
    """(record, (H, W) mask) pairs from one encoder pass over the whole (H, W, 3) image."""
    if segmenter.prompt_mode:
        segmenter.predictor.set_image(image)  # the one encoder pass
        try:
            yield from prompt_masks(segmenter.predictor, list(prompts), segmenter.options.multimask)
        finally:
            segmenter.predictor.reset_image()
    else:
        yield from auto_masks(segmenter.engine, image)


def check_auto_batch(points_per_batch: int, height: int, width: int, device: torch.device) -> None:
    """Refuse an automatic-mask run whose smallest step cannot fit: BlockedMaskGenerator
    post-processes a few masks at a time, but even one needs about POST_BYTES_PER_PIXEL
    bytes a pixel at the full image size (float32 logits twice, comparisons, the bool mask).
    On the CPU the kernel would kill the whole run; a message for this image is better.
    points_per_batch no longer matters: points are decoded a chunk at a time within max_block_mb."""
    per_mask = POST_BYTES_PER_PIXEL * height * width
    available = available_bytes(device)
    if available is None or per_mask <= available:
        return
    raise InputError(
        f"{{auto}} post-processes each mask at the full {width} x {height} size, ~{per_mask / 2**30:.1f} GiB, but "
        f"{available / 2**30:.1f} GiB is free on {device}: use {{tile}} so masks stay tile-sized, or more memory",
        "auto", "tile",
    )
