"""The label image of a huge image: uint32, one id per mask, a tiled deflate TIFF written window by window.

Mask i of the list (0-based) has id i + 1; 0 is background. Where masks overlap, the
smaller mask wins (fewer pixels; equal sizes: the higher id), interactive.label_image's
rule (masks painted largest first, in a stable sort), so an object lying on a larger one
stays visible. The COCO JSON and the object
table keep each mask whole; only this image shows one id per pixel.

The file is a tiled (256 x 256 by default), deflate-compressed TIFF that GDAL, QGIS,
Fiji, napari and tifffile open. It is BigTIFF when the uncompressed labels would pass
tifffile's limit for classic TIFF (2**32 - 2**25 bytes: about 1.07 G pixels, e.g. above
32000 x 33000), classic TIFF otherwise, which more programs read. With `geo` it is a
GeoTIFF with the input's CRS and transform (rasterio, the `geo` extra).

Memory: the tiles of one band of rows at full width (tile x width x 4 bytes: 40 MiB for
a 40000 px wide image) plus the masks' crops, never (height, width). Each band touches
only the masks whose crops meet it (masks bucketed by band once, in paint order).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO, Iterator, Optional, Sequence

import numpy as np
import tifffile

from sam_blocked.outputs.images import write_atomic
from sam_blocked.tiles.crops import MaskCrop
from sam_blocked.inputs.geo import INSTALL_GEO, GeoInfo, have_rasterio, stamp_geo

CLASSIC_TIFF_BYTES = 2**32 - 2**25  # tifffile's own threshold for switching to BigTIFF
DESCRIPTION = "sam_blocked labels: 0 background, id i = mask i in the object table and COCO JSON; smaller masks on top"


def check_crops(masks: Sequence[MaskCrop], height: int, width: int) -> None:
    """Refuse (ValueError) crops that are not 2-D bool or do not lie inside a height x width image."""
    for i, crop in enumerate(masks):
        if crop.mask.ndim != 2 or crop.mask.dtype != np.bool_:
            raise ValueError(f"mask {i}: its crop must be a 2-D bool array, got {crop.mask.shape} {crop.mask.dtype}")
        x0, y0, x1, y1 = crop.box
        if not (0 <= x0 <= x1 <= width and 0 <= y0 <= y1 <= height):
            raise ValueError(f"mask {i}: crop box {crop.box} lies outside the {width} x {height} image")


def paint_order(masks: Sequence[MaskCrop]) -> list[int]:
    """Mask indices in painting order: largest area first, equal areas in list order, so the last
    painted on a pixel (the winner) is the smallest mask there, then the highest id."""
    areas = [int(np.count_nonzero(crop.mask)) for crop in masks]
    return sorted(range(len(masks)), key=lambda i: -areas[i])  # stable


def band_buckets(masks: Sequence[MaskCrop], height: int, rows: int) -> list[list[int]]:
    """For each band of `rows` rows (the last may be shorter), the masks meeting it, in paint order."""
    buckets: list[list[int]] = [[] for _ in range(-(-height // rows))]
    for i in paint_order(masks):
        _, y0, _, y1 = masks[i].box
        for band in range(y0 // rows, -(-y1 // rows)):  # empty when the crop has no rows
            buckets[band].append(i)
    return buckets


def label_tiles(masks: Sequence[MaskCrop], height: int, width: int, tile: int = 256) -> Iterator[np.ndarray]:
    """The label image as TIFF tiles: row of tiles by row, left to right, each (tile, tile) uint32,
    zero beyond the image's right and bottom edges."""
    padded = -(-width // tile) * tile
    for band, members in enumerate(band_buckets(masks, height, tile)):
        top = band * tile
        labels = np.zeros((tile, padded), np.uint32)  # (tile, W'): a new one per band, tiles may still be queued
        for i in members:
            crop = masks[i]
            x0, y0, x1, _ = crop.box
            r0, r1 = max(y0, top), min(crop.box[3], top + tile)
            np.putmask(labels[r0 - top : r1 - top, x0:x1], crop.mask[r0 - y0 : r1 - y0], i + 1)
        for left in range(0, padded, tile):
            yield labels[:, left : left + tile]  # (tile, tile)


def save_label_tiff(f: BinaryIO, masks: Sequence[MaskCrop], height: int, width: int, *, geo: Optional[GeoInfo] = None, tile: int = 256) -> None:
    """Write the label image into `f`, a new binary file opened by name (GDAL reopens it for geo).
    Arguments as write_label_tiff."""
    if tile < 16 or tile % 16:
        raise ValueError(f"TIFF tile side {tile} must be a positive multiple of 16")
    if geo is not None and not have_rasterio():
        raise ValueError(f"a georeferenced label TIFF needs rasterio: {INSTALL_GEO}, or write it without geo")
    check_crops(masks, height, width)
    tifffile.imwrite(
        f,
        data=label_tiles(masks, height, width, tile),
        shape=(height, width),
        dtype=np.uint32,
        tile=(tile, tile),
        compression="zlib",
        photometric="minisblack",
        bigtiff=height * width * 4 > CLASSIC_TIFF_BYTES,
        description=DESCRIPTION,
        metadata=None,
    )
    if geo is not None:
        f.flush()
        stamp_geo(f.name, geo)  # GDAL edits the same file by name; the caller then fsyncs it


def write_label_tiff(
    path: str | os.PathLike,
    masks: Sequence[MaskCrop],
    height: int,
    width: int,
    *,
    geo: Optional[GeoInfo] = None,
    tile: int = 256,
) -> None:
    """Write the label image, atomically (a failure leaves no file and keeps an older one).

    Args:
        path: the .tif to write.
        masks: mask i gets id i + 1; crops in whole-image pixels.
        height, width: the image size.
        geo: the input's georeferencing: written as GeoTIFF tags (needs rasterio).
        tile: TIFF tile side, a multiple of 16.

    Raises:
        ValueError: a crop outside the image, a bad tile size, or geo without rasterio.
    """
    write_atomic(Path(path), lambda f: save_label_tiff(f, masks, height, width, geo=geo, tile=tile))
