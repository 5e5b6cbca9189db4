"""The web demo's library side: settings, per-session state, encode / decode / render, handlers.

The Gradio layout is `demo_ui.py`; everything a click does is here, so it can be tested
by calling the handlers directly. Two kinds of state, kept apart:

- per session: a `DemoSession` in gr.State. It holds the image, its embedding (from
  SamPredictor, computed once per image and settings: clicks only run the mask decoder),
  the prompts, the last masks and scores, and the memory report of the last encode;
- shared: models, built once per `ModelSettings` (sam_blocked.loading, frozen) by `load_model`, an lru_cache.
  A cached model is always stock; an encode patches it for its own duration
  (`patched`). The UI runs every event that encodes in one concurrency group of one, so
  two sessions never encode on the same model at once and the memory peaks are their own.

Every handler returns `(session, *view)`: see `VIEW` for the order of the outputs.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import gradio as gr
import numpy as np
import torch
from PIL import Image
from segment_anything import SamPredictor

from sam_blocked.attention import DEFAULT_CHUNKS, chunk_bands
from sam_blocked.loading import DTYPES, LoadedModel, ModelSettings
from sam_blocked.loading import load_model as load_settings
from sam_blocked.interactive import (
    MAX_PIXELS,
    MAX_UPLOAD_MB,
    Embedding,
    MemoryReport,
    Prompts,
    check_prompts,
    encode,
    format_bytes,
    label_image,
    load_image,
    mask_image,
    parse_prompts,
    predict,
    render_everything,
    render_overlay,
    segment_everything,
)
from sam_blocked.memory import MIB
from sam_blocked.models import ENCODER_CONFIGS, PATCH_SIZE
from sam_blocked.patch import patched

STOCK_LIMIT_MB = 4096.0
NOISE_BYTES = 8 * MIB  # differences of peak memory below this are not reported as savings
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")
MODES = (("Foreground point", "fg"), ("Background point", "bg"), ("Box (two clicks)", "box"))
VIEW = ("session", "canvas", "choice", "mask", "status", "memory")  # outputs of every handler, in order


# ---------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class DemoSettings:
    """Everything an encode depends on: the model, its blocking, the stock comparison, the caps."""

    model: ModelSettings = ModelSettings("vit_b", img_size=1024)  # the demo always names its input size
    chunks: int = DEFAULT_CHUNKS
    max_block_mb: Optional[float] = None
    measure_stock: bool = True  # run stock too when its attention estimate is below the limit
    stock_limit_mb: float = STOCK_LIMIT_MB
    max_pixels: int = MAX_PIXELS
    max_upload_mb: float = MAX_UPLOAD_MB

    @property
    def random_weights(self) -> bool:
        return self.model.checkpoint is None

    @property
    def stock_limit_bytes(self) -> Optional[int]:
        """`encode`'s limit for running stock too; None when the comparison is off."""
        return int(self.stock_limit_mb * MIB) if self.measure_stock else None


def check_settings(settings: DemoSettings) -> DemoSettings:
    """Refuse settings that cannot run, with what to change; returns `settings`."""
    model = settings.model
    if model.model_type not in ("auto", "default", *ENCODER_CONFIGS):
        raise ValueError(f"model type {model.model_type!r} is unknown: choose one of auto, default, {', '.join(ENCODER_CONFIGS)}")
    if model.dtype not in DTYPES:
        raise ValueError(f"dtype {model.dtype!r} is unknown: choose one of {', '.join(DTYPES)}")
    if isinstance(model.img_size, bool) or not isinstance(model.img_size, int) or model.img_size <= 0 or model.img_size % PATCH_SIZE:
        raise ValueError(f"input size {model.img_size!r} must be a positive multiple of {PATCH_SIZE} pixels, e.g. 1024")
    if model.checkpoint is not None and not Path(model.checkpoint).is_file():
        raise ValueError(f"checkpoint {model.checkpoint} is not a file: give the path of a SAM .pth")
    if model.device is not None:
        try:
            device = torch.device(model.device)
        except RuntimeError:
            raise ValueError(f"device {model.device!r} is not a torch device: use cpu, cuda or cuda:N") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {model.device}: CUDA is not available on this machine; use cpu")
    chunk_bands(settings.chunks)
    if settings.max_block_mb is not None and not settings.max_block_mb > 0:
        raise ValueError(f"memory budget {settings.max_block_mb!r} MiB must be > 0 (or empty to use chunks)")
    return settings


