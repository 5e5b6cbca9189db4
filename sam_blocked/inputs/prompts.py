"""Prompt files for a batch run: points and boxes per image, read, checked and matched.

`load_prompts` reads a JSON or CSV prompt file into `Prompt` sets per image key,
refusing malformed entries with a message that names them; `match_prompts` gives each
collected image its sets; `check_prompts` refuses sets outside one image's bounds.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from sam_blocked.errors import SettingError
from sam_blocked.inputs.images import ImageItem, InputError


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
        raise SettingError(
            f"{{prompts}} {path}: give a .json or .csv prompt file: JSON "
            '{"photo.jpg": [{"foreground": [[x, y]], "box": [x0, y0, x1, y1]}]}, '
            "CSV with the header image,name,kind,x0,y0,x1,y1",
            "prompts",
        )
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise SettingError(f"{{prompts}} {path}: cannot read it ({error})", "prompts") from error
    sets = _prompts_from_json(path, text) if path.suffix.lower() == ".json" else _prompts_from_csv(path, text)
    if not sets:
        raise SettingError(f"{{prompts}} {path}: the file holds no prompts", "prompts")
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
