"""Batch segmentation of image files with SamPredictor or SamAutomaticMaskGenerator.

The library side of `sam-blocked segment`. Given the images (sam_blocked.images) and,
in prompt mode, their prompt sets (sam_blocked.prompts), it runs SAM with one encoder
pass per image, then one mask-decoder call per prompt set, or amg.py's automatic masks,
and writes each image's outputs (sam_blocked.outputs) plus, for the run (sam_blocked.summary):

    OUT/segment-summary.json, OUT/segment.log

Outputs are either complete or absent: a rerun skips images whose outputs all exist and
redoes the rest. A bad image fails alone, with a message in the log and the summary.
The masks come from sam_blocked.masks; the options are checked in sam_blocked.options.

With a tiling (SegmentOptions.tiling), an image larger than a tile goes tile by tile at
native resolution (sam_blocked.tiles: one encoder pass per tile used, masks as crops,
stitched) and every image is written as huge images are: label TIFF, COCO RLE, table.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import numpy as np
import torch
from segment_anything import SamAutomaticMaskGenerator, SamPredictor
from segment_anything.modeling import Sam
from tqdm import tqdm

from sam_blocked.images import ImageItem, InputError, read_image
from sam_blocked.masks import auto_masks, prompt_masks
from sam_blocked.memory import peak_bytes, reset_peak
from sam_blocked.options import AMG_SETTINGS, SegmentOptions
from sam_blocked.outputs import ImageOutputs, write_atomic
from sam_blocked.prompts import Prompt, check_prompts, match_prompts
from sam_blocked.summary import LOG_NAME, SUMMARY_NAME, RunLog, RunSummary
from sam_blocked.tiles.outputs import HugeImageOutputs
from sam_blocked.tiles.source import open_image
from sam_blocked.tiles.tiled import segment_tiled
from sam_blocked.tiles.work import DecodeSettings, crop_of_mask

__all__ = ["AMG_SETTINGS", "available_bytes", "LOG_NAME", "SUMMARY_NAME", "RunSummary", "SegmentOptions", "auto_masks", "prompt_masks", "segment_images"]


def segment_images(
    sam: Sam,
    images: Sequence[ImageItem],
    output: str | os.PathLike,
    *,
    prompts: Optional[Mapping[str, list[Prompt]]] = None,
    options: Optional[SegmentOptions] = None,
    problems: Sequence[tuple[str, str]] = (),
    settings: Optional[Mapping[str, Any]] = None,
    progress: bool = True,
) -> RunSummary:
    """Segment `images` into `output`, one encoder pass per image; bad images fail alone.

    Args:
        sam: the model (patched or not), already on its device and in its dtype.
        images: from collect_images.
        output: the output folder (created).
        prompts: from load_prompts: prompt mode (SamPredictor). None: automatic masks.
        options: formats, multimask, overlay, overwrite, max_pixels, amg settings, tiling
            (whose tile must be the model's input size).
        problems: (input, reason) to record as failed, e.g. collect_images' problems.
        settings: anything to record in the summary (model, flags).
        progress: show a tqdm bar and echo failures to stderr.

    Returns:
        The RunSummary, also written to output/segment-summary.json. A KeyboardInterrupt
        removes the current image's partial files, writes the summary marked interrupted,
        and is raised again.
    """
    options = options or SegmentOptions()
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise ValueError(f"--output {output} is a file: give a folder")
    if prompts is not None and options.amg:
        raise ValueError(f"automatic-mask settings ({', '.join(options.amg)}) apply to --auto only, not to --prompts")
    if options.tiling is not None and sam.image_encoder.img_size != options.tiling.tile:
        raise ValueError(
            f"the tile ({options.tiling.tile} px) must be the model's input size ({sam.image_encoder.img_size} px), so pixels "
            f"go in at scale 1: set_image_size(sam, {options.tiling.tile}) first (the CLI's --tile does)"
        )
    matched: dict[ImageItem, list[Prompt]] = {}
    missing: list[tuple[str, str]] = []
    if prompts is not None:
        matched, missing = match_prompts(prompts, images)
        engine: Any = SamPredictor(sam)
    else:
        engine = SamAutomaticMaskGenerator(sam, output_mode="coco_rle", **options.amg)
    output.mkdir(parents=True, exist_ok=True)
    device = next(sam.parameters()).device
    mode = "auto" if prompts is None else "prompts"
    recorded = {**vars(options), "tiling": None if options.tiling is None else vars(options.tiling)}
    summary = RunSummary(output, mode, {"options": _jsonable(recorded), **_jsonable(dict(settings or {}))}, device=str(device))
    summary.images = len(images)
    log = RunLog(output / LOG_NAME, echo=progress)
    log(f"run started: {len(images)} image(s), mode {mode}, device {device}; settings {json.dumps(summary.settings)}")

    def fail(image: str, reason: str) -> None:
        summary.failed.append({"image": image, "reason": reason})
        log(f"failed {image}: {reason}", echo=True)

    for arg, reason in [*problems, *missing]:
        fail(arg, reason)

    claimed = {output / SUMMARY_NAME: "the run summary", output / LOG_NAME: "the run log"}
    started = time.perf_counter()
    # disable=None: a bar on a terminal only, so logs of overnight runs stay readable
    bar = tqdm(images, unit="image", desc="segment", disable=None if progress else True, file=sys.stderr, dynamic_ncols=True)
    current: Any = None  # ImageOutputs or HugeImageOutputs
    position = 0
    try:
        for position, item in enumerate(bar):
            if options.huge_outputs:
                current = HugeImageOutputs(output, item, options.formats)
            else:
                current = ImageOutputs(output, item, options.formats, options.overlay)
            clash = next((claimed[p] for p in current.finals() if p in claimed), None)
            if clash is not None:
                fail(item.name, f"its output name {item.stem!r} is already used by {clash}: rename one, or run them into different --output folders")
                continue
            claimed.update({p: str(item.path) for p in current.finals()})
            current.clean()
            if prompts is not None and item not in matched:
                summary.skipped.append({"image": item.name, "reason": "no prompts for it in the prompt file"})
                log(f"skipped {item.name}: no prompts")
            elif not options.overwrite and current.complete():
                summary.skipped.append({"image": item.name, "reason": "outputs already complete (--overwrite redoes them)"})
                log(f"skipped {item.name}: outputs already complete")
            else:

                def on_tile(done: int, total: int, name: str = item.name) -> None:
                    bar.set_postfix_str(f"{name}: tile {done}/{total}")

                entry = _segment_one(engine, item, matched.get(item, []), current, options, device, log, on_tile)
                if "reason" in entry:
                    fail(item.name, entry["reason"])
                else:
                    summary.done.append(entry)
                    peak = entry.get("peak_memory_bytes")
                    if peak is not None:
                        summary.peak_memory_bytes = max(summary.peak_memory_bytes or 0, peak)
                    tiles = f", {entry['tiles']} tile(s), {entry['encoder_passes']} encoder pass(es)" if "tiles" in entry else ""
                    log(f"done {item.name}: {entry['masks']} mask(s){tiles} in {entry['seconds']} s" + "".join(f"; {n}" for n in entry["notes"]))
            current.clean()
            bar.set_postfix_str(f"failed={len(summary.failed)}", refresh=False)
    except KeyboardInterrupt:
        if current is not None:
            current.clean()
        summary.interrupted = True
        summary.not_finished = len(images) - position
        log(f"interrupted: no partial files left; {summary.not_finished} image(s) not finished", echo=True)
        raise
    finally:
        bar.close()
        summary.seconds = time.perf_counter() - started
        write_atomic(output / SUMMARY_NAME, lambda f: f.write(json.dumps(summary.to_dict(), indent=1).encode()))
        log(summary.line())
        log.file.close()
    return summary


def _segment_one(
    engine: Any, item: ImageItem, prompts: list[Prompt], outputs: Any, options: SegmentOptions, device: torch.device, log: Callable, on_tile: Callable
) -> dict[str, Any]:
    """Read, segment and write one image. Returns its summary entry, with a reason if it failed."""
    started = time.perf_counter()
    try:
        peak = _reset_peak(device)
        body = _segment_huge if options.huge_outputs else _segment_whole
        entry = body(engine, item, prompts, outputs, options, device, on_tile)
        return {
            "image": item.name,
            **entry,
            "seconds": round(time.perf_counter() - started, 3),
            "peak_memory_bytes": peak_bytes(device) if peak else None,
        }
    except InputError as error:
        return {"image": item.name, "reason": str(error)}
    except (torch.cuda.OutOfMemoryError, MemoryError) as error:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        smaller = ", a smaller --tile" if options.tiling is not None else ""
        return {
            "image": item.name,
            "reason": f"out of memory on {device} ({first}): try --dtype bfloat16, a smaller --max-block-mb{smaller}, "
            "a smaller --points-per-batch (--auto), or another --device",
        }
    except OSError as error:  # reading raises InputError: this is writing
        return {"image": item.name, "reason": f"cannot write its outputs ({error})"}
    except Exception as error:  # a bug, not bad input: record it, keep the traceback in the log, go on
        log(f"traceback for {item.name}:\n{traceback.format_exc()}")
        return {"image": item.name, "reason": f"internal error ({type(error).__name__}: {error}); traceback in {LOG_NAME}"}


def _segment_whole(
    engine: Any, item: ImageItem, prompts: list[Prompt], outputs: ImageOutputs, options: SegmentOptions, device: torch.device, on_tile: Callable
) -> dict[str, Any]:
    """One encoder pass over the whole image; (H, W) masks written one at a time (png, coco)."""
    image, notes = read_image(item.path, options.max_pixels)
    height, width = image.shape[:2]
    check_prompts(prompts, height, width)
    if not isinstance(engine, SamPredictor):
        _check_auto_batch(engine.points_per_batch, height, width, device)
    outputs.begin(item, image, prompts)
    for record, mask in _whole_image_masks(engine, image, prompts, options):
        outputs.add(record, mask)
    outputs.commit()
    return {"masks": len(outputs.records), "height": height, "width": width, "notes": notes}


def _segment_huge(
    engine: Any, item: ImageItem, prompts: list[Prompt], outputs: HugeImageOutputs, options: SegmentOptions, device: torch.device, on_tile: Callable
) -> dict[str, Any]:
    """Masks kept as crops and written as huge images are (label TIFF, COCO RLE, table): tile by
    tile at native resolution when the image is larger than a tile, else in one encoder pass.
    A TIFF is read window by window (sam_blocked.tiles.source); no (H, W) array is made."""
    tiling = options.tiling
    with open_image(item.path, options.max_pixels) as source:
        height, width = source.height, source.width
        if tiling is None and height * width > options.max_pixels:  # open_image reads TIFFs whatever their size
            raise InputError(
                f"{width} x {height} = {width * height:,} pixels is above --max-pixels {options.max_pixels:,}: "
                "segment it tile by tile with --tile, or raise --max-pixels"
            )
        check_prompts(prompts, height, width)
        outputs.check(height, width)
        if tiling is None or tiling.fits(height, width):
            if not isinstance(engine, SamPredictor):
                _check_auto_batch(engine.points_per_batch, height, width, device)
            image = source.read((0, 0, width, height))
            masks = [crop_of_mask(mask, record) for record, mask in _whole_image_masks(engine, image, prompts, options)]
            tiles = passes = 1
        else:
            predictor = engine if isinstance(engine, SamPredictor) else engine.predictor
            if not isinstance(engine, SamPredictor):
                _check_auto_batch(engine.points_per_batch, min(height, tiling.tile), min(width, tiling.tile), device)
            result = segment_tiled(
                predictor,
                source,
                height,
                width,
                tiling,
                prompts=prompts if isinstance(engine, SamPredictor) else None,
                points_per_side=options.amg.get("points_per_side", 32),
                settings=DecodeSettings.from_amg(options.amg, options.multimask),
                on_tile=on_tile,
            )
            masks, tiles, passes = result.masks, result.tiles, result.encoder_passes
        outputs.commit(masks, height, width, geo=source.geo)
        notes = list(source.notes)
    truncated = sum(bool(m.record.get("truncated")) for m in masks)
    return {"masks": len(masks), "truncated": truncated, "height": height, "width": width, "tiles": tiles, "encoder_passes": passes, "notes": notes}


def _whole_image_masks(engine: Any, image: np.ndarray, prompts: list[Prompt], options: SegmentOptions) -> Iterator[tuple[dict, np.ndarray]]:
    """(record, (H, W) mask) pairs from one encoder pass over the whole image."""
    if isinstance(engine, SamPredictor):
        engine.set_image(image)  # the one encoder pass
        try:
            yield from prompt_masks(engine, prompts, options.multimask)
        finally:
            engine.reset_image()
    else:
        yield from auto_masks(engine, image)


def _check_auto_batch(points_per_batch: int, height: int, width: int, device: torch.device) -> None:
    """Refuse an automatic-mask batch that cannot fit: SamAutomaticMaskGenerator upsamples
    3 masks per point to the full image size at once, about 8 bytes a pixel (float32 logits
    and bool copies; measured), so 64 points on a 12000 x 9000 image want ~160 GiB. On the
    CPU the kernel would kill the whole run; a message for this image is better."""
    per_point = 3 * height * width * 8
    available = available_bytes(device)
    if available is None or points_per_batch * per_point <= available:
        return
    fits = available // per_point
    hint = f"use --points-per-batch {fits} or less" if fits >= 1 else "even one point per batch does not fit: use --prompts, or more memory"
    raise InputError(
        f"--auto decodes --points-per-batch {points_per_batch} x 3 masks at the full {width} x {height} size at once, "
        f"~{points_per_batch * per_point / 2**30:.1f} GiB, but {available / 2**30:.1f} GiB is free on {device}: {hint}"
    )


def available_bytes(device: torch.device) -> Optional[int]:
    """Bytes that can still be allocated on `device` (CUDA free + cached; CPU MemAvailable), None if unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return None


def _reset_peak(device: torch.device) -> bool:
    try:
        reset_peak(device)
        return True
    except OSError:  # no /proc/self/clear_refs (not Linux, or not allowed): peak not measured
        return False


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))