@functools.lru_cache(maxsize=2)
def load_model(settings: ModelSettings) -> LoadedModel:
    """The stock (unpatched) model for `settings`, built once and shared by every session.

    It encodes a blank image once, patched, so that one-time allocations (thread pools,
    allocator caches) are not counted in the first measured peak.
    """
    loaded = load_settings(settings, blocking=None)
    with patched(loaded.sam):
        SamPredictor(loaded.sam).set_image(np.zeros((PATCH_SIZE, PATCH_SIZE, 3), dtype=np.uint8))
    return loaded


def banner(settings: DemoSettings) -> str:
    """The warning shown while the model has random weights ("" with a checkpoint)."""
    if not settings.random_weights:
        return ""
    model_type = load_model(settings.model).model_type
    return (
        "⚠️ **Random weights: masks are meaningless until a checkpoint is given.** "
        f"Running {model_type} with seeded random weights (seed {settings.model.seed}). Start with "
        "`sam-blocked demo --checkpoint sam_vit_b_01ec64.pth` or pick one under Settings; "
        "the memory panel is real either way."
    )


def list_examples(folder: str | os.PathLike | None) -> list[str]:
    """Image files in `folder`, sorted; [] when there is none."""
    if folder is None or not Path(folder).is_dir():
        return []
    return sorted(str(p) for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def format_memory(report: Optional[MemoryReport]) -> str:
    """The memory panel's Markdown."""
    if report is None:
        return "**Memory**: load an image to measure its encode."
    saved = report.stock_bytes - report.patched_bytes
    stock_how = "measured" if report.stock_measured else "**estimate** \\*"
    where = "the CUDA allocator's peak" if report.device.startswith("cuda") else "the process's resident high-water mark"
    if saved > NOISE_BYTES:
        verdict = f"Saved: **{format_bytes(saved)}** ({100 * saved / report.stock_bytes:.0f}% of stock)."
    else:
        verdict = (
            f"No clear saving at this size: the difference is within measurement noise ({format_bytes(NOISE_BYTES)}); "
            f"stock's largest attention call needs only {format_bytes(report.stock_attention_bytes)}. Raise the input size to see it."
        )
    return "\n".join(
        [
            f"**Peak memory of the last encode**: {report.img_size} px input on {report.device}, "
            f"over what was in use before ({where}). The patched encode took {report.seconds:.1f} s.",
            "",
            "| encoder | peak of the encode |",
            "|---|---|",
            f"| patched ({report.blocking}) | {format_bytes(report.patched_bytes)}, measured |",
            f"| stock | {format_bytes(report.stock_bytes)}, {stock_how} |",
            "",
            *([] if report.stock_measured else [f"\\* Estimated, computed from the attention shapes: {report.reason}.", ""]),
            verdict,
            "",
            f"Largest attention call (estimates): stock {format_bytes(report.stock_attention_bytes)}, "
            f"patched {format_bytes(report.blocked_attention_bytes)}.",
        ]
    )


# ---------------------------------------------------------------------------- per-session state and handlers


@dataclass
class DemoSession:
    """One browser session's data, held in gr.State (never shared between sessions)."""

    image: Optional[np.ndarray] = None  # (H, W, 3) uint8
    name: str = ""
    settings: Optional[DemoSettings] = None  # what `embedding` was computed with
    embedding: Optional[Embedding] = None
    prompts: Prompts = Prompts()
    history: list[Prompts] = field(default_factory=list)  # for undo
    masks: Optional[np.ndarray] = None  # (3, H, W) bool
    scores: Optional[np.ndarray] = None  # (3,)
    chosen: int = 0
    everything: Optional[list[dict]] = None  # automatic masks, while shown
    memory: Optional[MemoryReport] = None
    message: str = ""


def _user_errors(handler: Callable) -> Callable:
    """Show ValueError / OSError as a Gradio error message (no traceback)."""

    @functools.wraps(handler)
    def wrapper(*args, **kwargs):
        try:
            return handler(*args, **kwargs)
        except (ValueError, OSError) as error:
            raise gr.Error(str(error), print_exception=False) from None

    return wrapper


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
) -> tuple[DemoSettings, dict]:
    """New settings from the settings panel's values (max_block_mb 0 or empty: use chunks); returns (settings, banner)."""
    if img_size is None or chunks is None or img_size != int(img_size) or chunks != int(chunks):
        raise ValueError(f"input size ({img_size}) and chunks ({chunks}) must be whole numbers")
    model = ModelSettings(model_type, checkpoint or None, device or None, dtype, int(img_size), settings.model.seed)
    new = dataclasses.replace(
        settings, model=model, chunks=int(chunks), max_block_mb=float(max_block_mb) if max_block_mb else None, measure_stock=bool(measure_stock)
    )
    check_settings(new)
    load_model(new.model)  # a bad checkpoint is refused now, not at the next click
    return new, gr.update(value=banner(new), visible=new.random_weights)


