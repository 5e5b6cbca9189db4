"""Polygon files of a huge image's masks: GeoJSON in QuPath's layout, and GeoPackage.

One feature per non-empty mask (an empty mask has no outline and no feature), its
`id` the mask's id in the label image, traced from its crop (sam_blocked.outputs.polygons),
one at a time: memory is one crop and its polygon (GeoPackage: a batch of BATCH polygons).

Coordinates, by input:

- not georeferenced: pixels of the input's level 0, x right, y down, pixel (r, c) the unit
  square [c, c + 1] x [r, r + 1] (segmented pixels times the frame's `downsample`): the
  frame QuPath uses for a slide whatever level was segmented;
- georeferenced: the scene's CRS, through its affine transform; the GeoJSON names the CRS
  (`"crs": {"type": "name", ...}`, as GDAL and QGIS read it) when it has an EPSG code,
  and the GeoPackage carries it in full.

A GeoJSON feature, as QuPath (0.4+) exports and imports them:

    {"type": "Feature", "id": "<uuid>", "geometry": {Polygon or MultiPolygon},
     "properties": {"objectType": "annotation" | "detection", "name": "cat 3", "id": 3,
                    "classification": {"name": "cat", "color": [r, g, b]},
                    "measurements": {"id": 3, "score": 0.93, "stability_score": 0.97,
                                     "area_px": 1234, "truncated": 0[, "area_um2": ...]}}}

Prompted masks are annotations classed by their prompt set's name; automatic masks (there may
be thousands) are detections of class "SAM". `area_px` counts the mask's segmented pixels.
"""

from __future__ import annotations

import json
import os
import uuid
import warnings
import zlib
from importlib.util import find_spec
from typing import Any, BinaryIO, Iterator, Optional, Sequence

import numpy as np

from sam_blocked.inputs.geo import GeoInfo
from sam_blocked.outputs.frame import Frame
from sam_blocked.outputs.polygons import INSTALL_POLYGONS, mask_polygon
from sam_blocked.outputs.table import object_records
from sam_blocked.tiles.crops import MaskCrop

AUTO_CLASS = "SAM"
BATCH = 1000  # GeoPackage features written per call
_NAMESPACE = uuid.UUID("6c2e4f0a-3b1d-4d8e-9a55-5a6d0c1b7e21")  # feature UUIDs: stable per image and id


def have_pyogrio() -> bool:
    return find_spec("pyogrio") is not None


