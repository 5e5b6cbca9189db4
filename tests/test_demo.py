"""The web demo: handlers called directly, the API through gradio_client, a click in headless Chromium.

Everything runs the "tiny" model with random weights: the masks are meaningless, the
plumbing is what is tested. The astronaut photo (512 x 512) fits the 512 px input of
SETTINGS and takes the untiled path; a 3000 x 2200 mosaic of scikit-image photographs is
larger than the 256 px input of TILED and goes tile by tile.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import socket
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

gr = pytest.importorskip("gradio", reason="the demo needs gradio: pip install 'sam-blocked[demo]'")

import tifffile  # noqa: E402
import torch  # noqa: E402
from segment_anything import SamPredictor  # noqa: E402

from sam_blocked import demo, interactive  # noqa: E402
from sam_blocked.interactive_tiles import Preview, TileCache  # noqa: E402
from sam_blocked.patch import BlockedAttention, patched, sam_attentions  # noqa: E402
from sam_blocked.prompts import Prompt  # noqa: E402
from sam_blocked.tiles.crops import MaskCrop  # noqa: E402
from sam_blocked.tiles.plan import TileTask, Tiling, plan_prompts  # noqa: E402
from sam_blocked.tiles.work import encode_tile, prompt_crops  # noqa: E402

SETTINGS = demo.DemoSettings(demo.ModelSettings("tiny", device="cpu", img_size=512), measure_stock=False)
TILED = demo.DemoSettings(demo.ModelSettings("tiny", device="cpu", img_size=256), measure_stock=False)
ARTIFACTS = Path(__file__).parent / "artifacts"


@pytest.fixture(scope="module")
def image_path(photo, tmp_path_factory) -> str:
    """The astronaut photo (512 x 512) as a PNG file, as an upload would be."""
    path = tmp_path_factory.mktemp("examples") / "astronaut.png"
    Image.fromarray(photo).save(path)
    return str(path)


@pytest.fixture
def session(image_path) -> demo.DemoSession:
    return demo.on_image(image_path, demo.DemoSession(), SETTINGS)[0]


def mosaic(height: int, width: int, row: int = 320) -> np.ndarray:
    """(height, width, 3) uint8: rows of scikit-image photographs, each resized to `row` px high, side by side."""
    from skimage import data

    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket(), data.immunohistochemistry(), data.hubble_deep_field()]
    resized = [np.asarray(Image.fromarray(p).resize((round(p.shape[1] * row / p.shape[0]), row))) for p in photos]
    out = np.zeros((-(-height // row) * row, width + max(p.shape[1] for p in resized), 3), np.uint8)
    for r in range(out.shape[0] // row):
        x, k = 0, r
        while x < width:
            p = resized[k % len(resized)]
            out[r * row : (r + 1) * row, x : x + p.shape[1]] = p
            x, k = x + p.shape[1], k + 1
    return np.ascontiguousarray(out[:height, :width])


@pytest.fixture(scope="module")
def mosaic_path(tmp_path_factory) -> str:
    """A 3000 x 2200 mosaic of photographs as a PNG file: larger than TILED's 256 px input."""
    path = tmp_path_factory.mktemp("large") / "mosaic.png"
    Image.fromarray(mosaic(2200, 3000)).save(path, compress_level=1)
    return str(path)


def count_encodes(settings: demo.DemoSettings):
    """Counts image-encoder runs of the cached model of `settings`."""
    calls = []
    handle = demo.load_model(settings.model).sam.image_encoder.register_forward_hook(lambda *_: calls.append(1))
    yield calls
    handle.remove()


@pytest.fixture
def encoder_calls():
    yield from count_encodes(SETTINGS)


@pytest.fixture
def tile_encodes():
    yield from count_encodes(TILED)


def click(x: float, y: float) -> gr.SelectData:
    return gr.SelectData(None, {"index": [x, y], "value": None})


def png_roundtrip(image: Image.Image) -> np.ndarray:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return np.asarray(Image.open(io.BytesIO(buffer.getvalue())))


