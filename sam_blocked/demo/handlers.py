"""The web demo's handlers: what each event does, and the stateless `segment` endpoint.

The Gradio layout is `demo_ui.py`; the per-session state and the view it renders are
`demo_session.py`; settings and the shared models are `demo_settings.py`; the memory panel is
`demo_memory.py`. Everything a click does is reached from here, so it can be tested by
calling the handlers directly.
Two kinds of state, kept apart:

- per session: a `DemoSession` in gr.State (the image, its embedding or kept tile
  embeddings, the prompts, the masks, the memory report, the download files);
- shared: models, built once per `ModelSettings` by `shared_model`, an lru_cache. A cached
  model is always stock; an encode patches it for its own duration (`patched`). The UI
  runs every event that may encode in one concurrency group of one, so two sessions never
  encode on the same model at once and the memory peaks are their own.

An image that fits the model's input size (or any image, with large_images "whole") is
encoded whole at upload, as SamPredictor does. A larger one is segmented tile by tile at
native resolution (sam_blocked.interactive.tiled): it is shown reduced, a click encodes
the tile around its prompts once (kept for further clicks there), and the mask comes
back at full size, offered as a PNG of the image's size.

Every handler returns `(session, *view)`: see `VIEW` for the order of the outputs.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import gradio as gr
import numpy as np
from PIL import Image

from sam_blocked.demo.session import VIEW, DemoSession, check_whole, decode, is_tiled, prepare, view  # noqa: F401  (VIEW: demo_ui's)
from sam_blocked.demo.export import EXPORTS, export  # noqa: F401  (EXPORTS: demo_ui's)
from sam_blocked.demo.memory_panel import format_memory  # noqa: F401  (re-exported: demo.X is the UI's and the tests' name)
from sam_blocked.demo.settings import DemoSettings, banner, check_settings, list_examples, list_server_images, shared_model  # noqa: F401  (as format_memory)
from sam_blocked.errors import InputError
from sam_blocked.inputs.sources import open_image
from sam_blocked.interactive.whole import Prompts, check_clicks, encode, load_image, mask_image, parse_prompts, predict, segment_everything
from sam_blocked.interactive.tiled import TileCache, full_mask, segment_everything_tiled, segment_in_tile
from sam_blocked.models.load import ModelSettings
from sam_blocked.memory.measure import MIB  # noqa: F401  (demo_ui's upload cap)
from sam_blocked.tiles.plan import Tiling

MODES = (("Foreground point", "fg"), ("Background point", "bg"), ("Box (two clicks)", "box"))


def _user_errors(handler: Callable) -> Callable:
    """Show ValueError / OSError as a Gradio error message (no traceback)."""

    @functools.wraps(handler)
    def wrapper(*args, **kwargs):
        try:
            return handler(*args, **kwargs)
        except (ValueError, OSError) as error:
            raise gr.Error(str(error), print_exception=False) from None

    return wrapper


# ---------------------------------------------------------------------------- handlers


@_user_errors
def on_settings(
    settings: DemoSettings,
    model_type: str,
    checkpoint: Optional[str],
    device: Optional[str],
    dtype: str,
    img_size: float,
    chunks: float,
    max_block_mb: Optional[float],
    measure_stock: bool,
    large_images: str = "tiles",
) -> tuple[DemoSettings, dict]:
    """New settings from the settings panel's values (max_block_mb 0 or empty: use chunks); returns (settings, banner)."""
    if img_size is None or chunks is None or img_size != int(img_size) or chunks != int(chunks):
        raise ValueError(f"input size ({img_size}) and chunks ({chunks}) must be whole numbers")
    model = ModelSettings(model_type, checkpoint or None, device or None, dtype, int(img_size), settings.model.seed)
    new = dataclasses.replace(
        settings,
        model=model,
        chunks=int(chunks),
        max_block_mb=float(max_block_mb) if max_block_mb else None,
        measure_stock=bool(measure_stock),
        large_images=large_images,
    )
    check_settings(new)
    shared_model(new.model)  # a bad checkpoint is refused now, not at the next click
    return new, gr.update(value=banner(new), visible=new.random_weights)


def _load_image(path: str, settings: DemoSettings) -> tuple[np.ndarray, list[str]]:
    """load_image under the demo's pixel cap; a refusal names the flag that sets that cap."""
    cap, flag = settings.pixel_cap
    try:
        return load_image(path, cap, settings.max_upload_mb)
    except InputError as error:
        raise ValueError(error.spelled({"max_pixels": flag})) from None


