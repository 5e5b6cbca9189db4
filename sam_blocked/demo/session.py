"""The web demo's per-session state and what it does with it: get an image ready, decode prompts, render the view.

A `DemoSession` lives in gr.State, one per browser session, never shared. It holds the
image, its embedding when it is encoded whole (once per image and settings: clicks only
run the mask decoder), or, for an image larger than the model's input, its reduced
`Preview` and the tile embeddings kept so far (sam_blocked.interactive.tiled); the
prompts, the last masks and scores, the memory report of the last encode, and the files
offered for download (in a temporary folder that goes with the session).

`view(session)` gives the outputs every handler returns, in the order of `VIEW`.
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import gradio as gr
import numpy as np

from sam_blocked.demo.memory_panel import format_memory
from sam_blocked.demo.settings import DemoSettings, check_settings, shared_model
from sam_blocked.interactive.whole import (
    Embedding,
    MemoryReport,
    Prompts,
    encode,
    label_image,
    mask_image,
    predict,
    render_everything,
    render_overlay,
)
from sam_blocked.interactive.tiled import (
    PREVIEW_SIDE,
    Preview,
    TileCache,
    TileMasks,
    preview_labels,
    render_crops,
    render_tile,
    save_labels_tiff,
    save_mask_png,
    segment_in_tile,
)
from sam_blocked.inputs.base import ImageSource
from sam_blocked.inputs.sources import overview
from sam_blocked.tiles.crops import MaskCrop
from sam_blocked.tiles.plan import Tiling

VIEW = ("session", "canvas", "choice", "mask", "download", "status", "memory")  # outputs of every handler, in order


@dataclass
class DemoSession:
    """One browser session's data, held in gr.State (never shared between sessions)."""

    image: Optional[np.ndarray | ImageSource] = None  # (H, W, 3) uint8, full resolution; or read window by window
    name: str = ""
    path: Optional[str] = None  # an image opened on the server (a slide, OME-Zarr): where its preview level is read
    settings: Optional[DemoSettings] = None  # what the embeddings were computed with
    embedding: Optional[Embedding] = None  # the whole image's, when it is encoded whole
    prompts: Prompts = Prompts()  # full-resolution pixels
    history: list[Prompts] = field(default_factory=list)  # for undo
    masks: Optional[np.ndarray] = None  # (3, H, W) bool, whole-image path
    scores: Optional[np.ndarray] = None  # (3,)
    chosen: int = 0
    everything: Optional[list[dict]] = None  # automatic masks of the whole-image path, while shown
    memory: Optional[MemoryReport] = None
    message: str = ""
    preview: Optional[Preview] = None  # set when the image goes tile by tile
    tiles: TileCache = field(default_factory=TileCache)  # kept tile embeddings
    tile: Optional[TileMasks] = None  # the prompts' tile and its three candidates
    everything_crops: Optional[list[MaskCrop]] = None  # automatic masks of the tiled path, while shown
    folder: Optional[str] = None  # where this session's downloads are written
    saved: Optional[tuple[Any, int, str]] = None  # (masks shown, chosen, file): the file is not written twice

    @property
    def tiled(self) -> bool:
        """Whether the image is segmented tile by tile (shown reduced)."""
        return self.preview is not None

    @property
    def ready(self) -> bool:
        """Whether clicks can be decoded: an image, encoded whole or taken tile by tile."""
        return self.image is not None and (self.embedding is not None or self.tiled)

    def download_path(self, suffix: str) -> Path:
        """<session folder>/<image stem><suffix>; the folder goes with the session (close)."""
        if self.folder is None:
            self.folder = tempfile.mkdtemp(prefix="sam_blocked_demo_")
            weakref.finalize(self, shutil.rmtree, self.folder, True)
        return Path(self.folder) / f"{Path(self.name).stem or 'image'}{suffix}"

    def close(self) -> None:
        """Remove this session's download files and close an image read by windows (gr.State's delete_callback, and a new image)."""
        if isinstance(self.image, ImageSource):
            self.image.close()
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder, self.saved = None, None