# ---------------------------------------------------------------------------- inputs


def test_load_image_refuses_oversized_and_unreadable_files(tmp_path, image_path):
    image, notes = interactive.load_image(image_path)
    assert image.shape == (512, 512, 3) and image.dtype == np.uint8 and notes == []
    with pytest.raises(ValueError, match=r"astronaut.png is 0.\d MiB, over the 0.001 MiB upload limit"):
        interactive.load_image(image_path, max_upload_mb=0.001)
    with pytest.raises(ValueError, match="astronaut.png: 512 x 512 = 262,144 pixels is above --max-pixels 100,000"):
        interactive.load_image(image_path, max_pixels=100_000)
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(ValueError, match="notes.png: not an image PIL can read"):
        interactive.load_image(text)
    grey = tmp_path / "grey.png"
    Image.fromarray(np.zeros((6, 9), dtype=np.uint8)).save(grey)
    image, notes = interactive.load_image(grey)
    assert image.shape == (6, 9, 3) and notes == ["converted from mode L to RGB"]


def test_parse_prompts_reads_points_box_and_refuses_bad_json():
    prompts, index = interactive.parse_prompts('{"points": [[10, 20], [30, 5]], "labels": [1, 0], "box": [1, 2, 50, 60]}', (100, 80))
    assert prompts.points == ((10, 20), (30, 5)) and prompts.labels == (1, 0) and prompts.box == (1, 2, 50, 60)
    assert index is None
    assert interactive.parse_prompts('{"points": [[1, 1]], "mask_index": 2}', (10, 10))[0].labels == (1,)
    bad = {
        "{points": "not valid JSON",
        "[1, 2]": "must be a JSON object",
        '{"point": [[1, 1]]}': "unknown prompt keys",
        '{"points": [[1]]}': "list of \\[x, y\\] pixel pairs",
        '{"points": [[1, 1]], "labels": [1, 1]}': "one 1 \\(foreground\\) or 0",
        '{"points": [[80, 1]]}': "outside the 80 x 100 image",
        '{"box": [50, 2, 10, 60]}': "top-left corner first",
        '{"points": [[1, 1]], "mask_index": 3}': "mask_index must be 0, 1 or 2",
        "{}": "no prompt given",
    }
    for text, message in bad.items():
        with pytest.raises(ValueError, match=message):
            interactive.parse_prompts(text, (100, 80))


def test_settings_are_checked_and_random_weights_get_a_banner():
    settings, banner = demo.on_settings(SETTINGS, "tiny", "", "cpu", "float32", 512, 16, 0, False)
    assert settings == SETTINGS
    assert banner["visible"] and "masks are meaningless until a checkpoint is given" in banner["value"]
    settings, _ = demo.on_settings(SETTINGS, "tiny", "", "cpu", "float32", 256, 9, 64, True, "whole")
    assert (settings.chunks, settings.max_block_mb, settings.measure_stock, settings.large_images) == (9, 64.0, True, "whole")
    for values, message in [
        (("tiny", "", "cpu", "float32", 250, 16, 0, False), "multiple of 16"),
        (("tiny", "", "cpu", "float32", 256, 0, 0, False), "chunks must be a whole number >= 1"),
        (("tiny", "/no/such.pth", "cpu", "float32", 256, 16, 0, False), "is not a file"),
        (("tiny", "", "cpu", "float32", 256, 16, -1, False), "must be > 0"),
        (("tiny", "", "cpu", "float32", 256, 16, 0, False, "crop"), "choose tiles \\(native resolution\\) or whole"),
    ]:
        with pytest.raises(gr.Error, match=message):
            demo.on_settings(SETTINGS, *values)


def test_list_examples_lists_image_files_only(tmp_path):
    for name in ("b.jpg", "a.png", "notes.txt", "c.WEBP"):
        (tmp_path / name).write_bytes(b"")
    assert [Path(p).name for p in demo.list_examples(tmp_path)] == ["a.png", "b.jpg", "c.WEBP"]
    assert demo.list_examples(tmp_path / "missing") == []


