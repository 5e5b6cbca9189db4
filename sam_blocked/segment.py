"""Batch segmentation of image files with SamPredictor or SamAutomaticMaskGenerator.

The library side of `sam-blocked segment`. It finds the images (files, folders, globs),
reads each one into (H, W, 3) uint8 RGB, runs SAM with one encoder pass per image (then
one mask-decoder call per prompt set, or amg.py's automatic masks), and writes:

    OUT/<stem>/0.png, 1.png, ..., metadata.csv   --format png: 0/255 masks as amg.py writes them
    OUT/<stem>.json                               --format coco: COCO RLE, SA-1B's per-image layout
    OUT/<stem>.overlay.png                        --overlay: a preview, long side <= 1024 px
    OUT/segment-summary.json, OUT/segment.log     the run

where <stem> is the image's path relative to the folder it was found in, without its
extension (amg.py's naming). Each output is written under a `.NAME.partial` name next to
it and renamed into place (a mask folder only after its metadata.csv, written last), so
an output is either complete or absent: a rerun skips images whose outputs all exist and
redoes the rest. A bad image fails alone, with a message in the log and the summary.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from glob import glob
from importlib.util import find_spec
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, Callable, Iterator, Mapping, Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps
from pycocotools import mask as mask_utils
from segment_anything import SamAutomaticMaskGenerator, SamPredictor
from segment_anything.modeling import Sam
from segment_anything.utils.amg import batched_mask_to_box, box_xyxy_to_xywh, calculate_stability_score
from tqdm import tqdm

from sam_blocked.memory import peak_bytes, reset_peak

DEFAULT_MAX_PIXELS = 16384 * 16384  # PIL's own bomb limit (89.5 MPix) is below a 12000 x 9000 scan
FORMATS = ("png", "coco")
SUMMARY_NAME = "segment-summary.json"
LOG_NAME = "segment.log"
PREVIEW_SIZE = 1024
# scripts/amg.py's write_masks_to_folder header; prompt mode appends PROMPT_COLUMNS.
AMG_COLUMNS = (
    "id,area,bbox_x0,bbox_y0,bbox_w,bbox_h,point_input_x,point_input_y,predicted_iou,"
    "stability_score,crop_box_x0,crop_box_y0,crop_box_w,crop_box_h"
).split(",")
PROMPT_COLUMNS = ["prompt", "prompt_name", "mask_index"]
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
_HIGH_BITS_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


class InputError(ValueError):
    """A problem with one image or its prompts: that image fails, the run goes on."""


# ----------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class ImageItem:
    """One image to segment.

    Args:
        path: the file, as found (joined onto the INPUT given).
        name: its path relative to the folder or glob root it was found in (POSIX), or
            its file name when it was given as a file. Outputs are named after it.
    """

    path: Path
    name: str

    @property
    def stem(self) -> str:
        """`name` without its extension: the output name (amg.py's convention)."""
        return str(PurePosixPath(self.name).with_suffix(""))


def image_extensions() -> frozenset[str]:
    """File extensions PIL can open, lower case with the dot: a folder's default filter."""
    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


def collect_images(
    inputs: Sequence[str | os.PathLike], pattern: Optional[str] = None, exclude: Optional[Path] = None
) -> tuple[list[ImageItem], list[tuple[str, str]]]:
    """Expand files, folders and globs into images, in input order, each file once.

    Args:
        inputs: image files, folders, or glob patterns (`photos/*.tif`, `**` recurses).
        pattern: for folders, a pathlib glob relative to the folder (`*.tif`, `**/*.png`);
            default: the files directly in the folder with an extension PIL can open.
            Hidden files and folders are left out.
        exclude: a folder whose files are never collected (the output folder).

    Returns:
        (images, problems): problems are (input, reason) for inputs that named nothing.
    """
    if pattern is not None and (not pattern or os.path.isabs(pattern)):
        raise ValueError(f"--pattern {pattern!r}: give a glob relative to each folder, e.g. '*.tif' or '**/*.png'")
    images: list[ImageItem] = []
    problems: list[tuple[str, str]] = []
    seen: set[Path] = set()
    excluded = exclude.resolve() if exclude is not None else None

    def add(path: Path, name: str) -> None:
        key = path.resolve()
        if key not in seen and not (excluded is not None and key.is_relative_to(excluded)):
            seen.add(key)
            images.append(ImageItem(path, name))

    for arg in map(str, inputs):
        path = Path(arg)
        before = len(images)
        try:
            if path.is_dir():
                for file in _scan_folder(path, pattern):
                    add(file, file.relative_to(path).as_posix())
            elif path.exists():
                add(path, path.name)
            elif any(c in arg for c in "*?["):
                root = _glob_root(arg)
                for match in map(Path, sorted(glob(arg, recursive=True))):
                    if match.is_dir():
                        for file in _scan_folder(match, pattern):
                            add(file, file.relative_to(root).as_posix())
                    else:
                        add(match, match.relative_to(root).as_posix())
            else:
                problems.append((arg, "no such file or folder"))
                continue
        except OSError as error:
            problems.append((arg, f"cannot list it: {error.strerror or error}"))
            continue
        if len(images) == before and not path.is_file():
            what = f"--pattern {pattern!r}" if pattern else "an image extension"
            problems.append((arg, f"the folder has no new file with {what}" if path.is_dir() else "the glob matched no new file"))
    return images, problems


def _scan_folder(folder: Path, pattern: Optional[str]) -> list[Path]:
    if pattern is None:
        extensions = image_extensions()
        files = [p for p in folder.iterdir() if p.suffix.lower() in extensions]
    else:
        files = list(folder.glob(pattern))
    return sorted(p for p in files if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _glob_root(pattern: str) -> Path:
    parts = Path(pattern).parts
    fixed = [p for p in parts[: next(i for i, p in enumerate(parts) if any(c in p for c in "*?["))]]
    return Path(*fixed) if fixed else Path(".")


def read_image(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, list[str]]:
    """Read an image file as SAM wants it, in the orientation a viewer shows.

    EXIF orientation is applied; grayscale, palette, RGBA, CMYK and 1-bit images are
    converted to RGB (alpha dropped); 16-bit, 32-bit and float images are stretched
    linearly from their minimum..maximum to 0..255. Multi-frame files use frame 0.

    Args:
        path: the image file.
        max_pixels: refuse images with more pixels than this before decoding them
            (the decompression-bomb guard; PIL's own limit is replaced by this one).

    Returns:
        (image, notes): image is (H, W, 3) uint8 RGB; notes say what was converted.

    Raises:
        InputError: the file cannot be read, is not an image, is truncated, or is too big.
    """
    notes: list[str] = []
    bomb_limit = Image.MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            Image.MAX_IMAGE_PIXELS = None  # replaced by the max_pixels check below, with a clearer message
            with Image.open(path) as opened:
                width, height = opened.size
                if width * height > max_pixels:
                    raise InputError(
                        f"{width} x {height} = {width * height:,} pixels is above --max-pixels {max_pixels:,} "
                        "(a guard against decompression bombs): raise --max-pixels if you trust this file"
                    )
                if getattr(opened, "n_frames", 1) > 1:
                    notes.append(f"has {opened.n_frames} frames; using the first")
                orientation = opened.getexif().get(0x0112, 1)
                img = ImageOps.exif_transpose(opened)  # decodes: a truncated file fails here
                if orientation not in (1, None):
                    notes.append(f"EXIF orientation {orientation} applied: masks and prompts are in the rotated {img.width} x {img.height} frame")
                return _to_rgb(img, notes), notes
    except InputError:
        raise
    except Exception as error:  # decoders raise OSError, SyntaxError, ValueError, EOFError, ...
        raise InputError(_read_error(error)) from error
    finally:
        Image.MAX_IMAGE_PIXELS = bomb_limit


def _read_error(error: Exception) -> str:
    if isinstance(error, FileNotFoundError):
        return "no such file"
    if isinstance(error, PermissionError):
        return "cannot read it: permission denied"
    if isinstance(error, Image.UnidentifiedImageError):
        return "not an image PIL can read (unknown or corrupt format)"
    if "truncated" in str(error).lower():
        return f"truncated image file ({error}): the file is incomplete; copy it again"
    return f"cannot decode it ({type(error).__name__}: {error})"


def _to_rgb(img: Image.Image, notes: list[str]) -> np.ndarray:
    if img.mode in _HIGH_BITS_MODES:
        values = np.asarray(img).astype(np.float32)  # (H, W)
        finite = values[np.isfinite(values)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        gray = np.clip(np.nan_to_num((values - lo) * scale), 0, 255).round().astype(np.uint8)
        notes.append(f"{img.mode} image stretched from [{lo:g}, {hi:g}] to [0, 255] and copied to RGB")
        return np.repeat(gray[:, :, None], 3, axis=2)  # (H, W, 3)
    if img.mode != "RGB":
        dropped = " (alpha dropped)" if "A" in img.getbands() or "transparency" in img.info else ""
        notes.append(f"converted from mode {img.mode} to RGB{dropped}")
        img = img.convert("RGB")
    return np.asarray(img)  # (H, W, 3) uint8


# ---------------------------------------------------------------------------- prompts


@dataclass(frozen=True)
class Prompt:
    """One prompt set: what SAM is told about one object, in original pixel coordinates.

    Args:
        name: names the set in metadata.csv and the COCO JSON.
        foreground: (x, y) points on the object (label 1).
        background: (x, y) points off the object (label 0).
        box: (x0, y0, x1, y1), at most one per set.
    """

    name: str
    foreground: tuple[tuple[float, float], ...] = ()
    background: tuple[tuple[float, float], ...] = ()
    box: Optional[tuple[float, float, float, float]] = None

    def points(self) -> Optional[tuple[np.ndarray, np.ndarray]]:
        """(coords (N, 2) float, labels (N,) int) as SamPredictor.predict takes them, or None."""
        coords = self.foreground + self.background
        if not coords:
            return None
        labels = [1] * len(self.foreground) + [0] * len(self.background)
        return np.array(coords, dtype=np.float64), np.array(labels, dtype=np.int64)


def load_prompts(path: str | os.PathLike) -> dict[str, list[Prompt]]:
    """Read a prompt file: image key -> prompt sets, in file order.

    JSON: an object mapping each image to a list of prompt sets; every key but one
    point or a box is optional:

        {"astronaut.jpg": [{"name": "face", "foreground": [[222, 125]], "background": [[225, 45]]},
                           {"name": "helmet", "box": [280, 345, 510, 510]}]}

    CSV: a header `image,name,kind,x0,y0,x1,y1`, then one row per point or box; kind is
    foreground, background or box; points use x0,y0; rows sharing image and name form
    one prompt set. Coordinates are pixels of the image as displayed (EXIF applied).
    An image key is its file name, its path relative to the input folder, or its path
    as given on the command line.

    Raises:
        ValueError: the file cannot be read or an entry is malformed (named in the message).
    """
    path = Path(path)
    if path.suffix.lower() not in (".json", ".csv"):
        raise ValueError(f"--prompts {path}: give a .json or .csv prompt file (see `sam-blocked segment --help`)")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"--prompts {path}: cannot read it ({error})") from error
    sets = _prompts_from_json(path, text) if path.suffix.lower() == ".json" else _prompts_from_csv(path, text)
    if not sets:
        raise ValueError(f"--prompts {path}: the file holds no prompts")
    return sets


def _prompts_from_json(path: Path, text: str) -> dict[str, list[Prompt]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON: {error}") from error
    example = '{"photo.jpg": [{"name": "cat", "foreground": [[120, 80]], "box": [10, 20, 300, 240]}]}'
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the top level must map image names to lists of prompt sets, e.g. {example}")
    sets: dict[str, list[Prompt]] = {}
    for image, entries in data.items():
        if not isinstance(entries, list) or not entries:
            raise ValueError(f"{path}: {image!r} must map to a non-empty list of prompt sets, e.g. {example}")
        prompts = []
        for i, entry in enumerate(entries):
            where = f"{path}: {image!r}, prompt set {i}"
            if not isinstance(entry, dict):
                raise ValueError(f"{where}: expected an object like {{\"foreground\": [[x, y]], \"box\": [x0, y0, x1, y1]}}")
            unknown = set(entry) - {"name", "foreground", "background", "box"}
            if unknown:
                raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}; use name, foreground, background, box")
            name = entry.get("name", str(i))
            if not isinstance(name, (str, int)) or isinstance(name, bool):
                raise ValueError(f"{where}: name must be a string")
            points = {kind: _point_list(entry.get(kind, []), f"{where}, {kind}") for kind in ("foreground", "background")}
            boxes = [] if entry.get("box") is None else [_numbers(entry["box"], 4, f"{where}, box")]
            prompts.append(_make_prompt(where, str(name), points["foreground"], points["background"], boxes))
        key = _image_key(path, image)
        if key in sets:
            raise ValueError(f"{path}: {image!r} and an earlier key name the same image {key!r}: merge them")
        sets[key] = _unique_names(path, image, prompts)
    return sets


def _prompts_from_csv(path: Path, text: str) -> dict[str, list[Prompt]]:
    reader = csv.DictReader(io.StringIO(text))
    columns = [c.strip() for c in reader.fieldnames or []]
    missing = [c for c in ("image", "name", "kind", "x0", "y0", "x1", "y1") if c not in columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(missing)}; the header must be image,name,kind,x0,y0,x1,y1")
    reader.fieldnames = columns
    groups: dict[str, dict[str, dict[str, list]]] = {}
    for line, row in enumerate(reader, start=2):
        if not any(isinstance(v, str) and v.strip() for v in row.values()) or (row["image"] or "").startswith("#"):
            continue
        where = f"{path}: line {line}"
        image, name, kind = ((row[c] or "").strip() for c in ("image", "name", "kind"))
        if not image or not name:
            raise ValueError(f"{where}: image and name must not be empty")
        if kind not in ("foreground", "background", "box"):
            raise ValueError(f"{where}: kind {kind!r} must be foreground, background or box")
        entry = groups.setdefault(_image_key(path, image), {}).setdefault(name, {"foreground": [], "background": [], "box": []})
        size = 4 if kind == "box" else 2
        entry[kind].append(_numbers([row[c] for c in ("x0", "y0", "x1", "y1")[:size]], size, f"{where}, {kind}"))
    return {
        image: [_make_prompt(f"{path}: {image!r}, prompt {name!r}", name, e["foreground"], e["background"], e["box"]) for name, e in sets.items()]
        for image, sets in groups.items()
    }


def _image_key(path: Path, image: str) -> str:
    if not isinstance(image, str) or not image.strip():
        raise ValueError(f"{path}: image names must be non-empty strings, got {image!r}")
    return os.path.normpath(image.strip()).replace(os.sep, "/")


def _point_list(value: Any, where: str) -> list[tuple[float, ...]]:
    if not isinstance(value, list):
        raise ValueError(f"{where}: expected a list of [x, y] points, e.g. [[120, 80], [300, 95]]")
    return [_numbers(p, 2, where) for p in value]


def _numbers(value: Any, count: int, where: str) -> tuple[float, ...]:
    shape = "[x, y]" if count == 2 else "[x0, y0, x1, y1]"
    if not isinstance(value, (list, tuple)) or len(value) != count:
        raise ValueError(f"{where}: expected {shape}, got {value!r}")
    out = []
    for v in value:
        try:
            if isinstance(v, bool):
                raise TypeError
            number = float(v.strip() if isinstance(v, str) else v)
        except (TypeError, ValueError, AttributeError):
            raise ValueError(f"{where}: {v!r} is not a number (expected {shape})") from None
        if not math.isfinite(number):
            raise ValueError(f"{where}: {v!r} is not a finite number")
        out.append(number)
    return tuple(out)


def _make_prompt(where: str, name: str, foreground: list, background: list, boxes: list) -> Prompt:
    if len(boxes) > 1:
        raise ValueError(f"{where}: one box per prompt set (SAM decodes one box at a time); give each box its own name")
    if not foreground and not background and not boxes:
        raise ValueError(f"{where}: a prompt set needs at least one point or a box")
    box = tuple(boxes[0]) if boxes else None
    if box is not None and not (box[0] < box[2] and box[1] < box[3]):
        raise ValueError(f"{where}: box {list(box)} must be [x0, y0, x1, y1] with x0 < x1 and y0 < y1")
    return Prompt(name, tuple(foreground), tuple(background), box)


def _unique_names(path: Path, image: str, prompts: list[Prompt]) -> list[Prompt]:
    names = [p.name for p in prompts]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"{path}: {image!r} has several prompt sets named {duplicates}; names must be unique per image")
    return prompts


def check_prompts(prompts: Sequence[Prompt], height: int, width: int) -> None:
    """Refuse prompts outside the image: 0 <= x <= width and 0 <= y <= height.

    Raises:
        InputError: naming the prompt set, the coordinates and the image size.
    """
    for prompt in prompts:
        corners = [(prompt.box[0], prompt.box[1]), (prompt.box[2], prompt.box[3])] if prompt.box else []
        for x, y in [*prompt.foreground, *prompt.background, *corners]:
            if not (0 <= x <= width and 0 <= y <= height):
                what = f"box {list(prompt.box)}" if (x, y) in corners else f"point ({x:g}, {y:g})"
                raise InputError(
                    f"prompt set {prompt.name!r}: {what} lies outside the {width} x {height} image "
                    f"(x must be in 0..{width}, y in 0..{height}, pixels of the image as displayed)"
                )


def match_prompts(
    prompts: Mapping[str, list[Prompt]], images: Sequence[ImageItem]
) -> tuple[dict[ImageItem, list[Prompt]], list[tuple[str, str]]]:
    """Give each image its prompt sets. A key names an image by its file name, its name
    (path relative to its input folder), or its path as found.

    Returns:
        (matched, missing): missing holds (key, reason) for keys naming no input image.

    Raises:
        ValueError: a key names several images, or an image is named by several keys.
    """
    aliases: dict[str, list[ImageItem]] = {}
    for item in images:
        for alias in {item.name, item.path.name, os.path.normpath(item.path).replace(os.sep, "/")}:
            aliases.setdefault(alias, []).append(item)
    matched: dict[ImageItem, list[Prompt]] = {}
    keys: dict[ImageItem, str] = {}
    missing: list[tuple[str, str]] = []
    for key, sets in prompts.items():
        items = aliases.get(key, [])
        if not items:
            missing.append((key, f"the prompt file names image {key!r}, which is not among the {len(images)} input image(s)"))
        elif len(items) > 1:
            raise ValueError(f"prompt key {key!r} names several images ({', '.join(str(i.path) for i in items)}): use the path relative to the input folder")
        elif items[0] in keys:
            raise ValueError(f"prompts for {items[0].path} are given twice, under {keys[items[0]]!r} and {key!r}: keep one")
        else:
            keys[items[0]] = key
            matched[items[0]] = sets
    return matched, missing


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


# ---------------------------------------------------------------------------- outputs


def _partial(path: Path, suffix: str = ".partial") -> Path:
    return path.with_name(f".{path.name}{suffix}")


def _save(path: Path, write: Callable[[BinaryIO], None]) -> None:
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def _write_atomic(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write `path` under its .partial name, flushed to disk, then rename it into place."""
    tmp = _partial(path)
    try:
        _save(tmp, write)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


_COLORS = np.random.default_rng(0).integers(40, 256, size=(64, 3)).astype(np.float32)


class _Outputs:
    """The output files of one image: staged under .NAME.partial names, renamed by commit()."""

    def __init__(self, output: Path, item: ImageItem, formats: Sequence[str], overlay: bool) -> None:
        stem = output / item.stem
        self.folder = stem if "png" in formats else None
        self.coco = stem.with_name(stem.name + ".json") if "coco" in formats else None
        self.preview = stem.with_name(stem.name + ".overlay.png") if overlay else None

    def finals(self) -> list[Path]:
        return [p for p in (self.folder, self.coco, self.preview) if p is not None]

    def complete(self) -> bool:
        if self.folder is not None and not (self.folder / "metadata.csv").is_file():
            return False
        return all(p.exists() for p in self.finals())

    def clean(self) -> None:
        """Remove what an interrupted run left: partial files and folders, a replaced folder."""
        for path in self.finals():
            _remove(_partial(path))
        if self.folder is not None:
            _remove(_partial(self.folder, ".replaced"))

    def begin(self, item: ImageItem, image: np.ndarray, prompts: Sequence[Prompt]) -> None:
        if self.folder is not None and self.folder.exists() and not (self.folder / "metadata.csv").is_file():
            raise InputError(f"output folder {self.folder} exists but has no metadata.csv, so it is not ours: move it away")
        for path in self.finals():
            path.parent.mkdir(parents=True, exist_ok=True)
        self.item, self.height, self.width = item, image.shape[0], image.shape[1]
        self.records: list[dict] = []
        if self.folder is not None:
            _partial(self.folder).mkdir()
        self.canvas = _Preview(image, prompts) if self.preview is not None else None

    def add(self, record: dict, mask: np.ndarray) -> None:
        """Write one (H, W) bool mask as the next id, keeping its record."""
        index = len(self.records)
        record = {"id": index, **record}
        if self.coco is not None and "segmentation" not in record:
            rle = mask_utils.encode(np.asfortranarray(mask.view(np.uint8)))
            record["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
        if self.folder is not None:
            png = Image.fromarray(mask).convert("L")  # 0/255, as amg.py's cv2.imwrite(mask * 255)
            _save(_partial(self.folder) / f"{index}.png", lambda f: png.save(f, format="PNG", compress_level=1))
        if self.canvas is not None:
            self.canvas.add(index, mask)
        if self.coco is None:
            record.pop("segmentation", None)  # auto mode's RLE, not needed
        self.records.append(record)

    def commit(self) -> None:
        """Write the overlay, the JSON, then metadata.csv, and rename the mask folder in last."""
        if self.canvas is not None:
            _write_atomic(self.preview, lambda f: self.canvas.image().save(f, format="PNG"))
        if self.coco is not None:
            document = {"image": {"file_name": self.item.name, "height": self.height, "width": self.width}, "annotations": self.records}
            _write_atomic(self.coco, lambda f: f.write(json.dumps(document).encode()))
        if self.folder is not None:
            staging = _partial(self.folder)
            _save(staging / "metadata.csv", lambda f: f.write(_metadata_csv(self.records).encode()))
            if self.folder.exists():  # --overwrite: swap the old folder out, the new one in
                os.replace(self.folder, _partial(self.folder, ".replaced"))
            os.replace(staging, self.folder)
            _remove(_partial(self.folder, ".replaced"))


def _metadata_csv(records: list[dict]) -> str:
    prompted = bool(records) and "prompt" in records[0]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(AMG_COLUMNS + (PROMPT_COLUMNS if prompted else []))
    for r in records:
        point = r["point_coords"][0] if r["point_coords"] else ["", ""]
        row = [r["id"], r["area"], *r["bbox"], *point, r["predicted_iou"], r["stability_score"], *r["crop_box"]]
        writer.writerow(row + ([r["prompt"], r["prompt_name"], r["mask_index"]] if prompted else []))
    return out.getvalue()


class _Preview:
    """The image shrunk to PREVIEW_SIZE with each mask blended in a colour, prompts drawn on top."""

    def __init__(self, image: np.ndarray, prompts: Sequence[Prompt]) -> None:
        height, width = image.shape[:2]
        self.scale = min(1.0, PREVIEW_SIZE / max(height, width))
        self.size = (max(1, round(width * self.scale)), max(1, round(height * self.scale)))
        self.canvas = np.asarray(Image.fromarray(image).resize(self.size, Image.BILINEAR), dtype=np.float32).copy()  # (h, w, 3)
        self.prompts = prompts

    def add(self, index: int, mask: np.ndarray) -> None:
        small = np.asarray(Image.fromarray(mask).resize(self.size, Image.NEAREST))  # (h, w) bool
        self.canvas[small] = 0.45 * self.canvas[small] + 0.55 * _COLORS[index % len(_COLORS)]

    def image(self) -> Image.Image:
        out = Image.fromarray(self.canvas.round().astype(np.uint8))
        draw, s = ImageDraw.Draw(out), self.scale
        for prompt in self.prompts:
            if prompt.box is not None:
                draw.rectangle([v * s for v in prompt.box], outline=(255, 255, 0), width=2)
            for points, color in ((prompt.foreground, (0, 255, 0)), (prompt.background, (255, 0, 0))):
                for x, y in points:
                    draw.ellipse([x * s - 4, y * s - 4, x * s + 4, y * s + 4], fill=color, outline=(0, 0, 0))
        return out


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
    current: Optional[_Outputs] = None
    position = 0
    try:
        for position, item in enumerate(bar):
            current = _Outputs(output, item, options.formats, options.overlay)
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
        _write_atomic(output / SUMMARY_NAME, lambda f: f.write(json.dumps(summary.to_dict(), indent=1).encode()))
        log(summary.line())
        log.file.close()
    return summary


def _segment_one(
    engine: Any, item: ImageItem, prompts: list[Prompt], outputs: _Outputs, options: SegmentOptions, device: torch.device, log: Callable
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
