"""The files a batch run writes for each image, each either complete or absent.

    OUT/<stem>/0.png, 1.png, ..., metadata.csv   format png: 0/255 masks as amg.py writes them
    OUT/<stem>.json                               format coco: COCO RLE, SA-1B's per-image layout
    OUT/<stem>.overlay.png                        overlay: a preview, long side <= PREVIEW_SIZE px

where <stem> is the image's path relative to the folder it was found in, without its
extension (amg.py's naming). Each output is written under a `.NAME.partial` name next to
it and renamed into place (a mask folder only after its metadata.csv, written last), so
a rerun can tell complete outputs from what an interrupted run left.

A worker that may run an image twice (Ray retries the work of a worker that died) stages
under names of its own, `.NAME.partial.<token>` (`unique_token()`), so two attempts never
write the same file; `remove_stray_partials` clears what a dead attempt left.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from sam_blocked.inputs.images import ImageItem, InputError
from sam_blocked.inputs.prompts import Prompt
from sam_blocked.outputs.writer import OutputWriter

FORMATS = ("png", "coco")
PREVIEW_SIZE = 1024
# scripts/amg.py's write_masks_to_folder header; prompt mode appends PROMPT_COLUMNS.
AMG_COLUMNS = (
    "id,area,bbox_x0,bbox_y0,bbox_w,bbox_h,point_input_x,point_input_y,predicted_iou,"
    "stability_score,crop_box_x0,crop_box_y0,crop_box_w,crop_box_h"
).split(",")
PROMPT_COLUMNS = ["prompt", "prompt_name", "mask_index"]
_COLORS = np.random.default_rng(0).integers(40, 256, size=(64, 3)).astype(np.float32)
_TOKEN = re.compile(r"\.(partial|replaced)\.w[0-9a-f]{12}$")  # the end of a name staged with unique_token()


def _partial(path: Path, suffix: str = ".partial") -> Path:
    return path.with_name(f".{path.name}{suffix}")


def unique_token() -> str:
    """A token for one attempt's staging names (`.NAME.partial.<token>`): unique per call."""
    return "w" + uuid.uuid4().hex[:12]


def remove_stray_partials(folders: Iterable[Path]) -> int:
    """Remove what attempts that died left in `folders` (not recursive): files and folders
    staged under a unique_token() name. Returns how many were removed."""
    removed = 0
    for folder in set(folders):
        try:
            entries = list(os.scandir(folder))
        except OSError:  # not made yet, or gone
            continue
        for entry in entries:
            if entry.name.startswith(".") and _TOKEN.search(entry.name):
                _remove(Path(entry.path))
                removed += 1
    return removed


def _save(path: Path, write: Callable[[BinaryIO], None]) -> None:
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def write_atomic(path: Path, write: Callable[[BinaryIO], None], token: Optional[str] = None) -> None:
    """Write `path` under its .partial name, flushed to disk, then rename it into place.

    Args:
        path: the final file; on any failure it is left as it was and no .partial stays.
        write: writes the content to the binary file it is given.
        token: stage as .NAME.partial.<token> (unique_token()), for work that may run twice.
    """
    tmp = _partial(path, _suffix(".partial", token))
    try:
        _save(tmp, write)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _suffix(suffix: str, token: Optional[str]) -> str:
    return suffix if token is None else f"{suffix}.{token}"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


class ImageOutputs(OutputWriter):
    """The output files of one image: staged under .NAME.partial names, renamed by commit().

    Use: clean(), check(), begin(), add() per mask, commit(); clean() again on any failure.

    Args:
        output: the run's output folder.
        item: the image; its stem names the outputs.
        formats: any of FORMATS.
        overlay: also write the preview PNG.
        token: stage under .NAME.partial.<token> names (unique_token()), not .NAME.partial:
            for a worker whose image may also run elsewhere (a retry after a worker died).
    """

    def __init__(self, output: Path, item: ImageItem, formats: Sequence[str], overlay: bool, token: Optional[str] = None) -> None:
        self.token = token
        self.staged, self.replaced = _suffix(".partial", token), _suffix(".replaced", token)
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
        """Remove what an interrupted run left: partial files and folders, a replaced folder
        (this object's staging names; see remove_stray_partials for other attempts')."""
        for path in self.finals():
            _remove(_partial(path, self.staged))
        if self.folder is not None:
            _remove(_partial(self.folder, self.replaced))

    def check(self, height: int, width: int) -> None:
        """Every size fits: an image written whole is bounded by max_pixels before it is read."""

    def begin(self, item: ImageItem, image: np.ndarray, prompts: Sequence[Prompt]) -> None:
        if self.folder is not None and self.folder.exists() and not (self.folder / "metadata.csv").is_file():
            raise InputError(f"output folder {self.folder} exists but has no metadata.csv, so it is not ours: move it away")
        for path in self.finals():
            path.parent.mkdir(parents=True, exist_ok=True)
        self.item, self.height, self.width = item, image.shape[0], image.shape[1]
        self.records: list[dict] = []
        if self.folder is not None:
            _partial(self.folder, self.staged).mkdir()
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
            _save(_partial(self.folder, self.staged) / f"{index}.png", lambda f: png.save(f, format="PNG", compress_level=1))
        if self.canvas is not None:
            self.canvas.add(index, mask)
        if self.coco is None:
            record.pop("segmentation", None)  # auto mode's RLE, not needed
        self.records.append(record)

    def commit(self) -> None:
        """Write the overlay, the JSON, then metadata.csv, and rename the mask folder in last."""
        if self.canvas is not None:
            write_atomic(self.preview, lambda f: self.canvas.image().save(f, format="PNG"), self.token)
        if self.coco is not None:
            document = {"image": {"file_name": self.item.name, "height": self.height, "width": self.width}, "annotations": self.records}
            write_atomic(self.coco, lambda f: f.write(json.dumps(document).encode()), self.token)
        if self.folder is not None:
            staging = _partial(self.folder, self.staged)
            _save(staging / "metadata.csv", lambda f: f.write(_metadata_csv(self.records).encode()))
            if self.folder.exists():  # --overwrite, or another attempt's: swap the old folder out, the new one in
                os.replace(self.folder, _partial(self.folder, self.replaced))
            os.replace(staging, self.folder)
            _remove(_partial(self.folder, self.replaced))


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