# ---------------------------------------------------------------------------- handlers


@pytest.mark.slow
def test_clicks_run_only_the_decoder(session, encoder_calls, photo):
    embedding = session.embedding
    assert session.memory is not None and session.image.shape == (512, 512, 3)
    session, canvas, choice, mask, download, status, memory = demo.on_click(session, "fg", click(200, 150))
    session, canvas, choice, mask, download, status, memory = demo.on_click(session, "bg", click(400, 60))
    assert encoder_calls == [] and session.embedding is embedding  # the encoder ran once, at upload
    assert session.prompts.points == ((200, 150), (400, 60)) and session.prompts.labels == (1, 0)
    assert session.masks.shape == (3, 512, 512) and session.masks.dtype == bool and session.scores.shape == (3,)
    assert session.chosen == int(np.argmax(session.scores))
    assert [value for _, value in choice["choices"]] == [0, 1, 2] and choice["value"] == session.chosen
    assert canvas.shape == photo.shape and not np.array_equal(canvas, photo)
    assert "1 foreground, 1 background points" in status and "Peak memory of the last encode" in memory
    # The download is lossless: the PNG holds exactly the chosen mask.
    np.testing.assert_array_equal(png_roundtrip(mask), session.masks[session.chosen].astype(np.uint8) * 255)
    np.testing.assert_array_equal(np.asarray(Image.open(download["value"])), session.masks[session.chosen].astype(np.uint8) * 255)
    assert download["visible"] and "(512 x 512)" in download["label"]


def test_box_by_two_clicks_undo_clear_and_choose(session):
    session, _, _, mask, _, status, _ = demo.on_click(session, "box", click(300, 320))
    assert session.prompts.corner == (300, 320) and session.masks is None and mask is None
    assert "opposite corner" in status
    session, *_ = demo.on_click(session, "box", click(100, 80))
    assert session.prompts.box == (100, 80, 300, 320) and session.prompts.corner is None
    assert session.masks.shape == (3, 512, 512)
    session, _, choice, mask, download, _, _ = demo.on_choose(session, 0)
    assert session.chosen == 0 and choice["value"] == 0
    np.testing.assert_array_equal(png_roundtrip(mask), session.masks[0].astype(np.uint8) * 255)
    np.testing.assert_array_equal(np.asarray(Image.open(download["value"])), session.masks[0].astype(np.uint8) * 255)
    session, *_ = demo.on_undo(session)
    assert session.prompts.box is None and session.prompts.corner == (300, 320)
    session, canvas, choice, mask, download, status, _ = demo.on_clear(session)
    assert session.prompts.empty and session.masks is None and mask is None and choice["choices"] == [] and not download["visible"]
    np.testing.assert_array_equal(canvas, session.image)
    assert demo.on_undo(session)[5] == "Nothing to undo."


def test_bad_clicks_give_messages(session):
    with pytest.raises(gr.Error, match="outside the 512 x 512 image"):
        demo.on_click(session, "fg", click(512, 10))
    with pytest.raises(gr.Error, match="no image yet"):
        demo.on_click(demo.DemoSession(), "fg", click(1, 1))
    demo.on_click(session, "box", click(10, 10))
    with pytest.raises(gr.Error, match="box has no area"):
        demo.on_click(session, "box", click(10, 90))
    assert session.prompts.corner == (10, 10)


@pytest.mark.slow
def test_sessions_are_isolated(image_path, tmp_path, photo):
    other_path = tmp_path / "small.png"
    Image.fromarray(photo[:200, :300]).save(other_path)
    a = demo.on_image(image_path, demo.DemoSession(), SETTINGS)[0]
    b = demo.on_image(str(other_path), demo.DemoSession(), SETTINGS)[0]
    a, *_ = demo.on_click(a, "fg", click(10, 10))
    assert b.prompts.empty and b.masks is None and b.image.shape == (200, 300, 3)
    b, *_ = demo.on_click(b, "fg", click(20, 20))
    assert a.masks.shape == (3, 512, 512) and b.masks.shape == (3, 200, 300)
    assert a.embedding is not b.embedding
    assert demo.on_image(None, a, SETTINGS)[0].image is None  # a cleared upload resets the session


