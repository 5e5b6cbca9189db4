"""The files a tiled run writes for one huge image, each either complete or absent.

    OUT/<stem>.labels.tif      format labels: uint32 label image, tiled deflate (Geo)TIFF (outputs.labels)
    OUT/<stem>.json            format coco: COCO RLE per mask, SA-1B's layout (outputs.coco)
    OUT/<stem>.objects.csv     format table: one row per mask (outputs.table)
    OUT/<stem>/0.png, ...      format png: amg.py's mask folder, images up to PNG_MAX_PIXELS only
    OUT/<stem>.labels.ome.tif  format ome-tiff: the label image as a pyramidal OME-TIFF (outputs.ometiff)
    OUT/<stem>.labels.cog.tif  format cog: the label image as a Cloud-Optimized GeoTIFF (outputs.cog)
    OUT/<stem>.ome.zarr/       format ngff: OME-Zarr labels, labels/sam (outputs.ngff); with
                               labels_into_input, <input>/labels/sam inside an OME-Zarr input instead
    OUT/<stem>.geojson         format geojson: one polygon feature per mask, QuPath's layout (outputs.vector)
    OUT/<stem>.gpkg            format gpkg: the same polygons as a GeoPackage layer <stem>

where <stem> names the image as sam_blocked.outputs.images does. Every format shares ids:
mask i (0-based, in the order given) is id i + 1 in the label images, the JSON, the table
and the polygons. The png folder keeps amg.py's own numbering (<i>.png and metadata.csv id
i hold the mask of id i + 1). Every output is written under a `.NAME.partial` name (flushed
to disk), and only when all are written are they renamed into place, the table last:
`complete()` tells a finished image from an interrupted one, and a failure leaves no
partial file and never removes or mixes up the finished outputs of an earlier run.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import tifffile

from sam_blocked.inputs.images import ImageItem, InputError
from sam_blocked.outputs.images import ImageOutputs, _partial, _remove, _save
from sam_blocked.outputs.coco import MAX_RLE_PIXELS, save_coco
from sam_blocked.tiles.crops import MaskCrop
from sam_blocked.inputs.geo import GeoInfo
from sam_blocked.outputs.labels import save_label_tiff
from sam_blocked.outputs.table import object_records, object_table
from sam_blocked.outputs.writer import OutputWriter
from sam_blocked.outputs.frame import Frame
from sam_blocked.outputs import ngff
from sam_blocked.outputs.cog import save_cog
from sam_blocked.outputs.ometiff import save_ome_tiff
from sam_blocked.outputs.vector import save_geojson, save_gpkg

TILED_FORMATS = ("labels", "coco", "table", "png", "ome-tiff", "cog", "ngff", "geojson", "gpkg")
DEFAULT_TILED_FORMATS = ("labels", "coco", "table")
SUFFIXES = {
    "labels": ".labels.tif", "coco": ".json", "table": ".objects.csv", "ome-tiff": ".labels.ome.tif",
    "cog": ".labels.cog.tif", "ngff": ".ome.zarr", "geojson": ".geojson", "gpkg": ".gpkg",
}  # fmt: skip
FILES = ("labels", "coco", "ome-tiff", "cog", "ngff", "geojson", "gpkg", "table")  # written in this order, the table last
# One full-size PNG per mask: at 4096 x 4096 (the untiled path's largest input) a thousand
# masks are already 16 G pixels to compress; above it the label TIFF says the same in one file.
PNG_MAX_PIXELS = 4096 * 4096


SLIDE_SUFFIXES = (".svs", ".ndpi", ".mrxs", ".scn", ".bif", ".vms", ".vmu", ".qptiff", ".ome.tif", ".ome.tiff")
KIND_FORMATS = {
    "ome-zarr": ("ngff", "geojson", "table"),  # napari / Fiji: labels beside the image; QuPath: polygons
    "slide": ("ome-tiff", "geojson", "table"),  # QuPath, Fiji: a pyramid they open, polygons QuPath imports
    "geo": ("cog", "gpkg", "table"),  # QGIS: a COG with overviews, a GeoPackage in the scene's CRS
}
FORMAT_NEEDS = {"ome-tiff": (), "cog": ("rasterio", "rio_cogeo"), "ngff": ("ome_zarr", "dask"), "geojson": ("shapely",), "gpkg": ("shapely", "pyogrio")}
FORMAT_EXTRA = {"cog": "geo", "ngff": "ome", "geojson": "polygons", "gpkg": "polygons"}
GEO_KEYS = 34735  # GeoKeyDirectoryTag: a GeoTIFF


def missing_packages(formats: Sequence[str]) -> dict[str, str]:
    """The formats whose packages are not installed, each with the pip command that installs them."""
    from importlib.util import find_spec

    return {f: f'pip install "sam-blocked[{FORMAT_EXTRA[f]}]"' for f in formats if any(find_spec(m) is None for m in FORMAT_NEEDS.get(f, ()))}


def input_kind(path: str | os.PathLike) -> str:
    """"ome-zarr", "slide" (by suffix: SLIDE_SUFFIXES), "geo" (a TIFF with GeoTIFF keys) or "image"."""
    path = Path(path)
    if path.is_dir():
        return "ome-zarr" if ngff.is_ome_zarr(path) else "image"
    if path.name.lower().endswith(SLIDE_SUFFIXES):
        return "slide"
    try:
        with tifffile.TiffFile(path) as tif:
            return "geo" if GEO_KEYS in tif.pages.first.tags else "image"
    except Exception:  # not a TIFF, or unreadable: its reader says so later
        return "image"


def default_tiled_formats(path: str | os.PathLike) -> tuple[tuple[str, ...], list[str]]:
    """The formats a tiled run writes for this input when none were asked for, and a note when
    the kind's own formats need packages that are not installed (then DEFAULT_TILED_FORMATS)."""
    kind = input_kind(path)
    formats = KIND_FORMATS.get(kind, DEFAULT_TILED_FORMATS)
    missing = missing_packages(formats)
    if missing:
        fixes = sorted(set(missing.values()))
        return DEFAULT_TILED_FORMATS, [f"{kind} input: wrote {','.join(DEFAULT_TILED_FORMATS)}, not {','.join(formats)} ({'; '.join(fixes)})"]
    return formats, []


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
        simplify: polygon tolerance in pixels (geojson, gpkg); 0 keeps the pixel edges.
        labels_into_input: write the ngff labels into the input, an OME-Zarr image, not beside it.
    """

    def __init__(
        self, output: Path, item: ImageItem, formats: Sequence[str] = DEFAULT_TILED_FORMATS, *, simplify: float = 0.0, labels_into_input: bool = False
    ) -> None:
        self.formats = tuple(formats)
        if not self.formats or any(f not in TILED_FORMATS for f in self.formats):
            raise ValueError(f"formats {self.formats} must be one or more of {TILED_FORMATS}")
        if simplify < 0:
            raise ValueError(f"simplify {simplify} must be >= 0 pixels")
        stem = Path(output) / item.stem
        self.item, self.simplify = item, simplify
        self.into_input = labels_into_input and "ngff" in self.formats
        self.paths = {f: stem.with_name(stem.name + SUFFIXES[f]) for f in FILES if f in self.formats}
        if self.into_input:
            self.paths["ngff"] = Path(item.path) / "labels" / ngff.LABEL_NAME
        self.labels, self.coco, self.table = (self.paths.get(f) for f in ("labels", "coco", "table"))
        self.pngs = ImageOutputs(Path(output), item, ["png"], overlay=False) if "png" in self.formats else None
        self.notes: list[str] = []  # for the image's summary entry (default_tiled_formats' fallback)

    def finals(self) -> list[Path]:
        """The paths this image's outputs will have (the png folder and the zarr store as folders)."""
        pngs = self.pngs.finals() if self.pngs is not None else []
        return list(self.paths.values()) + pngs

    def complete(self) -> bool:
        """Whether every output is there, finished (an interrupted run leaves some out)."""
        if self.pngs is not None and not self.pngs.complete():
            return False
        if self.into_input and not ngff.is_registered(Path(self.item.path), ngff.LABEL_NAME):
            return False
        return all(p.exists() for p in self.paths.values())

    def clean(self) -> None:
        """Remove what an interrupted run left: partial files and stores, a half-made png folder."""
        for path in self.paths.values():
            for leftover in (_partial(path), _partial(path, ".replaced"), _partial(path, ".partial.source")):
                _remove(leftover)
        if self.pngs is not None:
            self.pngs.clean()

    def check(self, height: int, width: int) -> None:
        """Refuse (InputError) formats that do not fit the image: call it before segmenting."""
        check_tiled_formats(self.formats, height, width)
        if self.into_input:
            ngff.check_input(Path(self.item.path))

    def commit(
        self, masks: Sequence[MaskCrop], height: int, width: int, *, geo: Optional[GeoInfo] = None, frame: Frame = Frame()
    ) -> None:
        """Write every output under its .partial name, then rename them all into place, the table
        last; on any failure the partial files go and the outputs of an earlier run stay as they were.

        Args:
            masks: the image's masks in id order (mask i has id i + 1), crops in whole-image pixels.
            height, width: the image size (the segmented level's).
            geo: the input's georeferencing (ImageSource.geo): a GeoTIFF label image and COG,
                "crs" / "transform" in the JSON's image entry, polygons in its CRS.
            frame: the segmented level and pixel size (Frame.of(source)): physical sizes in the
                OME-TIFF and NGFF, polygons in level-0 pixels.
        """
        self.check(height, width)
        for path in self.finals():
            path.parent.mkdir(parents=True, exist_ok=True)
        files = {
            "labels": lambda f: save_label_tiff(f, masks, height, width, geo=geo),
            "coco": lambda f: save_coco(f, masks, height, width, file_name=self.item.name, geo=geo),
            "ome-tiff": lambda f: save_ome_tiff(f, masks, height, width, frame=frame),
            "geojson": lambda f: save_geojson(f, masks, stem=self.item.stem, frame=frame, geo=geo, simplify=self.simplify),
            "table": lambda f: f.write(object_table(object_records(masks)).encode()),
        }
        by_name = {
            "cog": lambda p: save_cog(p, masks, height, width, geo=geo),
            "gpkg": lambda p: save_gpkg(p, masks, layer=Path(self.item.stem).name, frame=frame, geo=geo, simplify=self.simplify),
            "ngff": lambda p: self._write_ngff(p, masks, height, width, frame),
        }
        staged = [(f, path) for f, path in self.paths.items()]
        try:
            for f, path in staged:
                if f in files:
                    _save(_partial(path), files[f])
                else:
                    _remove(_partial(path))
                    by_name[f](_partial(path))
            if self.pngs is not None:
                self._write_pngs(masks, height, width)  # renamed into place by ImageOutputs.commit
            for f, path in staged:
                self._install(f, path)
        except BaseException:
            for _, path in staged:
                _remove(_partial(path))
            raise

    def _write_ngff(self, staging: Path, masks: Sequence[MaskCrop], height: int, width: int, frame: Frame) -> None:
        if self.into_input:
            image = Path(self.item.path)
            ngff.write_label_group(staging, masks, height, width, scale=ngff.input_scale(image, frame), unit=None,
                                   zarr_format=ngff.input_zarr_format(image), in_image=True)  # fmt: skip
        else:
            scale, unit = ngff.frame_scale(frame)
            ngff.write_label_group(staging, masks, height, width, scale=scale, unit=unit)

    def _install(self, f: str, path: Path) -> None:
        """Rename one staged output into place; a folder swaps with an older one, removed after."""
        staging = _partial(path)
        if f == "ngff" and self.into_input:
            ngff.install_label(staging, Path(self.item.path), ngff.LABEL_NAME)
            _remove(staging)
        elif staging.is_dir():
            old = _partial(path, ".replaced")
            _remove(old)
            if path.exists():
                os.replace(path, old)
            os.replace(staging, path)
            _remove(old)
        else:
            os.replace(staging, path)

    def _write_pngs(self, masks: Sequence[MaskCrop], height: int, width: int) -> None:
        self.pngs.begin(self.item, np.broadcast_to(np.zeros(3, np.uint8), (height, width, 3)), [])  # only its shape is used
        for record, crop in zip(object_records(masks), masks):
            record.pop("id")  # amg.py's numbering in the folder: the file index
            full = np.zeros((height, width), bool)  # one at a time, at most PNG_MAX_PIXELS
            x0, y0, x1, y1 = crop.box
            full[y0:y1, x0:x1] = crop.mask
            self.pngs.add(record, full)
        self.pngs.commit()
