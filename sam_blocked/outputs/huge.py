"""The files a tiled run writes for one huge image, each either complete or absent.

    OUT/<stem>.labels.tif     format labels: uint32 label image, tiled deflate (Geo)TIFF (tiles.labels)
    OUT/<stem>.json           format coco: COCO RLE per mask, SA-1B's layout (tiles.coco)
    OUT/<stem>.objects.csv    format table: one row per mask (tiles.table)
    OUT/<stem>/0.png, ...     format png: amg.py's mask folder, images up to PNG_MAX_PIXELS only

where <stem> names the image as sam_blocked.outputs.images does. The three default formats share
ids: mask i (0-based, in the order given) is id i + 1 in the label image, the JSON and the
table. The png folder keeps amg.py's own numbering (<i>.png and metadata.csv id i hold the
mask of id i + 1). Every file is written under a `.NAME.partial` name (flushed to disk), and
only when all are written are they renamed into place, the table last: `complete()` tells a
finished image from an interrupted one, and a failure leaves no partial file and never
removes or mixes up the finished outputs of an earlier run.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from sam_blocked.inputs.images import ImageItem, InputError
from sam_blocked.outputs.images import ImageOutputs, _partial, _remove, _save
from sam_blocked.outputs.coco import MAX_RLE_PIXELS, save_coco
from sam_blocked.tiles.crops import MaskCrop
from sam_blocked.inputs.geo import GeoInfo
from sam_blocked.outputs.labels import save_label_tiff
from sam_blocked.outputs.table import object_records, object_table
from sam_blocked.outputs.writer import OutputWriter

TILED_FORMATS = ("labels", "coco", "table", "png")
DEFAULT_TILED_FORMATS = ("labels", "coco", "table")
# One full-size PNG per mask: at 4096 x 4096 (the untiled path's largest input) a thousand
# masks are already 16 G pixels to compress; above it the label TIFF says the same in one file.
PNG_MAX_PIXELS = 4096 * 4096


def check_tiled_formats(formats: Sequence[str], height: int, width: int) -> None:
    """Refuse (InputError) formats that do not fit a height x width image: png above
    PNG_MAX_PIXELS, coco at 2**32 pixels or more; the message names the formats that fit."""
    fit = [f for f in DEFAULT_TILED_FORMATS if f != "coco" or height * width <= MAX_RLE_PIXELS]
    if "png" in formats and height * width > PNG_MAX_PIXELS:
        raise InputError(
            f"{{formats}} png writes one full-size PNG per mask, not for a {width} x {height} image "
            f"(above 4096 x 4096): use {{formats}} {' '.join(fit)} (label TIFF, COCO RLE JSON, object table)",
            "formats",
        )
    if "coco" in formats and height * width > MAX_RLE_PIXELS:
        raise InputError(
            f"{{formats}} coco: COCO RLE counts in 32 bits, too few for a {width} x {height} image "
            f"(2**32 pixels or more): use {{formats}} {' '.join(fit)}",
            "formats",
        )


class HugeImageOutputs(OutputWriter):
    """The output files of one huge image: finals(), complete(), clean(), then commit().

    Args:
        output: the run's output folder.
        item: the image; its stem names the outputs.
        formats: any of TILED_FORMATS (DEFAULT_TILED_FORMATS when tiling, unless asked for less).
    """

    def __init__(self, output: Path, item: ImageItem, formats: Sequence[str] = DEFAULT_TILED_FORMATS) -> None:
        self.formats = tuple(formats)
        if not self.formats or any(f not in TILED_FORMATS for f in self.formats):
            raise ValueError(f"formats {self.formats} must be one or more of {TILED_FORMATS}")
        stem = Path(output) / item.stem
        self.item = item
        self.labels = stem.with_name(stem.name + ".labels.tif") if "labels" in self.formats else None
        self.coco = stem.with_name(stem.name + ".json") if "coco" in self.formats else None
        self.table = stem.with_name(stem.name + ".objects.csv") if "table" in self.formats else None
        self.pngs = ImageOutputs(Path(output), item, ["png"], overlay=False) if "png" in self.formats else None

    def finals(self) -> list[Path]:
        """The paths this image's outputs will have (the png folder as a folder)."""
        pngs = self.pngs.finals() if self.pngs is not None else []
        return [p for p in (self.labels, self.coco, self.table) if p is not None] + pngs

    def complete(self) -> bool:
        """Whether every output is there, finished (an interrupted run leaves some out)."""
        if self.pngs is not None and not self.pngs.complete():
            return False
        return all(p.exists() for p in (self.labels, self.coco, self.table) if p is not None)

    def clean(self) -> None:
        """Remove what an interrupted run left: partial files, a half-made png folder."""
        for path in (self.labels, self.coco, self.table):
            if path is not None:
                _remove(_partial(path))
        if self.pngs is not None:
            self.pngs.clean()

    def check(self, height: int, width: int) -> None:
        """Refuse (InputError) formats that do not fit the image: call it before segmenting."""
        check_tiled_formats(self.formats, height, width)

    def commit(self, masks: Sequence[MaskCrop], height: int, width: int, *, geo: Optional[GeoInfo] = None) -> None:
        """Write every output under its .partial name, then rename them all into place, the table
        last; on any failure the partial files go and the outputs of an earlier run stay as they were.

        Args:
            masks: the image's masks in id order (mask i has id i + 1), crops in whole-image pixels.
            height, width: the image size.
            geo: the input's georeferencing (ImageSource.geo): a GeoTIFF label image and
                "crs" / "transform" in the JSON's image entry.
        """
        self.check(height, width)
        for path in self.finals():
            path.parent.mkdir(parents=True, exist_ok=True)
        saves = {
            self.labels: lambda f: save_label_tiff(f, masks, height, width, geo=geo),
            self.coco: lambda f: save_coco(f, masks, height, width, file_name=self.item.name, geo=geo),
            self.table: lambda f: f.write(object_table(object_records(masks)).encode()),
        }
        staged = [path for path in saves if path is not None]
        try:
            for path in staged:
                _save(_partial(path), saves[path])
            if self.pngs is not None:
                self._write_pngs(masks, height, width)  # renamed into place by ImageOutputs.commit
            for path in staged:
                os.replace(_partial(path), path)
        except BaseException:
            for path in staged:
                _partial(path).unlink(missing_ok=True)
            raise

    def _write_pngs(self, masks: Sequence[MaskCrop], height: int, width: int) -> None:
        self.pngs.begin(self.item, np.broadcast_to(np.zeros(3, np.uint8), (height, width, 3)), [])  # only its shape is used
        for record, crop in zip(object_records(masks), masks):
            record.pop("id")  # amg.py's numbering in the folder: the file index
            full = np.zeros((height, width), bool)  # one at a time, at most PNG_MAX_PIXELS
            x0, y0, x1, y1 = crop.box
            full[y0:y1, x0:x1] = crop.mask
            self.pngs.add(record, full)
        self.pngs.commit()