@pytest.mark.slow
def test_memory_panel_measures_stock_when_it_fits_else_estimates(photo):
    sam = demo.load_model(SETTINGS.model).sam
    _, measured = interactive.encode(sam, photo, stock_limit_bytes=2**30)
    assert measured.stock_measured and measured.reason == "" and measured.blocking == "chunks 16"
    assert measured.stock_planned_bytes > measured.patched_planned_bytes > 0
    assert "| stock |" in demo.format_memory(measured) and "estimate**" not in demo.format_memory(measured)
    _, estimated = interactive.encode(sam, photo, chunks=4, stock_limit_bytes=2**19)
    assert not estimated.stock_measured and estimated.blocking == "chunks 4"
    assert "stock's encoder would need" in estimated.reason and "over the 0.5 MiB allowed here" in estimated.reason
    assert estimated.stock_bytes >= estimated.stock_planned_bytes
    text = demo.format_memory(estimated)
    assert "**estimate**" in text and "memory planner" in text
    _, off = interactive.encode(sam, photo, max_block_mb=1.0)
    assert off.reason == "stock comparison is off" and off.blocking == "blocks <= 1 MiB"
    assert not any(isinstance(m, BlockedAttention) for _, m in sam_attentions(sam))  # the cached model stays stock


@pytest.mark.slow
def test_segment_everything_reports_progress_and_reuses_the_embedding(session, encoder_calls):
    calls = []
    session, canvas, choice, mask, download, status, _ = demo.on_everything(session, 4, 0.0, 0.0, progress=lambda f, desc=None: calls.append(f))
    assert encoder_calls == []  # the kept embedding was used
    assert calls[0] == 0.0 and calls[-1] == 1.0
    assert len(session.everything) >= 1 and f"{len(session.everything)} masks from 16 points" in status
    labels = np.asarray(mask)
    assert labels.shape == (512, 512) and labels.max() == len(session.everything)
    np.testing.assert_array_equal(np.asarray(Image.open(download["value"])), labels)
    assert choice["choices"] == []
    session, *_ = demo.on_click(session, "fg", click(50, 50))
    assert session.everything is None  # a click goes back to prompting


# ---------------------------------------------------------------------------- images larger than the input: tiles


def library_masks(settings: demo.DemoSettings, image: np.ndarray, prompt: Prompt) -> tuple[TileTask, list[MaskCrop]]:
    """What sam_blocked.tiles gives for one prompt set: routed, its tile encoded (patched as the demo patches), decoded."""
    sam = demo.load_model(settings.model).sam
    (task,) = plan_prompts(Tiling(settings.model.img_size), *image.shape[:2], [prompt])
    predictor = SamPredictor(sam)
    with patched(sam, settings.chunks, settings.max_block_mb):
        encode_tile(predictor, image, task.box)
    return task, prompt_crops(predictor, task, multimask=True)


def pasted(crop: MaskCrop, size: tuple[int, int]) -> np.ndarray:
    full = np.zeros(size, np.uint8)
    x0, y0, x1, y1 = crop.box
    full[y0:y1, x0:x1] = crop.mask * 255
    return full


