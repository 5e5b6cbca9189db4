"""The web demo's Gradio 6 layout: components and their wiring, nothing else.

What each event does is in `demo.py`. Built by `sam-blocked demo` and `python app/app.py`;
`app/` is not part of the installed package, so the builder lives here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

import gradio as gr
import torch

from sam_blocked.demo import handlers as demo
from sam_blocked.models.checkpoints import resolve_weights_dir
from sam_blocked.models.load import DTYPES
from sam_blocked.models.registry import ENCODER_CONFIGS

ENCODER_GROUP = "encoder"  # events that run the image encoder: one at a time, app-wide
SESSION_TTL_S = 3600  # a session's image, embedding and masks are dropped after an hour without events
REPO_EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def default_examples_dir() -> Path:
    """The repository's examples/ in a checkout, else ./examples."""
    return REPO_EXAMPLES if REPO_EXAMPLES.is_dir() else Path("examples")


def checkpoint_choices(settings: demo.DemoSettings) -> list[tuple[str, str]]:
    """(label, path) pairs: random weights, the given checkpoint, and *.pth in the weights folder."""
    paths = [settings.model.checkpoint] if settings.model.checkpoint else []
    folder = resolve_weights_dir()
    if folder.is_dir():
        paths += sorted(str(p) for p in folder.glob("*.pth") if str(p) not in paths)
    return [("none: seeded random weights", ""), *((Path(p).name, p) for p in paths)]


def device_choices() -> list[str]:
    return ["cpu", *(f"cuda:{i}" for i in range(torch.cuda.device_count()))]


