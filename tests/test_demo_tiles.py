"""The web demo on images larger than the model's input: shown reduced, a click encodes its tile once.

The 3000 x 2200 mosaic of scikit-image photographs (test_demo.mosaic_path) is larger than
TILED's 256 px input of the tiny model (random weights: the plumbing is tested, not masks).
The full-resolution masks are compared with what sam_blocked.tiles gives for the same prompt.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from PIL import Image

gr = pytest.importorskip("gradio", reason="the demo needs gradio: pip install 'sam-blocked[demo]'")

import tifffile  # noqa: E402
import torch  # noqa: E402
from segment_anything import SamPredictor  # noqa: E402
from test_demo import TILED, click, count_encodes, mosaic, mosaic_path  # noqa: E402,F401  tests/ is on sys.path; mosaic_path is a fixture

from sam_blocked.demo import handlers as demo

from sam_blocked.interactive import whole as interactive  # noqa: E402
from sam_blocked.interactive.tiled import Preview, TileCache  # noqa: E402
from sam_blocked.patch import patched  # noqa: E402
from sam_blocked.inputs.prompts import Prompt  # noqa: E402
from sam_blocked.tiles.crops import MaskCrop  # noqa: E402
from sam_blocked.tiles.plan import TileTask, Tiling, plan_prompts  # noqa: E402
from sam_blocked.tiles.tile import encode_tile, prompt_crops  # noqa: E402


@pytest.fixture
def tile_encodes():
    yield from count_encodes(TILED)


def library_masks(settings: demo.DemoSettings, image: np.ndarray, prompt: Prompt) -> tuple[TileTask, list[MaskCrop]]:
    """What sam_blocked.tiles gives for one prompt set: routed, its tile encoded (patched as the demo patches), decoded."""
    sam = demo.shared_model(settings.model).sam
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


def test_interactive_names_do_not_collide_with_the_batch_pipelines():
    """check_prompts is inputs.prompts' and route is tiles.geometry's: the interactive ones say what they do."""
    from sam_blocked.interactive import tiled

    assert not hasattr(interactive, "check_prompts") and not hasattr(tiled, "route")
    with pytest.raises(ValueError, match="outside the 80 x 100 image"):
        interactive.check_clicks(interactive.Prompts(points=((80, 1),), labels=(1,)), (100, 80))
    task = tiled.tile_for_prompts(interactive.Prompts(points=((300, 40),), labels=(1,)), (600, 900), Tiling(256, 64))
    x0, y0, x1, y1 = task.box
    assert x0 <= 300 < x1 and y0 <= 40 < y1 and (x1 - x0, y1 - y0) == (256, 256)