@pytest.mark.slow
def test_a_click_on_a_large_image_encodes_its_tile_once_and_returns_the_full_resolution_mask(mosaic_path, tile_encodes):
    session, canvas, _, mask, download, status, memory = demo.on_image(mosaic_path, demo.DemoSession(), TILED)
    assert tile_encodes == [] and session.tiled and session.embedding is None, "nothing is encoded before a click"
    assert session.image.shape == (2200, 3000, 3) and canvas.shape == (1126, 1536, 3), "shown reduced, longest side 1536"
    assert "(3000 x 2200) is larger than the 256 px input: shown reduced to 1536 x 1126" in status and mask is None

    session, canvas, choice, mask, download, status, memory = demo.on_click(session, "fg", click(700, 500))
    assert len(tile_encodes) == 1 and session.prompts.points == (session.preview.to_full(700, 500),)
    (x, y), box = session.prompts.points[0], session.tile.task.box
    assert box[0] <= x < box[2] and box[1] <= y < box[3] and box[2] - box[0] == box[3] - box[1] == 256
    assert f"Tile [{box[0]}, {box[1]}, {box[2]}, {box[3]}] (256 x 256 px at native resolution): encoded now" in status
    assert "Peak memory of the last encode**: 256 px input" in memory
    assert canvas.shape == (1126, 1536, 3) and np.asarray(mask).shape == (1126, 1536), "the preview shows the mask reduced"
    assert download["visible"] and "(3000 x 2200)" in download["label"]

    # The full-resolution mask is the library's routed prompt result, pasted at the tile's offset.
    image = session.image
    task, crops = library_masks(TILED, image, Prompt("click", foreground=session.prompts.points))
    assert task.box == box and [c.record["predicted_iou"] for c in crops] == list(session.scores)
    saved = np.asarray(Image.open(download["value"]))
    assert saved.shape == (2200, 3000)
    np.testing.assert_array_equal(saved, pasted(crops[session.chosen], (2200, 3000)))
    np.testing.assert_array_equal(np.asarray(mask) > 0, session.preview.mask(crops[session.chosen]))

    # A second click in the same tile runs only the decoder.
    tile_encodes.clear()
    session, *_, status, _ = demo.on_click(session, "bg", click(702, 503))
    assert tile_encodes == [] and session.tile.task.box == box and "reused (its embedding was kept: decoder only)" in status
    assert "1 foreground, 1 background points" in status
    session, *_ = demo.on_clear(session)
    session, *_, status, _ = demo.on_click(session, "fg", click(700, 500))
    assert tile_encodes == [] and "reused" in status, "the tile stays kept after Clear"


@pytest.mark.slow
def test_tiles_at_the_image_edge_boxes_and_prompts_wider_than_a_tile(mosaic_path, tile_encodes):
    session = demo.on_image(mosaic_path, demo.DemoSession(), TILED)[0]
    session, *_, status, _ = demo.on_click(session, "fg", click(1535, 1125))  # the bottom-right preview pixel
    assert session.prompts.points == ((2998.5, 2198.5),) and session.tile.task.box == (2744, 1944, 3000, 2200), "the shifted last tile"
    session, *_ = demo.on_clear(session)
    session, *_ = demo.on_click(session, "box", click(400, 300))
    session, *_, status, _ = demo.on_click(session, "box", click(450, 340))  # 98 x 78 px at full resolution
    (x0, y0, x1, y1), box = session.prompts.box, session.tile.task.box
    assert box[0] <= x0 < x1 <= box[2] and box[1] <= y0 < y1 <= box[3] and session.masks is None and session.tile.crops
    image = session.image
    task, crops = library_masks(TILED, image, Prompt("click", box=session.prompts.box))
    assert task.box == box and [c.record["predicted_iou"] for c in crops] == list(session.scores)
    before, calls = session.prompts, len(tile_encodes)
    with pytest.raises(gr.Error, match=r"these prompts span .* more than one 256 px tile .* raise the input size under Settings to \d+"):
        demo.on_click(session, "fg", click(1000, 800))
    assert session.prompts == before and len(tile_encodes) == calls, "a refused click is not kept and encodes nothing"
    session, *_ = demo.on_clear(session)
    demo.on_click(session, "box", click(10, 10))
    with pytest.raises(gr.Error, match=r"the box span \d+(\.\d+)? x \d+(\.\d+)? px, more than one 256 px tile"):
        demo.on_click(session, "box", click(300, 200))
    assert session.prompts.corner is not None and session.prompts.box is None