def build_demo(settings: demo.DemoSettings, examples_dir: Optional[str | os.PathLike] = None, slides_dir: Optional[str | os.PathLike] = None) -> gr.Blocks:
    """The demo's Blocks, started with `settings` (each session may change its own).

    Args:
        settings: the initial model, blocking and upload caps; checked here, and the model
            is built now, so a bad checkpoint fails before the server starts.
        examples_dir: a folder of images listed as examples (default: `default_examples_dir()`).
        slides_dir: a folder of slides, OME-Zarr stores and TIFFs opened on the server (read
            window by window at settings.read's level and channels); None: none.
    """
    demo.check_settings(settings)
    demo.shared_model(settings.model)
    examples = demo.list_examples(default_examples_dir() if examples_dir is None else examples_dir)
    model = settings.model
    device = model.device or ("cuda:0" if torch.cuda.is_available() else "cpu")

    with gr.Blocks(title="SAM, blocked attention", analytics_enabled=False, delete_cache=(3600, 3600)) as blocks:
        gr.Markdown(
            "# Segment Anything with blocked attention\n"
            "Upload an image, click on it to segment. The image is encoded once (patched attention, "
            "exact, in blocks); clicks only run the mask decoder. An image larger than the model's input "
            "is shown reduced and segmented at native resolution: a click encodes the tile around it, once. "
            "The panel on the right compares the encode's peak memory with stock SAM's."
        )
        banner = gr.Markdown(demo.banner(settings), visible=settings.random_weights, elem_id="random-weights-banner")
        session = gr.State(demo.DemoSession(), time_to_live=SESSION_TTL_S, delete_callback=demo.DemoSession.close)
        settings_state = gr.State(settings)

        with gr.Row():
            with gr.Column(scale=3):
                canvas = gr.Image(label="Click to segment", type="numpy", interactive=False, elem_id="canvas")
                mode = gr.Radio(list(demo.MODES), value="fg", label="Click adds", elem_id="mode")
                with gr.Row():
                    undo = gr.Button("Undo", elem_id="undo")
                    clear = gr.Button("Clear", elem_id="clear")
                choice = gr.Radio([], label="Candidate masks (predicted IoU)", type="value", elem_id="choice")
                status = gr.Markdown("Upload an image or pick an example.", elem_id="status")
            with gr.Column(scale=2):
                upload = gr.Image(
                    label="Image", type="filepath", image_mode=None, sources=["upload", "clipboard"], height=240, elem_id="upload"
                )
                if examples:
                    gr.Examples([[p] for p in examples], inputs=[upload], label="Examples (examples/)")
                server_images = demo.list_server_images(slides_dir)
                server_image = gr.Dropdown(
                    [(Path(p).name, p) for p in server_images],
                    value=None,
                    label="or a slide / OME-Zarr on the server (--slides), read window by window",
                    visible=bool(server_images),
                    elem_id="server-image",
                )
                memory = gr.Markdown(demo.format_memory(None), elem_id="memory")
                mask = gr.Image(label="Mask", type="pil", format="png", interactive=False, buttons=[], height=260, elem_id="mask")
                download = gr.DownloadButton("Download the mask at full resolution", visible=False, elem_id="download")
                with gr.Accordion("Download for QuPath, Fiji, napari, QGIS", open=False):
                    export_kind = gr.Dropdown(list(demo.EXPORTS), value=next(iter(demo.EXPORTS)), label="format", elem_id="export_kind")
                    export_make = gr.Button("Prepare the file", elem_id="export_make")
                    export_file = gr.DownloadButton("Download", visible=False, elem_id="export_download")
                with gr.Accordion("Segment everything", open=False):
                    points_per_side = gr.Slider(4, 64, value=16, step=1, label="points per side (per tile on a large image)")
                    pred_iou = gr.Slider(0.0, 1.0, value=0.88, label="pred IoU threshold")
                    stability = gr.Slider(0.0, 1.0, value=0.95, label="stability score threshold")
                    everything = gr.Button("Segment everything", elem_id="everything")
                with gr.Accordion("Settings", open=False):
                    model_type = gr.Dropdown(["auto", *ENCODER_CONFIGS], value=model.model_type, label="model type")
                    checkpoint = gr.Dropdown(checkpoint_choices(settings), value=model.checkpoint or "", label="checkpoint")
                    device_box = gr.Dropdown(device_choices(), value=device, label="device")
                    dtype = gr.Dropdown(list(DTYPES), value=model.dtype, label="encoder dtype")
                    img_size = gr.Number(model.img_size, precision=0, step=16, label="input size (px, multiple of 16)")
                    chunks = gr.Number(settings.chunks, precision=0, minimum=1, label="chunks per attention matrix")
                    max_block_mb = gr.Number(settings.max_block_mb, label="or a memory budget per block (MiB; empty or 0 = use chunks)")
                    measure_stock = gr.Checkbox(settings.measure_stock, label=f"run stock too when its attention needs < {settings.stock_limit_mb:g} MiB")
                    large_images = gr.Radio(
                        [("tiles at native resolution (a click encodes the tile around it)", "tiles"), ("whole, resized into one encode (SAM's way)", "whole")],
                        value=settings.large_images,
                        label="images larger than the input size",
                    )
                    apply = gr.Button("Apply and encode again", elem_id="apply")
                with gr.Accordion("API: segment (for gradio_client)", open=False):
                    gr.Markdown(
                        "`Client(url).predict(image=handle_file(path), prompts='{\"points\": [[x, y]], \"labels\": [1]}', "
                        'api_name="/segment")` returns (mask PNG path, scores). Prompts may also give '
                        '`"box": [x0, y0, x1, y1]` and `"mask_index"`; default is the best-scoring mask.'
                    )
                    api_image = gr.Image(label="image", type="filepath", image_mode=None)
                    api_prompts = gr.Textbox('{"points": [[100, 100]], "labels": [1]}', label="prompts (JSON)")
                    api_run = gr.Button("Run")
                    api_mask = gr.Image(label="mask", type="pil", format="png", interactive=False)
                    api_scores = gr.JSON(label="scores")

        view = [session, canvas, choice, mask, download, status, memory]
        assert len(view) == len(demo.VIEW)
        encoding = dict(concurrency_id=ENCODER_GROUP, concurrency_limit=1, api_visibility="private")
        private = dict(api_visibility="private")

        upload.change(demo.on_image, [upload, session, settings_state], view, **encoding)

        def open_server_image(path: Optional[str], session: demo.DemoSession, settings: demo.DemoSettings):
            return demo.on_server_image(path, session, settings, server_images)

        server_image.input(open_server_image, [server_image, session, settings_state], view, **encoding)
        canvas.select(demo.on_click, [session, mode], view, **encoding)  # on a large image a click may encode its tile
        undo.click(demo.on_undo, [session], view, **encoding)
        clear.click(demo.on_clear, [session], view, **private)
        choice.input(demo.on_choose, [session, choice], view, **private)
        everything.click(demo.on_everything, [session, points_per_side, pred_iou, stability], view, **encoding)
        export_make.click(demo.on_export, [session, export_kind], [export_file], **private)
        settings_inputs = [settings_state, model_type, checkpoint, device_box, dtype, img_size, chunks, max_block_mb, measure_stock, large_images]
        apply.click(demo.on_settings, settings_inputs, [settings_state, banner], **encoding).success(
            demo.on_encode, [session, settings_state], view, **encoding
        )

        def segment(image: Optional[str], prompts: str):
            return demo.segment_api(image, prompts, settings)

        api_run.click(segment, [api_image, api_prompts], [api_mask, api_scores], api_name="segment", concurrency_id=ENCODER_GROUP, concurrency_limit=1)
    return blocks


def launch_demo(
    blocks: gr.Blocks,
    settings: demo.DemoSettings,
    *,
    host: str = "127.0.0.1",
    port: Optional[int] = None,
    share: bool = False,
    examples_dir: Optional[str | os.PathLike] = None,
    prevent_thread_lock: bool = False,
) -> tuple[object, str, Optional[str]]:
    """Serve `blocks` on host:port with the upload cap of `settings`; returns launch()'s (app, local url, share url)."""
    allowed: Sequence[str] = [str(default_examples_dir() if examples_dir is None else examples_dir)]
    return blocks.launch(
        server_name=host,
        server_port=port,
        share=share,
        max_file_size=int(settings.max_upload_mb * demo.MIB),
        allowed_paths=list(allowed),
        prevent_thread_lock=prevent_thread_lock,
        footer_links=["api"],
        quiet=prevent_thread_lock,
    )