@_user_errors
def on_image(path: Optional[str], session: DemoSession, settings: DemoSettings) -> tuple:
    """A new image (upload, example, or cleared): encode it once (or get it ready for tiles), forget the old prompts."""
    session.close()
    if path is None:
        return view(DemoSession())
    image, notes = _load_image(path, settings)
    session = prepare(DemoSession(image=image, name=Path(path).name), settings)
    if notes:
        session.message += f" Note: {'; '.join(notes)}."
    return view(session)


READ_FLAGS = {"level": "--level", "mpp": "--mpp", "channels": "--channels", "max_pixels": "--max-pixels"}


@_user_errors
def on_server_image(path: Optional[str], session: DemoSession, settings: DemoSettings, allowed: Sequence[str] = ()) -> tuple:
    """An image on the server (a slide, an OME-Zarr, a TIFF from --slides): read window by window at
    settings.read's level and channels, shown from a low-resolution level; a click encodes its tile.

    Args:
        path: one of `allowed` (the listed images); anything else is refused.
    """
    session.close()
    if not path:
        return view(DemoSession())
    if path not in allowed:
        raise ValueError(f"{path} is not one of the images this demo was started with (--slides)")
    try:
        source = open_image(path, settings.max_pixels, settings.read)
    except InputError as error:
        raise ValueError(f"{Path(path).name}: {error.spelled(READ_FLAGS)}") from None
    try:
        session = prepare(DemoSession(image=source, name=Path(path).name, path=path), settings)
    except InputError as error:
        source.close()
        raise ValueError(f"{Path(path).name}: {error.spelled(READ_FLAGS)}") from None
    except BaseException:
        source.close()
        raise
    if source.notes:
        session.message += f" Note: {'; '.join(source.notes)}."
    return view(session)


@_user_errors
def on_encode(session: DemoSession, settings: DemoSettings) -> tuple:
    """Encode the current image again with new settings, keeping its prompts."""
    if session.image is None:
        session.message = "Settings applied: they are used for the next image."
        return view(session)
    opened = prepare(session, settings).message
    if not session.prompts.empty:
        session.message = f"{opened} {decode(session).message}"
    return view(session)


@_user_errors
def on_click(session: DemoSession, mode: str, evt: gr.SelectData) -> tuple:
    """A click on the canvas at `evt.index` = [x, y] of its pixels: a point (fg / bg) or a box corner.

    On a tiled image the canvas is the reduced preview: the click is mapped back to full resolution.
    """
    if not session.ready:
        raise ValueError("no image yet: upload one or pick an example first")
    x, y = (float(v) for v in evt.index)
    shown = session.preview.image.shape[:2] if session.tiled else session.image.shape[:2]
    check_clicks(Prompts(points=((x, y),), labels=(1,)), shown)
    if session.tiled:
        x, y = session.preview.to_full(x, y)
    p = session.prompts
    if mode == "box":
        if p.corner is None:
            session.history.append(p)
            session.prompts = dataclasses.replace(p, corner=(x, y))
            session.message = "Box: now click the opposite corner."
            return view(session)
        (cx, cy) = p.corner
        box = (min(cx, x), min(cy, y), max(cx, x), max(cy, y))
        if box[0] == box[2] or box[1] == box[3]:
            raise ValueError("that box has no area: click two opposite corners")
        new = dataclasses.replace(p, box=box, corner=None)
    elif mode in ("fg", "bg"):
        new = dataclasses.replace(p, points=(*p.points, (x, y)), labels=(*p.labels, 1 if mode == "fg" else 0))
    else:
        raise ValueError(f"click mode {mode!r} is unknown: choose fg, bg or box")
    session.prompts = new
    try:
        decode(session)
    except ValueError:
        session.prompts = p  # refused (e.g. wider than a tile): the click is not kept
        raise
    session.history.append(p)
    return view(session)


@_user_errors
def on_undo(session: DemoSession) -> tuple:
    """Take back the last click."""
    if not session.history:
        session.message = "Nothing to undo."
        return view(session)
    session.prompts = session.history.pop()
    return view(decode(session))


def on_clear(session: DemoSession) -> tuple:
    """Remove every prompt and mask; the embeddings stay."""
    session.prompts, session.history, session.everything, session.everything_crops = Prompts(), [], None, None
    session.masks = session.scores = session.tile = session.saved = None
    session.message = "Cleared."
    return view(session)


def on_choose(session: DemoSession, choice: Optional[int]) -> tuple:
    """Show candidate mask `choice` (0-2) instead of the best-scoring one."""
    if session.scores is not None and choice is not None:
        session.chosen = int(choice)
    return view(session)