@pytest.mark.slow
def test_segment_everything_on_a_large_image_runs_tiles_or_names_the_batch_command(mosaic_path, tmp_path, tile_encodes):
    session = demo.on_image(mosaic_path, demo.DemoSession(), TILED)[0]
    with pytest.raises(gr.Error, match=r"192 tiles of 256 px, .* \(16 tiles, --max-everything-tiles\)\. Run it as a batch job instead: sam-blocked segment mosaic.png --auto --tile 256"):
        demo.on_everything(session, 4, 0.0, 0.0, progress=lambda *a, **k: None)
    assert tile_encodes == []

    small = tmp_path / "small.png"
    Image.fromarray(mosaic(440, 600)).save(small)  # 2 x 3 tiles of 256 px
    session = demo.on_image(str(small), demo.DemoSession(), TILED)[0]
    calls = []
    session, canvas, choice, mask, download, status, _ = demo.on_everything(session, 3, 0.0, 0.0, progress=lambda f, desc=None: calls.append(f))
    assert len(tile_encodes) == 6 and calls[0] == 0.0 and calls[-1] == 1.0 and len(calls) == 7
    crops = session.everything_crops
    assert len(crops) >= 1 and f"{len(crops)} masks from 6 tiles of 256 px at native resolution (3 x 3 points a tile" in status
    labels = tifffile.imread(download["value"])
    assert labels.shape == (440, 600) and labels.dtype == np.uint32 and labels.max() == len(crops), "the label TIFF at full resolution"
    assert np.asarray(mask).shape == canvas.shape[:2] == (440, 600) and choice["choices"] == []
    session, *_ = demo.on_click(session, "fg", click(50, 50))
    assert session.everything_crops is None  # a click goes back to prompting