@_user_errors
def on_image(path: Optional[str], session: DemoSession, settings: DemoSettings) -> tuple:
    """A new image (upload, example, or cleared): encode it once, forget the old prompts."""
    if path is None:
        return _view(DemoSession())
    image, notes = load_image(path, settings.max_pixels, settings.max_upload_mb)
    session = _encode(DemoSession(image=image, name=Path(path).name), settings)
    if notes:
        session.message += f" Note: {'; '.join(notes)}."
    return _view(session)


@_user_errors
def on_encode(session: DemoSession, settings: DemoSettings) -> tuple:
    """Encode the current image again with new settings, keeping its prompts."""
    if session.image is None:
        session.message = "Settings applied: they are used for the next image."
        return _view(session)
    encoded = _encode(session, settings).message
    if not session.prompts.empty:
        session.message = f"{encoded} {_predict(session).message}"
    return _view(session)


@_user_errors
def on_click(session: DemoSession, mode: str, evt: gr.SelectData) -> tuple:
    """A click on the image at `evt.index` = [x, y] pixels: a point (fg / bg) or a box corner."""
    if session.image is None or session.embedding is None:
        raise ValueError("no image yet: upload one or pick an example first")
    x, y = (float(v) for v in evt.index)
    h, w = session.image.shape[:2]
    check_prompts(Prompts(points=((x, y),), labels=(1,)), (h, w))
    p = session.prompts
    session.history.append(p)
    if mode == "box":
        if p.corner is None:
            session.prompts = dataclasses.replace(p, corner=(x, y))
            session.message = "Box: now click the opposite corner."
            return _view(session)
        (cx, cy) = p.corner
        box = (min(cx, x), min(cy, y), max(cx, x), max(cy, y))
        if box[0] == box[2] or box[1] == box[3]:
            session.history.pop()
            raise ValueError("that box has no area: click two opposite corners")
        session.prompts = dataclasses.replace(p, box=box, corner=None)
    elif mode in ("fg", "bg"):
        session.prompts = dataclasses.replace(p, points=(*p.points, (x, y)), labels=(*p.labels, 1 if mode == "fg" else 0))
    else:
        raise ValueError(f"click mode {mode!r} is unknown: choose fg, bg or box")
    return _view(_predict(session))


@_user_errors
def on_undo(session: DemoSession) -> tuple:
    """Take back the last click."""
    if not session.history:
        session.message = "Nothing to undo."
        return _view(session)
    session.prompts = session.history.pop()
    return _view(_predict(session))


def on_clear(session: DemoSession) -> tuple:
    """Remove every prompt and mask; the embedding stays."""
    session.prompts, session.history, session.everything = Prompts(), [], None
    session.masks = session.scores = None
    session.message = "Cleared."
    return _view(session)


def on_choose(session: DemoSession, choice: Optional[int]) -> tuple:
    """Show candidate mask `choice` (0-2) instead of the best-scoring one."""
    if session.masks is not None and choice is not None:
        session.chosen = int(choice)
    return _view(session)


