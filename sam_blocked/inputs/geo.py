"""Georeferencing carried from a GeoTIFF input to the label GeoTIFF output, through rasterio.

The label image has the input's pixel grid, so the input's CRS and affine transform
describe it exactly. rasterio (GDAL) reads them and stamps them on the written label TIFF;
it is the optional extra `geo`: without it a georeferenced input is still segmented, with
a note that its outputs are not georeferenced, and asking to write georeferencing refuses
with the install command.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from importlib.util import find_spec
from typing import Optional

INSTALL_GEO = "pip install 'sam-blocked[geo]'"


@dataclass(frozen=True)
class GeoInfo:
    """Where an image's pixels lie on the Earth: plain values, so it pickles and goes into JSON.

    Args:
        crs: the coordinate reference system as WKT (what rasterio's CRS.to_wkt gives).
        transform: the affine pixel-to-CRS transform (a, b, c, d, e, f), rasterio's order:
            x = a * col + b * row + c, y = d * col + e * row + f, at pixel corners.
    """

    crs: str
    transform: tuple[float, float, float, float, float, float]

    def to_json(self) -> dict:
        return {"crs": self.crs, "transform": list(self.transform)}


def have_rasterio() -> bool:
    return find_spec("rasterio") is not None


def read_geo(path: str | os.PathLike) -> tuple[Optional[GeoInfo], list[str]]:
    """The CRS and transform of a file known to carry GeoTIFF tags.

    Returns:
        (geo, notes): geo is None, with a note saying why, when rasterio is not installed
        or the file has no usable CRS and transform (e.g. only ground control points).
    """
    if not have_rasterio():
        return None, [f"georeferenced (GeoTIFF tags), but rasterio is not installed: outputs will not be georeferenced; {INSTALL_GEO}"]
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path) as dataset:
            crs, transform = dataset.crs, dataset.transform
    if crs is None or transform.is_identity:
        what = "no CRS" if crs is None else "no affine transform (ground control points or RPCs only?)"
        return None, [f"has GeoTIFF tags but {what}: outputs will not be georeferenced"]
    return GeoInfo(crs.to_wkt(), tuple(transform)[:6]), [f"georeferenced ({crs.to_string()}): the label TIFF keeps its CRS and transform"]


def stamp_geo(path: str | os.PathLike, geo: GeoInfo) -> None:
    """Write `geo` into the TIFF at `path` in place (GDAL adds the GeoTIFF tags).

    Raises:
        ValueError: rasterio is not installed.
    """
    if not have_rasterio():
        raise ValueError(f"writing a georeferenced label TIFF needs rasterio: {INSTALL_GEO}, or write it without geo")
    import rasterio
    from affine import Affine
    from rasterio.errors import NotGeoreferencedWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)  # it is not, until the lines below
        with rasterio.open(path, "r+") as dataset:
            dataset.crs = rasterio.crs.CRS.from_wkt(geo.crs)
            dataset.transform = Affine(*geo.transform)


def scaled_geo(geo: Optional[GeoInfo], factor: float) -> Optional[GeoInfo]:
    """`geo` for pixels `factor` times as large (a pyramid level, a resampling): same origin, larger steps."""
    if geo is None or factor == 1:
        return geo
    a, b, c, d, e, f = geo.transform
    return GeoInfo(geo.crs, (a * factor, b * factor, c, d * factor, e * factor, f))