def test_preview_maps_clicks_back_and_shows_every_masked_pixel():
    rng = np.random.default_rng(0)
    for _ in range(200):
        height, width = (int(v) for v in rng.integers(1, 160, 2))
        preview = Preview.of(np.zeros((height, width, 3), np.uint8), int(rng.integers(1, 50)))
        h, w = preview.image.shape[:2]
        ch, cw = int(rng.integers(1, height + 1)), int(rng.integers(1, width + 1))
        y0, x0 = int(rng.integers(0, height - ch + 1)), int(rng.integers(0, width - cw + 1))
        crop = MaskCrop(rng.random((ch, cw)) < 0.05, x0, y0)
        full = np.zeros((height, width), bool)
        full[y0 : y0 + ch, x0 : x0 + cw] = crop.mask
        rows, cols = np.arange(h + 1) * height // h, np.arange(w + 1) * width // w  # what each preview pixel covers
        expected = np.array([[full[rows[i] : rows[i + 1], cols[j] : cols[j + 1]].any() for j in range(w)] for i in range(h)])
        np.testing.assert_array_equal(preview.mask(crop), expected)
        for i, j in [(0, 0), (h - 1, w - 1), (h // 2, w // 3)]:
            fx, fy = preview.to_full(j, i)
            assert (fx, fy) == ((cols[j] + cols[j + 1] - 1) / 2, (rows[i] + rows[i + 1] - 1) / 2), "the middle of what the pixel covers"
    assert Preview.of(np.zeros((40, 30, 3), np.uint8), 64).to_full(7, 9) == (7, 9), "no reduction: clicks are pixels"


def test_tile_cache_keeps_the_newest_tiles_within_its_budget():
    embedding = lambda: (interactive.Embedding(torch.zeros(1, 256, 16, 16), (256, 256), (256, 256)), None)  # noqa: E731  256 KiB each
    cache = TileCache(max_bytes=600 * 1024)
    for k in range(4):
        cache.put(k, embedding())
    assert list(cache.entries) == [2, 3] and cache.get(2) is not None and list(cache.entries) == [3, 2]
    tiny = TileCache(max_bytes=1)
    tiny.put("a", embedding())
    assert list(tiny.entries) == ["a"], "the newest is always kept"


@pytest.mark.slow
def test_caps_whole_mode_and_the_api_on_a_large_image(mosaic_path, tile_encodes):
    whole = dataclasses.replace(TILED, large_images="whole", max_pixels=1_000_000)
    with pytest.raises(gr.Error, match=r"mosaic.png: 3000 x 2200 = 6,600,000 pixels is above --max-pixels 1,000,000"):
        demo.on_image(mosaic_path, demo.DemoSession(), whole)
    with pytest.raises(gr.Error, match="above --max-tiled-pixels 1,000,000 .* raise --max-tiled-pixels if you trust"):
        demo.on_image(mosaic_path, demo.DemoSession(), dataclasses.replace(TILED, max_tiled_pixels=1_000_000))
    session = demo.on_image(mosaic_path, demo.DemoSession(), dataclasses.replace(whole, max_pixels=4096 * 4096))[0]
    assert not session.tiled and session.embedding is not None and len(tile_encodes) == 1, "whole: resized into one encode at upload"
    session, *_ = demo.on_click(session, "fg", click(1400, 900))
    assert session.masks.shape == (3, 2200, 3000)
    session, *_, status, _ = demo.on_encode(session, TILED)  # back to tiles, keeping the prompt
    assert session.tiled and session.tile.task.box[0] <= 1400 < session.tile.task.box[2] and "encoded now" in status

    mask, info = demo.segment_api(mosaic_path, json.dumps({"points": [[1400, 900]]}), TILED)
    task, crops = library_masks(TILED, session.image, Prompt("p", foreground=((1400.0, 900.0),)))
    assert info["tile"] == list(task.box) and info["scores"] == [round(float(c.record["predicted_iou"]), 6) for c in crops]
    assert (info["width"], info["height"]) == (3000, 2200) and info["truncated"] == crops[info["mask_index"]].record["truncated"]
    np.testing.assert_array_equal(np.asarray(mask), pasted(crops[info["mask_index"]], (2200, 3000)))


# ---------------------------------------------------------------------------- the served app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def served(image_path):
    """The app on 127.0.0.1 (a free port), examples from the photo's folder; closed after."""
    from sam_blocked.demo_ui import build_demo, launch_demo

    examples = str(Path(image_path).parent)
    blocks = build_demo(SETTINGS, examples)
    _, url, _ = launch_demo(blocks, SETTINGS, port=free_port(), examples_dir=examples, prevent_thread_lock=True)
    try:
        yield url
    finally:
        blocks.close()


def test_cli_parses_demo_flags():
    from sam_blocked.cli import build_parser
    from sam_blocked.cli.demo import settings_from_args

    args = build_parser().parse_args(["demo", "--model-type", "tiny", "--img-size", "256", "--chunks", "4", "--device", "cpu"])
    assert (args.host, args.port, args.share) == ("127.0.0.1", None, False)
    settings = settings_from_args(args)
    assert settings.model == demo.ModelSettings("tiny", None, "cpu", "float32", 256, 0) and settings.chunks == 4
    assert settings_from_args(build_parser().parse_args(["demo"])).model.model_type == "vit_b"


@pytest.mark.slow
def test_api_endpoint_through_gradio_client(served, image_path):
    from gradio_client import Client, handle_file

    client = Client(served, verbose=False)
    assert "/segment" in client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    prompts = json.dumps({"points": [[200, 150], [400, 60]], "labels": [1, 0]})
    mask_path, info = client.predict(image=handle_file(image_path), prompts=prompts, api_name="/segment")
    mask = np.asarray(Image.open(mask_path))
    assert mask.shape == (512, 512) and set(np.unique(mask)) <= {0, 255}
    assert len(info["scores"]) == 3 and info["mask_index"] == int(np.argmax(info["scores"])) and info["random_weights"]
    expected, _ = demo.segment_api(image_path, prompts, SETTINGS)
    np.testing.assert_array_equal(mask, np.asarray(expected))  # what the library gives, bit for bit
    with pytest.raises(Exception, match="outside the 512 x 512 image"):
        client.predict(image=handle_file(image_path), prompts='{"points": [[600, 10]]}', api_name="/segment")


def _browser():
    """A headless Debian chromium driven by chromedriver, or a skip saying what is missing."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="the browser test needs selenium: pip install selenium")
    from selenium.webdriver.chrome.service import Service

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if chromium is None or driver is None:
        reason = "the browser test needs chromium and chromedriver on PATH: apt-get install -y chromium chromium-driver"
        if os.environ.get("SAM_BLOCKED_REQUIRE_BROWSER"):  # set by .ci/run: there a skip would hide a broken install
            pytest.fail(reason)
        pytest.skip(reason)
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1400,1700",
        f"--user-data-dir={tempfile.mkdtemp(prefix='sam_blocked_chromium_')}",
    ]
    for flag in flags:
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=Service(driver))


@pytest.mark.slow
def test_browser_upload_click_shows_a_mask(served, image_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser = _browser()
    ARTIFACTS.mkdir(exist_ok=True)
    try:
        browser.get(served)
        wait = WebDriverWait(browser, 120)
        wait.until(lambda b: b.find_element(By.ID, "random-weights-banner").text)
        assert "masks are meaningless until a checkpoint is given" in browser.find_element(By.ID, "random-weights-banner").text
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "img[src*='astronaut.png']"))  # listed as an example
        browser.find_element(By.CSS_SELECTOR, "#upload input[type=file]").send_keys(image_path)
        wait.until(lambda b: "Encoded" in b.find_element(By.ID, "status").text)
        picture = browser.find_element(By.CSS_SELECTOR, "#canvas img")
        before = picture.get_attribute("src")
        assert browser.find_elements(By.CSS_SELECTOR, "#mask img") == []
        ActionChains(browser).move_to_element_with_offset(picture, 20, -30).click().perform()
        wait.until(lambda b: b.find_element(By.CSS_SELECTOR, "#canvas img").get_attribute("src") != before)
        wait.until(lambda b: "mask 3: score" in b.find_element(By.ID, "choice").text)
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#mask img"))
        assert "1 foreground, 0 background points" in browser.find_element(By.ID, "status").text
        assert "Peak memory of the last encode" in browser.find_element(By.ID, "memory").text
    finally:
        browser.save_screenshot(str(ARTIFACTS / "demo_browser.png"))
        browser.quit()


@pytest.mark.slow
def test_browser_large_image_click_encodes_its_tile(served, mosaic_path):
    """The mosaic (3000 x 2200) is larger than SETTINGS' 512 px input: shown reduced, a click encodes the tile around it.
    The screenshot is docs/demo-tiles.png."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser = _browser()
    ARTIFACTS.mkdir(exist_ok=True)
    status = lambda b: b.find_element(By.ID, "status").text  # noqa: E731
    try:
        browser.get(served)
        wait = WebDriverWait(browser, 120)
        wait.until(lambda b: b.find_element(By.ID, "random-weights-banner").text)
        browser.find_element(By.CSS_SELECTOR, "#upload input[type=file]").send_keys(mosaic_path)
        wait.until(lambda b: "shown reduced to 1536 x 1126" in status(b))
        picture = browser.find_element(By.CSS_SELECTOR, "#canvas img")
        assert browser.execute_script("return arguments[0].naturalWidth", picture) == 1536, "the canvas is the reduced preview"
        before = picture.get_attribute("src")
        ActionChains(browser).move_to_element_with_offset(picture, -70, 40).click().perform()
        wait.until(lambda b: "Tile [" in status(b))
        assert "(512 x 512 px at native resolution): encoded now" in status(browser)
        wait.until(lambda b: b.find_element(By.CSS_SELECTOR, "#canvas img").get_attribute("src") != before)
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#mask img"))
        wait.until(lambda b: "at full resolution (3000 x 2200)" in b.find_element(By.ID, "download").text)
        ActionChains(browser).move_to_element_with_offset(browser.find_element(By.CSS_SELECTOR, "#canvas img"), -66, 44).click().perform()
        wait.until(lambda b: "2 foreground, 0 background points" in status(b))
        assert "reused (its embedding was kept: decoder only)" in status(browser)
    finally:
        browser.save_screenshot(str(ARTIFACTS / "demo_tiles.png"))
        browser.quit()