# ---------------------------------------------------------------------------- get ready, decode


def is_tiled(image: np.ndarray, settings: DemoSettings) -> bool:
    """Whether `image` goes tile by tile under `settings`: larger than the input size, and large_images "tiles"."""
    return settings.large_images == "tiles" and not Tiling(settings.model.img_size).fits(*image.shape[:2])


def check_whole(image: np.ndarray, settings: DemoSettings, name: str) -> None:
    h, w = image.shape[:2]
    if h * w > settings.max_pixels:
        raise ValueError(
            f"{name}: {w} x {h} = {w * h:,} pixels is above --max-pixels {settings.max_pixels:,} for an image encoded whole "
            "(three candidate masks at full size): choose tiles for large images under Settings, or raise --max-pixels"
        )


def prepare(session: DemoSession, settings: DemoSettings) -> DemoSession:
    """Get the session's image ready under `settings`: encoded whole, or shown reduced for tiles."""
    check_settings(settings)
    if session.settings is not None and session.settings.encode_key != settings.encode_key:
        session.tiles = TileCache()  # embeddings of other settings are never used again
    session.masks = session.scores = session.everything = session.everything_crops = session.tile = None
    if not is_tiled(session.image, settings):
        check_whole(session.image, settings, session.name)
        if isinstance(session.image, ImageSource):  # small enough to encode whole: decoded now, the file closed
            source = session.image
            session.image = source.read((0, 0, source.width, source.height))
            source.close()
        session.preview, session.tiles = None, TileCache()
        return encode_whole(session, settings)
    low = overview(session.path, settings.read, PREVIEW_SIDE) if isinstance(session.image, ImageSource) else None
    session.preview, session.embedding, session.settings = Preview.of(session.image, PREVIEW_SIDE, low=low), None, settings
    (h, w), (ph, pw), size = session.image.shape[:2], session.preview.image.shape[:2], settings.model.img_size
    level = ""
    if isinstance(session.image, ImageSource) and session.image.levels:
        source = session.image
        level = f" at level {source.level} (x{source.downsample:g} of level 0{'' if source.mpp is None else f', {source.mpp:g} um/px'})"
    session.message = (
        f"**{session.name}** ({w} x {h}{level}) is larger than the {size} px input: shown reduced to {pw} x {ph}. A click encodes "
        f"the {size} px tile around it at native resolution, once (kept for further clicks there), and the mask comes "
        "back at full size."
    )
    return session


def encode_whole(session: DemoSession, settings: DemoSettings) -> DemoSession:
    loaded = shared_model(check_settings(settings).model)
    session.embedding, session.memory = encode(
        loaded.sam, session.image, chunks=settings.chunks, max_block_mb=settings.max_block_mb, backend=settings.backend,
        stock_limit_bytes=settings.stock_limit_bytes,
    )
    session.settings = settings
    session.masks = session.scores = session.everything = None
    h, w = session.image.shape[:2]
    session.message = (
        f"Encoded **{session.name}** ({w} x {h}) with {loaded.model_type} "
        f"({'random weights' if loaded.random_weights else Path(settings.model.checkpoint).name}), {session.memory.blocking}, "
        f"in {session.memory.seconds:.1f} s, once: clicks now only run the mask decoder."
    )
    return session