@_user_errors
def on_everything(
    session: DemoSession,
    points_per_side: float,
    pred_iou_thresh: float,
    stability_score_thresh: float,
    progress: gr.Progress = gr.Progress(),
) -> tuple:
    """"Segment everything": automatic masks over a grid of points, with a progress bar.

    On a tiled image: tile by tile at native resolution (points_per_side per tile), up to
    settings.max_everything_tiles tiles; beyond, a message gives the batch command.
    """
    if not session.ready:
        raise ValueError("no image yet: upload one or pick an example first")
    settings, side = session.settings, int(points_per_side)
    sam = shared_model(settings.model).sam
    report = lambda fraction, text: progress(fraction, desc=text)  # noqa: E731
    if not session.tiled:
        records = segment_everything(
            sam, session.image, session.embedding, points_per_side=side, pred_iou_thresh=float(pred_iou_thresh),
            stability_score_thresh=float(stability_score_thresh), progress=report,
        )  # fmt: skip
        session.everything, session.tile = records, None
        session.message = f"Segment everything: {len(records)} masks from {side ** 2} points."
        found = len(records)
    else:
        tiling = Tiling(settings.model.img_size)
        (h, w), tiles = session.image.shape[:2], len(tiling.boxes(*session.image.shape[:2]))
        if tiles > settings.max_everything_tiles:
            raise ValueError(
                f"Segment everything on this {w} x {h} image means {tiles} tiles of {tiling.tile} px, each encoded and "
                f"decoded at {side} x {side} points: more than this demo runs ({settings.max_everything_tiles} tiles, "
                f"--max-everything-tiles). Run it as a batch job instead: sam-blocked segment {session.name} --auto "
                f"--tile {tiling.tile} --output masks (label TIFF, COCO RLE and object table)"
            )
        result = segment_everything_tiled(
            sam, session.image, tiling, chunks=settings.chunks, max_block_mb=settings.max_block_mb, backend=settings.backend, points_per_side=side,
            pred_iou_thresh=float(pred_iou_thresh), stability_score_thresh=float(stability_score_thresh), progress=report,
        )  # fmt: skip
        session.everything_crops, session.tile = result.masks, None
        cut = sum(bool(m.record["truncated"]) for m in result.masks)
        session.message = (
            f"Segment everything: {len(result.masks)} masks from {result.encoder_passes} tiles of {tiling.tile} px at native "
            f"resolution ({side} x {side} points a tile; duplicates across tile borders removed; {cut} cut by a tile edge)."
        )
        found = len(result.masks)
    if not found and settings.random_weights:
        session.message += " (None pass the quality thresholds: the weights are random.)"
    return view(session)


def segment_api(image_path: Optional[str], prompts_json: str, settings: DemoSettings) -> tuple[Image.Image, dict]:
    """The "segment" endpoint: image file + JSON prompts -> (mask as a lossless PNG image, scores).

    Stateless: each call encodes its image, or on a tiled image the tile its prompts go to
    (info then names the tile). See `parse_prompts` for the JSON.
    """
    try:
        if image_path is None:
            raise ValueError("no image given: pass an image file (gradio_client.handle_file(path))")
        check_settings(settings)
        image, notes = _load_image(image_path, settings)
        prompts, index = parse_prompts(prompts_json, image.shape[:2])
        loaded = shared_model(settings.model)
        extra: dict[str, Any] = {}
        if is_tiled(image, settings):
            tile = segment_in_tile(
                loaded.sam, image, prompts, Tiling(settings.model.img_size), TileCache(), settings.encode_key,
                chunks=settings.chunks, max_block_mb=settings.max_block_mb, backend=settings.backend, stock_limit_bytes=None,
            )  # fmt: skip
            scores, report = tile.scores, tile.report
            index = int(np.argmax(scores)) if index is None else index
            mask = full_mask(tile.crops[index], image.shape[:2])
            extra = {"tile": list(tile.task.box), "truncated": bool(tile.crops[index].record["truncated"])}
        else:
            check_whole(image, settings, Path(image_path).name)
            embedding, report = encode(loaded.sam, image, chunks=settings.chunks, max_block_mb=settings.max_block_mb, backend=settings.backend)
            masks, scores = predict(loaded.sam, embedding, prompts)
            index = int(np.argmax(scores)) if index is None else index
            mask = masks[index]
    except (ValueError, OSError) as error:
        raise gr.Error(str(error), print_exception=False) from None
    info = {
        "scores": [round(float(s), 6) for s in scores],
        "mask_index": index,
        "width": image.shape[1],
        "height": image.shape[0],
        "model": loaded.description,
        "random_weights": loaded.random_weights,
        "patched_peak_bytes": report.patched_bytes,
        **extra,
        "notes": notes,
    }
    return mask_image(mask), info


def on_export(session: DemoSession, kind: str) -> Any:
    """"Download for viewers": what is shown, written as `kind` (sam_blocked.demo.export), on the export button."""
    path = export(session, kind)
    return gr.update(value=str(path), visible=True, label=f"Download {path.name}")
