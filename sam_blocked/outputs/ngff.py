"""The label image as OME-Zarr (NGFF) labels: what napari (napari-ome-zarr), Fiji (MoBIE) and QuPath read.

An NGFF `labels/<name>` group with `multiscales` (levels s0, s1, ... halving by nearest
down-sampling, sam_blocked.outputs.pyramid) and `image-label` metadata, written by
ome-zarr-py's `write_multiscale_labels` from dask arrays whose every chunk is painted
from the mask crops when zarr stores it: level 0 chunk by chunk, then each lower level
chunk by chunk, so memory is a few chunks (CHUNK x CHUNK x 4 bytes each, one per dask
thread) plus the crops, never the image.

Two places:

- standalone, `<stem>.ome.zarr/labels/<name>` in the output folder (the root holds only
  the labels: open it beside the image in napari, or `labels/<name>` alone). Scale: the
  input's level-0 pixels (`downsample * 2**k`), or micrometres when the pixel size is known.
- inside the input's own OME-Zarr (`labels_into_input`): `<input>/labels/<name>`, listed in
  `<input>/labels`' metadata, in the input's NGFF version (0.4 / zarr v2 or 0.5 / zarr v3), its
  scale that of the segmented level of the input's multiscales times 2**k, so viewers lay it
  over the image.

Each is written under a staging name and renamed into place: a failure leaves the input's
other labels and any earlier run's labels as they were. Needs ome-zarr and dask (the `ome` extra).
"""

from __future__ import annotations

import json
import os
from functools import partial
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from sam_blocked.errors import InputError
from sam_blocked.outputs.frame import Frame
from sam_blocked.outputs.pyramid import LabelPainter, level_shapes
from sam_blocked.tiles.crops import MaskCrop

INSTALL_OME = 'pip install "sam-blocked[ome]"'
LABEL_NAME = "sam"
CHUNK = 1024
DASK_THREADS = 4


def have_ome_zarr() -> bool:
    return find_spec("ome_zarr") is not None and find_spec("dask") is not None


def is_ome_zarr(path: str | os.PathLike) -> bool:
    """Whether `path` is an OME-Zarr image group: a folder whose zarr metadata has `multiscales`."""
    return _multiscales(Path(path)) is not None


def _ome_attributes(path: Path) -> Iterator[dict]:
    """The OME attributes of the zarr group at `path`, from each metadata file it has that
    reads: zarr v3's zarr.json (under attributes.ome), then v2's .zattrs."""
    for name, nested in (("zarr.json", True), (".zattrs", False)):
        try:
            attrs = json.loads((path / name).read_text())
        except (OSError, ValueError):
            continue
        yield attrs.get("attributes", {}).get("ome", {}) if nested else attrs


def _multiscales(path: Path) -> Optional[dict]:
    for attrs in _ome_attributes(path):
        scales = attrs.get("multiscales")
        if scales:
            return scales[0]
    return None


def input_scale(path: Path, frame: Frame) -> list[float]:
    """The (y, x) scale of the segmented level in the input's multiscales (1, 1 when it has none)."""
    scales = _multiscales(path) or {}
    datasets = scales.get("datasets", [])
    if frame.level < len(datasets):
        for t in datasets[frame.level].get("coordinateTransformations", []):
            if t.get("type") == "scale":
                return [float(v) for v in t["scale"][-2:]]
    return [frame.downsample, frame.downsample]


def label_pyramid(masks: Sequence[MaskCrop], height: int, width: int, chunk: int = CHUNK) -> list[Any]:
    """Dask arrays, level 0 first, each chunk painted on demand (LabelPainter.window)."""
    import dask.array as da

    painter = LabelPainter(masks, height, width)
    levels = []
    for k, (h, w) in enumerate(level_shapes(height, width, chunk)):
        chunks = (_split(h, chunk), _split(w, chunk))
        levels.append(da.map_blocks(partial(_paint, painter, 2**k), dtype=np.uint32, chunks=chunks, meta=np.empty((0, 0), np.uint32)))
    return levels


def _split(n: int, chunk: int) -> tuple[int, ...]:
    return tuple(min(chunk, n - i) for i in range(0, n, chunk))


def _paint(painter: LabelPainter, step: int, block_info: Optional[dict] = None) -> np.ndarray:
    (y0, y1), (x0, x1) = block_info[None]["array-location"]
    return painter.window(x0, y0, x1, y1, step)  # (y1 - y0, x1 - x0)