@_user_errors
def on_everything(
    session: DemoSession,
    points_per_side: float,
    pred_iou_thresh: float,
    stability_score_thresh: float,
    progress: gr.Progress = gr.Progress(),
) -> tuple:
    """"Segment everything": automatic masks over a grid of points, with a progress bar."""
    if session.image is None or session.embedding is None:
        raise ValueError("no image yet: upload one or pick an example first")
    records = segment_everything(
        load_model(session.settings.model).sam,
        session.image,
        session.embedding,
        points_per_side=int(points_per_side),
        pred_iou_thresh=float(pred_iou_thresh),
        stability_score_thresh=float(stability_score_thresh),
        progress=lambda fraction, text: progress(fraction, desc=text),
    )
    session.everything = records
    session.message = f"Segment everything: {len(records)} masks from {int(points_per_side) ** 2} points."
    if not records and session.settings.random_weights:
        session.message += " (None pass the quality thresholds: the weights are random.)"
    return _view(session)


def segment_api(image_path: Optional[str], prompts_json: str, settings: DemoSettings) -> tuple[Image.Image, dict]:
    """The "segment" endpoint: image file + JSON prompts -> (mask as a lossless PNG image, scores).

    Stateless: each call encodes its image. See `parse_prompts` for the JSON.
    """
    try:
        if image_path is None:
            raise ValueError("no image given: pass an image file (gradio_client.handle_file(path))")
        image, notes = load_image(image_path, settings.max_pixels, settings.max_upload_mb)
        prompts, index = parse_prompts(prompts_json, image.shape[:2])
        loaded = load_model(settings.model)
        embedding, report = encode(loaded.sam, image, chunks=settings.chunks, max_block_mb=settings.max_block_mb)
        masks, scores = predict(loaded.sam, embedding, prompts)
    except (ValueError, OSError) as error:
        raise gr.Error(str(error), print_exception=False) from None
    index = int(np.argmax(scores)) if index is None else index
    info = {
        "scores": [round(float(s), 6) for s in scores],
        "mask_index": index,
        "width": image.shape[1],
        "height": image.shape[0],
        "model": loaded.description,
        "random_weights": loaded.random_weights,
        "patched_peak_bytes": report.patched_bytes,
        "notes": notes,
    }
    return mask_image(masks[index]), info


def _encode(session: DemoSession, settings: DemoSettings) -> DemoSession:
    loaded = load_model(check_settings(settings).model)
    session.embedding, session.memory = encode(
        loaded.sam, session.image, chunks=settings.chunks, max_block_mb=settings.max_block_mb, stock_limit_bytes=settings.stock_limit_bytes
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


def _predict(session: DemoSession) -> DemoSession:
    session.everything = None
    if session.prompts.empty:
        session.masks = session.scores = None
        session.message = "Click on the image: foreground / background points, or a box by two clicks."
        return session
    loaded = load_model(session.settings.model)
    session.masks, session.scores = predict(loaded.sam, session.embedding, session.prompts)
    session.chosen = int(np.argmax(session.scores))
    p = session.prompts
    session.message = (
        f"{sum(p.labels)} foreground, {len(p.labels) - sum(p.labels)} background points"
        + (", a box" if p.box is not None else "")
        + f": mask {session.chosen + 1} of 3 has the best score, {session.scores[session.chosen]:.3f}."
    )
    return session


def _view(session: DemoSession) -> tuple:
    """(session, canvas, choice, mask, status, memory): the outputs every handler updates."""
    if session.image is None:
        return session, None, gr.update(choices=[], value=None), None, session.message or "Upload an image or pick an example.", format_memory(None)
    if session.everything is not None:
        canvas = render_everything(session.image, session.everything)
        mask = label_image(session.everything, session.image.shape[:2])
        choice = gr.update(choices=[], value=None)
    else:
        chosen = session.masks[session.chosen] if session.masks is not None else None
        canvas = render_overlay(session.image, chosen, session.prompts)
        mask = mask_image(chosen) if chosen is not None else None
        labels = [] if session.scores is None else [(f"mask {i + 1}: score {s:.3f}", i) for i, s in enumerate(session.scores)]
        choice = gr.update(choices=labels, value=session.chosen if labels else None)
    return session, canvas, choice, mask, session.message, format_memory(session.memory)
