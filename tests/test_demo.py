"""The web demo: handlers called directly, the API through gradio_client, a click in headless Chromium.

Everything runs the "tiny" model with random weights: the masks are meaningless, the
plumbing is what is tested. The astronaut photo (512 x 512) fits the 512 px input of
SETTINGS and takes the untiled path; a 3000 x 2200 mosaic of scikit-image photographs is
larger than the 256 px input of TILED and goes tile by tile (test_demo_tiles.py; here only
in the browser).
"""

from __future__ import annotations

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

from sam_blocked.demo import handlers as demo

from sam_blocked.interactive import whole as interactive  # noqa: E402
from sam_blocked.patch import BlockedAttention, sam_attentions  # noqa: E402

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
    handle = demo.shared_model(settings.model).sam.image_encoder.register_forward_hook(lambda *_: calls.append(1))
    yield calls
    handle.remove()


@pytest.fixture
def encoder_calls():
    yield from count_encodes(SETTINGS)


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
    with pytest.raises(ValueError, match="astronaut.png: 512 x 512 = 262,144 pixels is above max_pixels 100,000"):
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
    sam = demo.shared_model(SETTINGS.model).sam
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


# ---------------------------------------------------------------------------- the served app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def served(image_path):
    """The app on 127.0.0.1 (a free port), examples from the photo's folder; closed after."""
    from sam_blocked.demo.ui import build_demo, launch_demo

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