def write_label_group(
    root: Path, masks: Sequence[MaskCrop], height: int, width: int, *, scale: Sequence[float], unit: Optional[str],
    name: str = LABEL_NAME, zarr_format: Optional[int] = None, chunk: Optional[int] = None, in_image: bool = False,
) -> Path:
    """Write `root/labels/<name>` (root a new folder made into a zarr group). Returns that group's path.

    Args:
        root: the group to hold `labels/`; created.
        masks, height, width: the label image (mask i has id i + 1).
        scale: (y, x) size of a level-0 label pixel; level k's is 2**k times it.
        unit: the axes' unit ("micrometer"), or None.
        zarr_format: 2 (NGFF 0.4) or 3 (NGFF 0.5); None: ome-zarr's current format.
        in_image: the labels will sit in an image's `labels/` (image-label's source: ../../).
        chunk: chunk side (default CHUNK); the pyramid stops at the first level within one chunk.
    """
    import dask
    import zarr
    from ome_zarr.format import FormatV04, CurrentFormat
    from ome_zarr.writer import write_multiscale_labels

    import warnings

    chunk = chunk or CHUNK
    fmt = FormatV04() if zarr_format == 2 else CurrentFormat()
    group = zarr.open_group(str(root), mode="w", zarr_format=fmt.zarr_format)
    pyramid = label_pyramid(masks, height, width, chunk)
    transforms = [[{"type": "scale", "scale": [s * 2**k for s in scale]}] for k in range(len(pyramid))]
    axes = [{"name": a, "type": "space", **({"unit": unit} if unit else {})} for a in ("y", "x")]
    with dask.config.set(scheduler="threads", num_workers=DASK_THREADS), warnings.catch_warnings():
        # ome-zarr 0.18 prefers `scale` + `scale_factors`, which compute a pyramid; ours is given, with its scales
        warnings.filterwarnings("ignore", "The 'coordinate_transformations' argument is deprecated", DeprecationWarning)
        write_multiscale_labels(
            pyramid, group, name, fmt=fmt, axes=axes, coordinate_transformations=transforms,
            storage_options={"chunks": (chunk, chunk)}, label_metadata={"source": {"image": "../../"}} if in_image else {},
        )  # fmt: skip
    return root / "labels" / name


def check_input(path: Path) -> None:
    """Refuse (InputError) writing labels into an input that is not an OME-Zarr image on disk."""
    if not is_ome_zarr(path):
        raise InputError(f"{{labels_into_input}} writes NGFF labels into an OME-Zarr input; {path.name} is not one (no multiscales)", "labels_into_input")


def register_label(image: Path, name: str) -> None:
    """List `name` in `image/labels`' metadata (once), creating that group if needed, in the image's format."""
    import zarr
    from ome_zarr.writer import add_metadata, check_format, get_metadata

    root = zarr.open_group(str(image), mode="r+")
    fmt = check_format(root)
    labels = root.require_group("labels")
    names = [n for n in get_metadata(labels).get("labels", []) if n != name] + [name]
    add_metadata(labels, {"labels": names}, fmt=fmt)


def is_registered(image: Path, name: str) -> bool:
    """Whether `image/labels/<name>` exists and is listed in `image/labels`' metadata."""
    path = image / "labels"
    attrs = next(_ome_attributes(path), None)
    return attrs is not None and name in attrs.get("labels", []) and (path / name).is_dir()


def input_zarr_format(image: Path) -> int:
    return 3 if (image / "zarr.json").is_file() else 2


def install_label(staged: Path, image: Path, name: str) -> None:
    """Move a label group written by write_label_group (under `staged`) to `image/labels/<name>`,
    swapping out an older one, and list it."""
    from sam_blocked.outputs.images import _remove

    final = image / "labels" / name
    old = final.with_name(f".{name}.replaced")
    _remove(old)
    if final.exists():
        os.replace(final, old)
    os.replace(staged / "labels" / name, final)
    register_label(image, name)
    _remove(old)


def frame_scale(frame: Frame) -> tuple[list[float], Optional[str]]:
    """A standalone store's (y, x) level-0 scale and unit: micrometres when known, else level-0 pixels."""
    if frame.mpp is not None:
        return [frame.mpp, frame.mpp], "micrometer"
    return [frame.downsample, frame.downsample], None
