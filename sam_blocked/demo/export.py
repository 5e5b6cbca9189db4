"""The demo's masks as files for viewers: pyramidal OME-TIFF labels, GeoJSON (QuPath), GeoPackage (QGIS).

Plain Python, no Gradio: `export(session, kind)` writes what the session shows (the
automatic masks after "Segment everything", else the chosen mask) with the batch run's
writers (sam_blocked.outputs), into the session's download folder, and returns the path.
Ids are the masks' positions + 1, as in a batch run's outputs; polygons are in the image's
pixels, labels at its full resolution.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from sam_blocked.outputs.images import write_atomic
from sam_blocked.outputs.ometiff import save_ome_tiff
from sam_blocked.outputs.vector import save_geojson, save_gpkg
from sam_blocked.tiles.crops import MaskCrop
from sam_blocked.tiles.tile import crop_of_mask

EXPORTS = {
    "Pyramidal OME-TIFF labels (QuPath, Fiji, napari)": ".labels.ome.tif",
    "GeoJSON polygons (QuPath: File > Import objects)": ".geojson",
    "GeoPackage polygons (QGIS)": ".gpkg",
}


def shown_crops(session: Any) -> Optional[list[MaskCrop]]:
    """The masks the session shows, as crops: every automatic mask, or the chosen candidate; None when none."""
    if session.everything_crops is not None:
        return list(session.everything_crops)
    if session.everything is not None:
        return [crop_of_mask(r["segmentation"], r) for r in session.everything]
    if session.tiled and session.tile is not None:
        return [session.tile.crops[session.chosen]]
    if session.masks is not None:
        return [crop_of_mask(session.masks[session.chosen], {"predicted_iou": float(session.scores[session.chosen]), "prompt": 0, "prompt_name": "click"})]
    return None


def export(session: Any, kind: str) -> Path:
    """Write what is shown as `kind` (a key of EXPORTS) and return the file's path.

    Raises:
        ValueError: nothing is shown yet, or an unknown kind.
    """
    if kind not in EXPORTS:
        raise ValueError(f"unknown export {kind!r}: choose one of {', '.join(EXPORTS)}")
    crops = shown_crops(session)
    if not crops:
        raise ValueError("no masks yet: click on the image or run Segment everything first")
    height, width = session.image.shape[:2]
    path = session.download_path(EXPORTS[kind])
    stem = Path(session.name).stem or "image"
    if path.suffix == ".gpkg":
        path.unlink(missing_ok=True)
        partial = path.with_name(f".{path.name}.partial")
        save_gpkg(partial, crops, layer=stem)
        partial.replace(path)
    elif path.suffix == ".geojson":
        write_atomic(path, lambda f: save_geojson(f, crops, stem=stem))
    else:
        write_atomic(path, lambda f: save_ome_tiff(f, crops, height, width))
    return path
