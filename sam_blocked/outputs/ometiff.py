"""The label image as a tiled, pyramidal OME-TIFF: what QuPath, Fiji (Bio-Formats) and napari open.

Level 0 is the uint32 label image (sam_blocked.outputs.labels' ids and overlap rule), in
256 x 256 deflate tiles; the lower resolutions are SubIFDs of it, each half the last, by
nearest down-sampling (sam_blocked.outputs.pyramid: level k == level 0[::2**k, ::2**k]),
until the image fits one tile. The OME-XML says the axes (YX) and, when the input's pixel
size is known, PhysicalSizeX / PhysicalSizeY in micrometres of the segmented level.

Written tile by tile from a generator: memory is one band of tile rows at the level's
width (tile x width x 4 bytes) plus the masks' crops, never (height, width).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO, Sequence

import numpy as np
import tifffile

from sam_blocked.outputs.frame import Frame
from sam_blocked.outputs.images import write_atomic
from sam_blocked.outputs.labels import CLASSIC_TIFF_BYTES
from sam_blocked.outputs.pyramid import LabelPainter, level_shapes
from sam_blocked.tiles.crops import MaskCrop


def save_ome_tiff(f: BinaryIO, masks: Sequence[MaskCrop], height: int, width: int, *, frame: Frame = Frame(), tile: int = 256) -> None:
    """Write the pyramidal OME-TIFF into the binary file `f`. Arguments as write_ome_tiff."""
    if tile < 16 or tile % 16:
        raise ValueError(f"TIFF tile side {tile} must be a positive multiple of 16")
    painter = LabelPainter(masks, height, width)
    shapes = level_shapes(height, width, tile)
    total = sum(h * w for h, w in shapes) * 4
    metadata: dict = {"axes": "YX", "Name": "sam_blocked labels"}
    if frame.mpp is not None:
        metadata.update(PhysicalSizeX=frame.mpp, PhysicalSizeXUnit="µm", PhysicalSizeY=frame.mpp, PhysicalSizeYUnit="µm")
    options = dict(dtype=np.uint32, tile=(tile, tile), compression="zlib", photometric="minisblack")
    with tifffile.TiffWriter(f, bigtiff=total > CLASSIC_TIFF_BYTES, ome=True) as tif:
        tif.write(painter.tiles(0, tile), shape=shapes[0], subifds=len(shapes) - 1, metadata=metadata, **options)
        for level, shape in enumerate(shapes[1:], 1):
            tif.write(painter.tiles(level, tile), shape=shape, subfiletype=1, metadata=None, **options)


def write_ome_tiff(
    path: str | os.PathLike, masks: Sequence[MaskCrop], height: int, width: int, *, frame: Frame = Frame(), tile: int = 256
) -> None:
    """Write the label image as a pyramidal OME-TIFF, atomically (a failure leaves no file).

    Args:
        path: the .ome.tif to write.
        masks: mask i gets id i + 1; crops in whole-image pixels.
        height, width: the image size (level 0).
        frame: the segmented level's pixel size, written as PhysicalSizeX/Y when known.
        tile: tile side, a multiple of 16; the pyramid stops at the first level within one tile.
    """
    write_atomic(Path(path), lambda f: save_ome_tiff(f, masks, height, width, frame=frame, tile=tile))