def class_color(name: str) -> list[int]:
    """A stable colour per class name, [r, g, b] in 40..255."""
    h = zlib.crc32(name.encode())
    return [40 + (h >> s & 0xFF) * 215 // 255 for s in (0, 8, 16)]


def features(masks: Sequence[MaskCrop], *, frame: Frame = Frame(), geo: Optional[GeoInfo] = None, simplify: float = 0.0) -> Iterator[tuple[dict, Any]]:
    """(properties, shapely geometry) per non-empty mask, in id order, in the output frame."""
    import shapely

    for record, crop in zip(object_records(masks), masks):
        shape = mask_polygon(crop, simplify, scale=1.0 if geo is not None else frame.downsample)
        if shape is None:
            continue
        if geo is not None:
            a, b, c, d, e, f = geo.transform
            shape = shapely.affinity.affine_transform(shape, [a, b, d, e, c, f])
        shape = shapely.orient_polygons(shape)  # exterior counter-clockwise, holes clockwise (RFC 7946)
        prompted = "prompt" in record
        name = str(record.get("prompt_name") or AUTO_CLASS) if prompted else AUTO_CLASS
        measurements = {"id": record["id"], "score": record.get("predicted_iou"), "stability_score": record.get("stability_score"),
                        "area_px": record["area"], "truncated": int(bool(record["truncated"]))}
        if frame.mpp is not None:
            measurements["area_um2"] = record["area"] * frame.mpp**2
        properties = {
            "objectType": "annotation" if prompted else "detection",
            "name": f"{name} {record['id']}",
            "id": record["id"],
            "classification": {"name": name, "color": class_color(name)},
            "measurements": {k: _plain(v) for k, v in measurements.items() if v is not None},
        }
        yield properties, shape


def save_geojson(f: BinaryIO, masks: Sequence[MaskCrop], *, stem: str, frame: Frame = Frame(), geo: Optional[GeoInfo] = None, simplify: float = 0.0) -> None:
    """Write the FeatureCollection into `f`, one feature at a time. Arguments as write_features."""
    import shapely

    head: dict[str, Any] = {"type": "FeatureCollection"}
    epsg = _epsg(geo) if geo is not None else None
    if epsg is not None:
        head["crs"] = {"type": "name", "properties": {"name": f"urn:ogc:def:crs:EPSG::{epsg}"}}
    f.write(json.dumps(head).encode()[:-1] + b', "features": [')
    for i, (properties, shape) in enumerate(features(masks, frame=frame, geo=geo, simplify=simplify)):
        feature_id = str(uuid.uuid5(_NAMESPACE, f"{stem}/{properties['id']}"))
        text = f'{{"type": "Feature", "id": "{feature_id}", "geometry": {shapely.to_geojson(shape)}, "properties": {json.dumps(properties)}}}'
        f.write((",\n" if i else "\n").encode() + text.encode())
    f.write(b"\n]}\n")


GPKG_FIELDS = ("id", "object_type", "class", "score", "stability_score", "area_px", "truncated", "prompt_name")


def save_gpkg(path: str | os.PathLike, masks: Sequence[MaskCrop], *, layer: str, frame: Frame = Frame(), geo: Optional[GeoInfo] = None, simplify: float = 0.0) -> None:
    """Write the GeoPackage at `path` (a new file; GDAL writes it by name), BATCH features a call."""
    if not have_pyogrio():
        raise ValueError(f"a GeoPackage needs pyogrio: {INSTALL_POLYGONS}")
    import shapely
    from pyogrio.raw import write

    rows: list[tuple[dict, Any]] = []
    written = False

    def flush() -> None:
        nonlocal written
        if not rows and written:
            return
        geometry = np.array([shapely.to_wkb(s if s.geom_type == "MultiPolygon" else shapely.MultiPolygon([s])) for _, s in rows], dtype=object)
        m = [p["measurements"] for p, _ in rows]
        data = [
            np.array([p["id"] for p, _ in rows], np.int64),
            np.array([p["objectType"] for p, _ in rows], object),
            np.array([p["classification"]["name"] for p, _ in rows], object),
            np.array([x.get("score", np.nan) for x in m], np.float64),
            np.array([x.get("stability_score", np.nan) for x in m], np.float64),
            np.array([x["area_px"] for x in m], np.int64),
            np.array([x["truncated"] for x in m], np.int32),
            np.array([p["name"].rsplit(" ", 1)[0] if p["objectType"] == "annotation" else "" for p, _ in rows], object),
        ]
        with warnings.catch_warnings():  # staged under a .partial name, renamed to .gpkg when complete
            warnings.filterwarnings("ignore", "The filename extension should be", RuntimeWarning)
            warnings.filterwarnings("ignore", "'crs' was not provided", UserWarning)  # pixel coordinates: there is none
            write(str(path), geometry, data, GPKG_FIELDS, layer=layer, driver="GPKG", geometry_type="MultiPolygon",
                  crs=geo.crs if geo is not None else None, append=written)
        written = True
        rows.clear()

    for row in features(masks, frame=frame, geo=geo, simplify=simplify):
        rows.append(row)
        if len(rows) == BATCH:
            flush()
    flush()  # also makes the layer when there is no feature


def _epsg(geo: GeoInfo) -> Optional[int]:
    from rasterio.crs import CRS  # a GeoInfo comes from rasterio: it is installed

    return CRS.from_wkt(geo.crs).to_epsg()


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value