def decode(session: DemoSession) -> DemoSession:
    session.everything = session.everything_crops = None
    if session.prompts.empty:
        session.masks = session.scores = session.tile = None
        session.message = "Click on the image: foreground / background points, or a box by two clicks."
        return session
    settings = session.settings
    sam = shared_model(settings.model).sam
    if session.tiled:
        tile = segment_in_tile(
            sam, session.image, session.prompts, Tiling(settings.model.img_size), session.tiles, settings.encode_key,
            chunks=settings.chunks, max_block_mb=settings.max_block_mb, backend=settings.backend, stock_limit_bytes=settings.stock_limit_bytes,
        )  # fmt: skip
        session.tile, session.scores, session.memory = tile, tile.scores, tile.report
    else:
        session.masks, session.scores = predict(sam, session.embedding, session.prompts)
    session.chosen = int(np.argmax(session.scores))
    p = session.prompts
    session.message = (
        f"{sum(p.labels)} foreground, {len(p.labels) - sum(p.labels)} background points"
        + (", a box" if p.box is not None else "")
        + f": mask {session.chosen + 1} of 3 has the best score, {session.scores[session.chosen]:.3f}."
    )
    if session.tiled:
        session.message += " " + tile_line(session.tile, session.chosen)
    return session


def tile_line(tile: TileMasks, chosen: int) -> str:
    """The info line's tile part: which tile, encoded or reused, and whether the mask is cut by it."""
    x0, y0, x1, y1 = tile.task.box
    how = f"encoded now in {tile.report.seconds:.1f} s" if tile.encoded else "reused (its embedding was kept: decoder only)"
    line = f"Tile [{x0}, {y0}, {x1}, {y1}] ({x1 - x0} x {y1 - y0} px at native resolution): {how}."
    if tile.crops[chosen].record["truncated"]:
        line += " The mask touches the tile's edge inside the image: the object may go on beyond it (a larger input size sees more)."
    return line


# ---------------------------------------------------------------------------- the view


def view(session: DemoSession) -> tuple:
    """(session, canvas, choice, mask, download, status, memory): the outputs every handler updates."""
    none = gr.update(choices=[], value=None)
    if session.image is None:
        return session, None, none, None, gr.update(value=None, visible=False), session.message or "Upload an image or pick an example.", format_memory(None)
    size = session.image.shape[:2]
    if session.everything is not None:
        canvas, labels = render_everything(session.image, session.everything), label_image(session.everything, size)
        mask, choice = labels, none
        download = saved_file(session, session.everything, ".labels.png", lambda path: labels.save(path))
    elif session.everything_crops is not None:
        crops = session.everything_crops
        canvas, mask, choice = render_crops(session.preview, crops), preview_labels(session.preview, crops), none
        download = saved_file(session, crops, ".labels.tif", lambda path: save_labels_tiff(crops, size, path))
    else:
        labels = [] if session.scores is None else [(f"mask {i + 1}: score {s:.3f}", i) for i, s in enumerate(session.scores)]
        choice = gr.update(choices=labels, value=session.chosen if labels else None)
        if session.tiled:
            crop = session.tile.crops[session.chosen] if session.tile is not None else None
            canvas = render_tile(session.preview, crop, session.prompts, session.tile.task.box if session.tile is not None else None)
            mask = None if crop is None else mask_image(session.preview.mask(crop))
            save = None if crop is None else (lambda path: save_mask_png(crop, size, path))
            download = None if crop is None else saved_file(session, session.tile, ".mask.png", save)
        else:
            chosen = session.masks[session.chosen] if session.masks is not None else None
            canvas = render_overlay(session.image, chosen, session.prompts)
            mask = mask_image(chosen) if chosen is not None else None
            download = None if chosen is None else saved_file(session, session.masks, ".mask.png", lambda path: mask.save(path))
    h, w = size
    what = "labels" if session.everything is not None or session.everything_crops is not None else "mask"
    button = gr.update(value=download, visible=download is not None, label=f"Download the {what} at full resolution ({w} x {h})")
    return session, canvas, choice, mask, button, session.message, format_memory(session.memory)


def saved_file(session: DemoSession, shown: Any, suffix: str, save: Callable[[Path], Any]) -> str:
    """The download file of what is shown (`shown` and the chosen candidate), written once."""
    if session.saved is not None and session.saved[0] is shown and session.saved[1] == session.chosen:
        return session.saved[2]
    path = session.download_path(suffix)
    save(path)
    session.saved = (shown, session.chosen, str(path))
    return str(path)
