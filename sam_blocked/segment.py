"""Batch segmentation of image files with SamPredictor or SamAutomaticMaskGenerator.

The library side of `sam-blocked segment`. Given the images (sam_blocked.images) and,
in prompt mode, their prompt sets (sam_blocked.prompts), it runs SAM with one encoder
pass per image, then one mask-decoder call per prompt set, or amg.py's automatic masks,
and writes each image's outputs (sam_blocked.outputs) plus, for the run:

    OUT/segment-summary.json, OUT/segment.log

Outputs are either complete or absent: a rerun skips images whose outputs all exist and
redoes the rest. A bad image fails alone, with a message in the log and the summary.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import numpy as np
import torch
from pycocotools import mask as mask_utils
from segment_anything import SamAutomaticMaskGenerator, SamPredictor
from segment_anything.modeling import Sam
from segment_anything.utils.amg import batched_mask_to_box, box_xyxy_to_xywh, calculate_stability_score
from tqdm import tqdm

from sam_blocked.images import DEFAULT_MAX_PIXELS, ImageItem, InputError, read_image
from sam_blocked.memory import peak_bytes, reset_peak
from sam_blocked.outputs import FORMATS, ImageOutputs, write_atomic
from sam_blocked.prompts import Prompt, check_prompts, match_prompts

SUMMARY_NAME = "segment-summary.json"
LOG_NAME = "segment.log"
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


# ----------------------------------------------------------------------------- masks


@torch.no_grad()
def prompt_masks(predictor: SamPredictor, prompts: Sequence[Prompt], multimask: bool = False) -> Iterator[tuple[dict, np.ndarray]]:
    """Masks for prompt sets on the image set in `predictor`, one at a time.

    SamPredictor.predict's steps, except that the decoder's low-resolution masks are
    upsampled to the original size one at a time rather than three together: a 12000 x
    9000 image then needs one (H, W) float32 mask on the device, not three.

    Args:
        predictor: a SamPredictor after set_image.
        prompts: prompt sets in original pixel coordinates.
        multimask: keep all three masks of each set, else the one SAM scores best.

    Yields:
        (record, mask): record holds amg.py's keys (area, bbox XYWH, predicted_iou,
        point_coords, stability_score, crop_box) plus point_labels, box, prompt,
        prompt_name and mask_index; mask is (H, W) bool.
    """
    model = predictor.model
    height, width = predictor.original_size
    device = predictor.device
    for index, prompt in enumerate(prompts):
        points = boxes = None
        if (arrays := prompt.points()) is not None:
            coords = predictor.transform.apply_coords(arrays[0], predictor.original_size)  # (N, 2)
            points = (
                torch.as_tensor(coords, dtype=torch.float, device=device)[None],  # (1, N, 2)
                torch.as_tensor(arrays[1], dtype=torch.int, device=device)[None],  # (1, N)
            )
        if prompt.box is not None:
            box = predictor.transform.apply_boxes(np.array(prompt.box, dtype=np.float64), predictor.original_size)  # (1, 4)
            boxes = torch.as_tensor(box, dtype=torch.float, device=device)
        sparse, dense = model.prompt_encoder(points=points, boxes=boxes, masks=None)
        low_res, scores = model.mask_decoder(
            image_embeddings=predictor.features,
            image_pe=model.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=True,
        )  # (1, 3, 256, 256), (1, 3)
        keep = range(low_res.shape[1]) if multimask else [int(scores[0].argmax())]
        for k in keep:
            logits = model.postprocess_masks(low_res[:, k : k + 1], predictor.input_size, predictor.original_size)[0]  # (1, H, W)
            stability = calculate_stability_score(logits, model.mask_threshold, 1.0)
            mask = logits > model.mask_threshold  # (1, H, W)
            del logits
            record = {
                "area": int(mask.sum()),
                "bbox": box_xyxy_to_xywh(batched_mask_to_box(mask)[0]).tolist(),
                "predicted_iou": float(scores[0, k]),
                "point_coords": [list(p) for p in prompt.foreground + prompt.background],
                "point_labels": [1] * len(prompt.foreground) + [0] * len(prompt.background),
                "box": None if prompt.box is None else list(prompt.box),
                "stability_score": float(stability[0]),
                "crop_box": [0, 0, width, height],
                "prompt": index,
                "prompt_name": prompt.name,
                "mask_index": k,
            }
            yield record, mask[0].cpu().numpy()


def auto_masks(generator: SamAutomaticMaskGenerator, image: np.ndarray) -> Iterator[tuple[dict, np.ndarray]]:
    """SamAutomaticMaskGenerator's records (output_mode "coco_rle"), each with its (H, W) bool mask,
    decoded one at a time so a large image never holds every mask at full size."""
    for record in generator.generate(image):
        yield record, mask_utils.decode(record["segmentation"]).astype(bool)


# -------------------------------------------------------------------------------- run


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


@dataclass
class RunSummary:
    """What a run did, written as OUT/segment-summary.json.

    Args:
        done/skipped/failed: one dict per image (image, and reason or masks, seconds, notes).
        images: how many images the run was given.
        not_finished: images left, the current one included, when the run was interrupted.
        peak_memory_bytes: the largest per-image peak (sam_blocked.memory.peak_bytes), None
            where it cannot be measured.
    """

    output: Path
    mode: str
    settings: dict[str, Any]
    done: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    failed: list[dict] = field(default_factory=list)
    images: int = 0
    not_finished: int = 0
    interrupted: bool = False
    seconds: float = 0.0
    device: str = "cpu"
    peak_memory_bytes: Optional[int] = None

    def to_dict(self) -> dict[str, Any]:
        counts = {
            "images": self.images,
            "done": len(self.done),
            "skipped": len(self.skipped),
            "failed": len(self.failed),
            "not_finished": self.not_finished,
        }
        return {
            "output": str(self.output),
            "mode": self.mode,
            "interrupted": self.interrupted,
            "counts": counts,
            "seconds": round(self.seconds, 3),
            "device": self.device,
            "peak_memory_bytes": self.peak_memory_bytes,
            "settings": self.settings,
            "done": self.done,
            "skipped": self.skipped,
            "failed": self.failed,
        }

    def line(self) -> str:
        """One line for the terminal."""
        state = "interrupted" if self.interrupted else "finished"
        peak = f", peak memory {self.peak_memory_bytes / 2**20:.0f} MiB on {self.device}" if self.peak_memory_bytes else ""
        return (
            f"segment {state}: {len(self.done)} done, {len(self.skipped)} skipped, {len(self.failed)} failed"
            f" in {self.seconds:.1f} s{peak}; summary: {self.output / SUMMARY_NAME}"
        )


class _RunLog:
    def __init__(self, path: Path, echo: bool) -> None:
        self.file = open(path, "a", encoding="utf-8")
        self.echo = echo

    def __call__(self, message: str, *, echo: bool = False) -> None:
        self.file.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")
        self.file.flush()
        if echo and self.echo:
            tqdm.write(message, file=sys.stderr)


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
        options: formats, multimask, overlay, overwrite, max_pixels, amg settings.
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
    summary = RunSummary(output, mode, {"options": _jsonable(vars(options)), **_jsonable(dict(settings or {}))}, device=str(device))
    summary.images = len(images)
    log = _RunLog(output / LOG_NAME, echo=progress)
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
    current: Optional[ImageOutputs] = None
    position = 0
    try:
        for position, item in enumerate(bar):
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
                entry = _segment_one(engine, item, matched.get(item, []), current, options, device, log)
                if "reason" in entry:
                    fail(item.name, entry["reason"])
                else:
                    summary.done.append(entry)
                    peak = entry.get("peak_memory_bytes")
                    if peak is not None:
                        summary.peak_memory_bytes = max(summary.peak_memory_bytes or 0, peak)
                    log(f"done {item.name}: {entry['masks']} mask(s) in {entry['seconds']} s" + "".join(f"; {n}" for n in entry["notes"]))
            current.clean()
            bar.set_postfix(failed=len(summary.failed), refresh=False)
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
    engine: Any, item: ImageItem, prompts: list[Prompt], outputs: ImageOutputs, options: SegmentOptions, device: torch.device, log: Callable
) -> dict[str, Any]:
    """Read, segment and write one image. Returns its summary entry, with a reason if it failed."""
    started = time.perf_counter()
    try:
        peak = _reset_peak(device)
        image, notes = read_image(item.path, options.max_pixels)
        height, width = image.shape[:2]
        check_prompts(prompts, height, width)
        if not isinstance(engine, SamPredictor):
            _check_auto_batch(engine.points_per_batch, height, width, device)
        outputs.begin(item, image, prompts)
        if isinstance(engine, SamPredictor):
            engine.set_image(image)  # the one encoder pass
            masks = prompt_masks(engine, prompts, options.multimask)
        else:
            masks = auto_masks(engine, image)
        for record, mask in masks:
            outputs.add(record, mask)
        outputs.commit()
        if isinstance(engine, SamPredictor):
            engine.reset_image()
        return {
            "image": item.name,
            "masks": len(outputs.records),
            "height": height,
            "width": width,
            "seconds": round(time.perf_counter() - started, 3),
            "peak_memory_bytes": peak_bytes(device) if peak else None,
            "notes": notes,
        }
    except InputError as error:
        return {"image": item.name, "reason": str(error)}
    except (torch.cuda.OutOfMemoryError, MemoryError) as error:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        return {
            "image": item.name,
            "reason": f"out of memory on {device} ({first}): try --dtype bfloat16, a smaller --max-block-mb, "
            "a smaller --points-per-batch (--auto), or another --device",
        }
    except OSError as error:  # reading is handled by read_image: this is writing
        return {"image": item.name, "reason": f"cannot write its outputs ({error})"}
    except Exception as error:  # a bug, not bad input: record it, keep the traceback in the log, go on
        log(f"traceback for {item.name}:\n{traceback.format_exc()}")
        return {"image": item.name, "reason": f"internal error ({type(error).__name__}: {error}); traceback in {LOG_NAME}"}


def _check_auto_batch(points_per_batch: int, height: int, width: int, device: torch.device) -> None:
    """Refuse an automatic-mask batch that cannot fit: SamAutomaticMaskGenerator upsamples
    3 masks per point to the full image size at once, about 8 bytes a pixel (float32 logits
    and bool copies; measured), so 64 points on a 12000 x 9000 image want ~160 GiB. On the
    CPU the kernel would kill the whole run; a message for this image is better."""
    per_point = 3 * height * width * 8
    available = _available_bytes(device)
    if available is None or points_per_batch * per_point <= available:
        return
    fits = available // per_point
    hint = f"use --points-per-batch {fits} or less" if fits >= 1 else "even one point per batch does not fit: use --prompts, or more memory"
    raise InputError(
        f"--auto decodes --points-per-batch {points_per_batch} x 3 masks at the full {width} x {height} size at once, "
        f"~{points_per_batch * per_point / 2**30:.1f} GiB, but {available / 2**30:.1f} GiB is free on {device}: {hint}"
    )


def _available_bytes(device: torch.device) -> Optional[int]:
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