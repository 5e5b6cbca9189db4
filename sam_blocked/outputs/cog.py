"""The label image as a Cloud-Optimized GeoTIFF: what QGIS, GDAL and web map servers read by ranges.

The flat label TIFF (sam_blocked.outputs.labels, window by window, with the input's CRS
and affine transform) is written first under a staging name, then rio-cogeo (GDAL)
rewrites it as a COG: 512 x 512 deflate tiles, overviews halving until the image fits one tile, by
GDAL's "nearest" resampling (ids are never averaged), BigTIFF when needed. GDAL works
through its block cache (GDAL_CACHE_MB) and a compressed temporary file on disk, never the
whole image in memory.
An input without georeferencing gets a COG without CRS (still tiled, with overviews).
Needs rasterio and rio-cogeo (the `geo` extra).
"""

from __future__ import annotations

import os
import warnings
from importlib.util import find_spec
from pathlib import Path
from typing import Optional, Sequence

from sam_blocked.inputs.geo import GeoInfo
from sam_blocked.outputs.images import _save
from sam_blocked.outputs.labels import CLASSIC_TIFF_BYTES, save_label_tiff
from sam_blocked.outputs.pyramid import level_shapes
from sam_blocked.tiles.crops import MaskCrop

INSTALL_COG = 'pip install "sam-blocked[geo]"'
BLOCK = 512
# GDAL's block cache defaults to 5% of the RAM (1.2 GiB here): bounded instead, so the COG's
# memory does not grow with the image (a 32000 px COG held 2.6 GiB with the default)
GDAL_CACHE_MB = 128


def have_cogeo() -> bool:
    return find_spec("rasterio") is not None and find_spec("rio_cogeo") is not None


def save_cog(path: str | os.PathLike, masks: Sequence[MaskCrop], height: int, width: int, *, geo: Optional[GeoInfo] = None) -> None:
    """Write the COG at `path` (a new file, written by name; a `.source` file beside it while it runs).

    Args:
        path: the file to write.
        masks: mask i gets id i + 1; crops in whole-image pixels.
        height, width: the image size.
        geo: the input's CRS and transform, kept in the COG.

    Raises:
        ValueError: rasterio or rio-cogeo is not installed.
    """
    if not have_cogeo():
        raise ValueError(f"a Cloud-Optimized GeoTIFF needs rasterio and rio-cogeo: {INSTALL_COG}")
    from rasterio.errors import NotGeoreferencedWarning
    from rio_cogeo.cogeo import cog_translate
    from rio_cogeo.profiles import cog_profiles

    path = Path(path)
    source = path.with_name(path.name + ".source")
    try:
        _save(source, lambda f: save_label_tiff(f, masks, height, width, geo=geo, tile=BLOCK))
        profile = {**cog_profiles.get("deflate"), "blockxsize": BLOCK, "blockysize": BLOCK}
        if height * width * 4 > CLASSIC_TIFF_BYTES:
            profile["BIGTIFF"] = "YES"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            levels = len(level_shapes(height, width, BLOCK)) - 1  # halving until the image fits one block, as the OME-TIFF
            cog_translate(
                source, path, profile, overview_level=levels, overview_resampling="nearest", in_memory=False, quiet=True,
                config={"GDAL_CACHEMAX": GDAL_CACHE_MB}, allow_intermediate_compression=True,
            )  # fmt: skip
    finally:
        source.unlink(missing_ok=True)
