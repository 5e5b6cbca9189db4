"""`sam-blocked segment` end to end on real photographs (examples/) with the tiny model.

The tiny model has random weights, so the masks mean nothing; what is checked is the
plumbing: one encoder pass per image, the files amg.py writes, COCO RLE equal to the
PNGs, resume, interrupts, and a per-image message for each bad input.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from segment_anything import SamPredictor
from segment_anything.modeling import ImageEncoderViT

from sam_blocked import cli
from sam_blocked.inputs.images import ImageItem, InputError, collect_images, read_image
from sam_blocked.outputs.images import AMG_COLUMNS, PREVIEW_SIZE, PROMPT_COLUMNS, ImageOutputs
from sam_blocked.inputs.prompts import Prompt, load_prompts, match_prompts
from sam_blocked.segment import LOG_NAME, SUMMARY_NAME, prompt_masks

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
# pycocotools' decode under numpy 2; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")
PHOTOS = ("astronaut.jpg", "chelsea.jpg", "coffee.jpg")


def segment(*args: object) -> int:
    """`sam-blocked segment ARGS --model-type tiny`, in process."""
    return cli.main(["segment", *map(str, args), "--model-type", "tiny"])


def summary_of(out: Path) -> dict:
    return json.loads((out / SUMMARY_NAME).read_text())


def partials(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if ".partial" in p.name or ".replaced" in p.name]


def write_prompts(path: Path, prompts: dict) -> Path:
    path.write_text(json.dumps(prompts))
    return path


class EncoderCalls:
    """Counts ImageEncoderViT forward passes while installed."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        forward = ImageEncoderViT.forward

        def counting(module, x):
            self.count += 1
            return forward(module, x)

        monkeypatch.setattr(ImageEncoderViT, "forward", counting)


# ------------------------------------------------------------ prompts mode, both formats


@pytest.fixture(scope="module")
def prompted(tmp_path_factory):
    out = tmp_path_factory.mktemp("prompted")
    with pytest.MonkeyPatch.context() as mp:
        calls = EncoderCalls(mp)
        code = segment(EXAMPLES, "--prompts", EXAMPLES / "prompts.json", "--output", out, "--format", "both", "--overlay")
    return out, code, calls.count


@pytest.mark.slow
def test_prompts_mode_writes_amg_folders_and_coco_json(prompted):
    out, code, encoder_calls = prompted
    prompts = load_prompts(EXAMPLES / "prompts.json")
    assert code == 0
    assert encoder_calls == len(PHOTOS), "one encoder pass per image, whatever the number of prompt sets"
    summary = summary_of(out)
    assert summary["counts"] == {"images": 3, "done": 3, "skipped": 0, "failed": 0, "not_finished": 0}
    assert summary["peak_memory_bytes"] > 0 and summary["seconds"] > 0 and not summary["interrupted"]
    for name in PHOTOS:
        height, width = np.asarray(Image.open(EXAMPLES / name)).shape[:2]
        stem = name.removesuffix(".jpg")
        rows = list(csv.DictReader((out / stem / "metadata.csv").open()))
        assert list(rows[0]) == AMG_COLUMNS + PROMPT_COLUMNS
        assert [r["prompt_name"] for r in rows] == [p.name for p in prompts[name]], "best mask: one per prompt set"
        coco = json.loads((out / f"{stem}.json").read_text())
        assert coco["image"] == {"file_name": name, "height": height, "width": width}
        assert len(coco["annotations"]) == len(rows)
        for row, ann in zip(rows, coco["annotations"]):
            png = np.asarray(Image.open(out / stem / f"{row['id']}.png"))
            assert png.shape == (height, width) and png.dtype == np.uint8
            assert set(np.unique(png)) <= {0, 255}
            decoded = mask_utils.decode(ann["segmentation"])
            np.testing.assert_array_equal(decoded * 255, png, err_msg=f"{name} mask {row['id']}: RLE differs from PNG")
            assert int(row["area"]) == ann["area"] == int(decoded.sum())
            assert [float(row[c]) for c in ("crop_box_w", "crop_box_h")] == [width, height]
        preview = Image.open(out / f"{stem}.overlay.png")
        assert preview.format == "PNG" and max(preview.size) <= PREVIEW_SIZE
    log = (out / LOG_NAME).read_text()
    assert all(f"done {name}" in log for name in PHOTOS)
    assert not partials(out)


def test_csv_and_json_example_prompts_agree():
    assert load_prompts(EXAMPLES / "prompts.csv") == load_prompts(EXAMPLES / "prompts.json")


@pytest.mark.slow
def test_prompt_masks_match_sam_predictor(tiny_sam, photo):
    predictor = SamPredictor(tiny_sam)
    predictor.set_image(photo)
    prompt = Prompt("p", foreground=((222.0, 125.0),), background=((225.0, 45.0),), box=(150.0, 40.0, 300.0, 200.0))
    masks, scores, _ = predictor.predict(*prompt.points(), box=np.array(prompt.box), multimask_output=True)
    got = list(prompt_masks(predictor, [prompt], multimask=True))
    assert [r["mask_index"] for r, _ in got] == [0, 1, 2]
    for (record, mask), expected, score in zip(got, masks, scores):
        mismatch = int((mask != expected).sum())
        assert mismatch <= 0.001 * mask.size, f"mask {record['mask_index']}: {mismatch} pixels differ from SamPredictor.predict"
        assert record["predicted_iou"] == pytest.approx(float(score), abs=1e-5)
    best = list(prompt_masks(predictor, [prompt], multimask=False))
    assert len(best) == 1 and best[0][0]["mask_index"] == int(np.argmax(scores))


# -------------------------------------------------------------------------- auto mode


@pytest.mark.slow
def test_auto_mode_writes_amg_metadata_and_matching_rle(tmp_path):
    out = tmp_path / "out"
    code = segment(
        EXAMPLES / "chelsea.jpg", "--auto", "--output", out, "--format", "both",
        "--points-per-side", 4, "--pred-iou-thresh", 0, "--stability-score-thresh", 0,
    )  # fmt: skip
    assert code == 0
    rows = list(csv.DictReader((out / "chelsea" / "metadata.csv").open()))
    assert list(rows[0]) == AMG_COLUMNS, "auto mode writes exactly amg.py's columns"
    anns = json.loads((out / "chelsea.json").read_text())["annotations"]
    assert len(rows) == len(anns) > 0
    for row, ann in zip(rows, anns):
        png = np.asarray(Image.open(out / "chelsea" / f"{row['id']}.png"))
        np.testing.assert_array_equal(mask_utils.decode(ann["segmentation"]) * 255, png)
        assert float(row["point_input_x"]) == ann["point_coords"][0][0]


# ----------------------------------------------------------------- resume, interrupts


@pytest.mark.slow
def test_rerun_skips_complete_images_cleans_leftovers_and_overwrite_redoes(tmp_path, monkeypatch):
    prompts = write_prompts(tmp_path / "p.json", {"astronaut.jpg": [{"foreground": [[222, 125]]}]})
    out = tmp_path / "out"
    args = (EXAMPLES / "astronaut.jpg", "--prompts", prompts, "--output", out, "--format", "both")
    calls = EncoderCalls(monkeypatch)
    assert segment(*args) == 0 and calls.count == 1
    first = (out / "astronaut" / "0.png").stat().st_mtime_ns

    assert segment(*args) == 0
    assert calls.count == 1, "a complete image is not encoded again"
    assert summary_of(out)["counts"]["skipped"] == 1
    assert (out / "astronaut" / "0.png").stat().st_mtime_ns == first

    # What an interrupted run leaves: one output missing, partial files and folders.
    (out / "astronaut.json").unlink()
    (out / ".astronaut.partial").mkdir()
    (out / ".astronaut.partial" / "7.png").write_bytes(b"half")
    (out / ".astronaut.json.partial").write_text('{"ima')
    assert segment(*args) == 0 and calls.count == 2
    assert summary_of(out)["counts"]["done"] == 1
    assert (out / "astronaut.json").is_file() and not partials(out)
    assert sorted(p.name for p in (out / "astronaut").iterdir()) == ["0.png", "metadata.csv"]

    assert segment(*args, "--overwrite") == 0 and calls.count == 3
    assert summary_of(out)["counts"]["done"] == 1 and not partials(out)


def _ctrl_c() -> None:
    raise KeyboardInterrupt


def _sigterm() -> None:
    os.kill(os.getpid(), signal.SIGTERM)  # what a batch scheduler sends at its time limit


@pytest.mark.slow
@pytest.mark.parametrize("interrupt", [_ctrl_c, _sigterm], ids=["ctrl-c", "sigterm"])
def test_interrupt_leaves_no_partial_files_and_says_so(tmp_path, monkeypatch, interrupt):
    prompts = write_prompts(tmp_path / "p.json", {"astronaut.jpg": [{"foreground": [[222, 125]]}, {"box": [280, 345, 510, 510]}]})
    out = tmp_path / "out"
    add = ImageOutputs.add

    def add_then_interrupt(self, record, mask):
        add(self, record, mask)  # the first mask is in the staging folder
        interrupt()

    monkeypatch.setattr(ImageOutputs, "add", add_then_interrupt)
    assert segment(EXAMPLES / "astronaut.jpg", "--prompts", prompts, "--output", out, "--format", "both", "--overlay") == 130
    summary = summary_of(out)
    assert summary["interrupted"] and summary["counts"]["not_finished"] == 1
    assert not partials(out)
    assert {p.name for p in out.iterdir()} == {LOG_NAME, SUMMARY_NAME}, "no output of the interrupted image"


# ------------------------------------------------------------------------ bad inputs


def _photo(size=(80, 60)) -> Image.Image:
    return Image.open(EXAMPLES / "astronaut.jpg").convert("RGB").resize(size)


@pytest.fixture
def bad_folder(tmp_path):
    """Every kind of awkward input, and a prompt file for them."""
    d = tmp_path / "in"
    d.mkdir()
    _photo().convert("L").save(d / "gray.png")
    rgba = _photo().convert("RGBA")
    rgba.putalpha(128)
    rgba.save(d / "rgba.png")
    _photo().convert("P").save(d / "palette.png")
    gray16 = np.asarray(_photo().convert("L"), dtype=np.uint16) * 200 + 1000
    Image.fromarray(gray16).save(d / "sixteen.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 80 x 60, shown rotated 90 degrees: 60 x 80
    _photo().save(d / "exif.jpg", exif=exif)
    _photo().save(d / "outside.png")
    _photo().save(d / "unprompted.png")
    _photo((700, 500)).save(d / "big.png")
    whole = (EXAMPLES / "coffee.jpg").read_bytes()
    (d / "truncated.jpg").write_bytes(whole[: len(whole) // 3])
    (d / "notes.jpg").write_text("not a picture\n")
    _photo().save(d / "unreadable.png")
    os.chmod(d / "unreadable.png", 0)
    names = ["gray.png", "rgba.png", "palette.png", "sixteen.png", "exif.jpg", "big.png", "truncated.jpg", "notes.jpg", "unreadable.png"]
    prompts = {name: [{"foreground": [[10, 10]]}] for name in names}
    prompts["outside.png"] = [{"name": "far", "foreground": [[500, 10]]}]
    prompts["ghost.jpg"] = [{"foreground": [[10, 10]]}]
    return d, write_prompts(tmp_path / "prompts.json", prompts)


@pytest.mark.slow
def test_bad_inputs_fail_alone_with_a_message(bad_folder, tmp_path, monkeypatch, capsys):
    folder, prompts = bad_folder
    if os.geteuid() == 0:  # root reads a chmod 000 file anyway: make the reader see what a user would
        from sam_blocked.inputs import images as images_module

        real_open = images_module.open_header

        def open_as_user(fp, *args, **kwargs):
            if Path(fp).name == "unreadable.png":
                raise PermissionError(13, "Permission denied", str(fp))
            return real_open(fp, *args, **kwargs)

        monkeypatch.setattr(images_module, "open_header", open_as_user)
    out = tmp_path / "out"
    code = segment(folder, "--prompts", prompts, "--output", out, "--max-pixels", 300_000)
    assert code == 1, "non-zero exit when any image failed"
    summary = summary_of(out)
    failed = {f["image"]: f["reason"] for f in summary["failed"]}
    expected = {
        "unreadable.png": "permission denied",
        "truncated.jpg": "truncated",
        "notes.jpg": "not an image",
        "big.png": "--max-pixels 300,000",
        "outside.png": "outside the 80 x 60 image",
        "ghost.jpg": "not among the",
    }
    assert set(failed) == set(expected)
    for name, phrase in expected.items():
        assert phrase in failed[name], f"{name}: {failed[name]!r} should say {phrase!r}"
    done = {d["image"]: d for d in summary["done"]}
    assert set(done) == {"gray.png", "rgba.png", "palette.png", "sixteen.png", "exif.jpg"}, "the run goes on"
    notes = {name: " ".join(d["notes"]) for name, d in done.items()}
    assert "mode L" in notes["gray.png"] and "alpha dropped" in notes["rgba.png"] and "mode P" in notes["palette.png"]
    assert "stretched" in notes["sixteen.png"] and "EXIF orientation 6" in notes["exif.jpg"]
    assert [s["image"] for s in summary["skipped"]] == ["unprompted.png"]
    assert np.asarray(Image.open(out / "exif" / "0.png")).shape == (80, 60), "masks are in the rotated frame"
    assert np.asarray(Image.open(out / "sixteen" / "0.png")).shape == (60, 80)
    log = (out / LOG_NAME).read_text()
    err = capsys.readouterr().err
    for name in expected:
        assert f"failed {name}" in log and f"failed {name}" in err
    assert "Traceback" not in log + err
    assert not partials(out)


def test_read_image_converts_to_rgb_uint8(bad_folder):
    folder, _ = bad_folder
    reference = np.asarray(_photo())
    for name in ("gray.png", "rgba.png", "palette.png", "sixteen.png"):
        image, notes = read_image(folder / name)
        assert image.shape == (60, 80, 3) and image.dtype == np.uint8 and notes, name
    sixteen, _ = read_image(folder / "sixteen.png")
    assert sixteen.min() == 0 and sixteen.max() == 255, "16-bit values are stretched to the full 8-bit range"
    rgba, _ = read_image(folder / "rgba.png")
    np.testing.assert_array_equal(rgba, reference)
    rotated, notes = read_image(folder / "exif.jpg")
    assert rotated.shape == (80, 60, 3) and "EXIF" in notes[0]
    stored = np.asarray(Image.open(folder / "exif.jpg"))
    np.testing.assert_array_equal(rotated, np.rot90(stored, k=-1))  # orientation 6: 90 degrees clockwise
    assert read_image(EXAMPLES / "astronaut.jpg")[1] == []


@pytest.mark.parametrize(
    "name, max_pixels, phrase",
    [("big.png", 300_000, "above max_pixels"), ("truncated.jpg", None, "truncated"), ("notes.jpg", None, "not an image")],
)
def test_read_image_refuses_with_a_reason(bad_folder, name, max_pixels, phrase):
    folder, _ = bad_folder
    limit = Image.MAX_IMAGE_PIXELS
    with pytest.raises(InputError, match=phrase):
        read_image(folder / name, **({"max_pixels": max_pixels} if max_pixels else {}))
    assert Image.MAX_IMAGE_PIXELS == limit, "PIL's own limit is restored"


def test_read_image_never_turns_off_pils_bomb_guard_for_other_threads(tmp_path, monkeypatch):
    """PIL's MAX_IMAGE_PIXELS is process-wide: reading an image above it (but under max_pixels) in one
    thread leaves it as it is for every other thread, while the image is open and decoded."""
    import threading

    from PIL import ImageOps

    path = tmp_path / "photo.png"
    _photo().save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 80 x 60 = 4,800 pixels: above 2 x PIL's limit
    seen: list[object] = []
    decode = ImageOps.exif_transpose

    def watch_while_decoding(image, **kwargs):  # runs in the reading thread, between open and decode
        seen.append(Image.MAX_IMAGE_PIXELS)
        return decode(image, **kwargs)

    monkeypatch.setattr(ImageOps, "exif_transpose", watch_while_decoding)
    stop, polled = threading.Event(), set()

    def poll() -> None:
        while not stop.is_set():
            polled.add(Image.MAX_IMAGE_PIXELS)

    results: list[np.ndarray] = []
    poller = threading.Thread(target=poll)
    poller.start()
    try:
        readers = [threading.Thread(target=lambda: results.append(read_image(path, max_pixels=10_000)[0])) for _ in range(4)]
        for reader in readers:
            reader.start()
        for reader in readers:
            reader.join()
    finally:
        stop.set()
        poller.join()
    assert len(results) == 4 and all(r.shape == (60, 80, 3) for r in results), "images above PIL's limit but under max_pixels are read"
    assert seen == [1000] * 4 and polled == {1000}, f"PIL's limit changed while reading: {seen}, {polled}"
    with pytest.raises(InputError, match="4,800 pixels is above max_pixels 4,000") as refused:
        read_image(path, max_pixels=4000)
    assert refused.value.settings == ("max_pixels",) and Image.MAX_IMAGE_PIXELS == 1000


def test_refusals_name_the_setting_and_the_cli_says_its_flag(tmp_path):
    """The library names max_pixels; the CLI spells it --max-pixels, in its errors and in the run's reasons."""
    from sam_blocked.errors import FlagNames, SettingError

    big = tmp_path / "big.png"
    _photo((700, 500)).save(big)
    with pytest.raises(InputError) as refused:
        read_image(big, max_pixels=300_000)
    message = str(refused.value)
    assert "above max_pixels 300,000" in message and "raise max_pixels" in message and "--" not in message
    assert refused.value.spelled(cli.FLAGS) == message.replace("max_pixels", "--max-pixels")
    assert SettingError("{formats} {x} {", "formats").spelled(FlagNames({"formats": "format"})) == "--format {x} {"
    out = tmp_path / "out"
    assert segment(big, "--auto", "--output", out, "--max-pixels", 300_000) == 1
    (failure,) = summary_of(out)["failed"]
    assert "above --max-pixels 300,000" in failure["reason"] and "raise --max-pixels" in failure["reason"]


def test_auto_mask_that_cannot_fit_is_refused_naming_the_tile_flag(tmp_path, monkeypatch):
    # Points are decoded a chunk at a time now, so points_per_batch does not count; one mask
    # at 451 x 300 still wants ~12 bytes a pixel (1.5 MiB), more than 1 MiB.
    monkeypatch.setattr("sam_blocked.engines.unit.available_bytes", lambda device: 2**20)
    out = tmp_path / "out"
    assert segment(EXAMPLES / "chelsea.jpg", "--auto", "--output", out) == 1
    (failure,) = summary_of(out)["failed"]
    assert "--tile" in failure["reason"] and "451 x 300" in failure["reason"]


def test_clashing_output_names_and_foreign_folders_fail_without_touching_files(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("a.jpg", "a.png", "b.png"):
        _photo().save(folder / name)
    out = tmp_path / "out"
    (out / "b").mkdir(parents=True)
    (out / "b" / "mine.txt").write_text("the user's own file")
    prompts = write_prompts(tmp_path / "p.json", {"a.jpg": [{"foreground": [[500, 1]]}], "a.png": [{"box": [1, 1, 9, 9]}], "b.png": [{"foreground": [[1, 1]]}]})
    assert segment(folder, "--prompts", prompts, "--output", out) == 1
    failed = {f["image"]: f["reason"] for f in summary_of(out)["failed"]}
    assert "outside" in failed["a.jpg"]
    assert "already used by" in failed["a.png"] and str(folder / "a.jpg") in failed["a.png"]
    assert "not ours" in failed["b.png"]
    assert (out / "b" / "mine.txt").read_text() == "the user's own file"


# --------------------------------------------------------------- prompt files, inputs


@pytest.mark.parametrize(
    "suffix, text, phrase",
    [
        (".json", "{not json", "not valid JSON"),
        (".json", "[1, 2]", "top level must map"),
        (".json", '{"a.jpg": [{"foregound": [[1, 2]]}]}', "unknown key"),
        (".json", '{"a.jpg": [{"foreground": [[1]]}]}', r"expected \[x, y\]"),
        (".json", '{"a.jpg": [{"box": [5, 5, 1, 9]}]}', "x0 < x1"),
        (".json", '{"a.jpg": [{"name": "n"}]}', "at least one point or a box"),
        (".json", '{"a.jpg": [{"name": "n", "foreground": [[1, 2]]}, {"name": "n", "box": [0, 0, 1, 1]}]}', "unique"),
        (".json", '{"a.jpg": [{"box": [0, 0, 1, 1]}], "./a.jpg": [{"box": [0, 0, 2, 2]}]}', "same image"),
        (".csv", "image,kind,x0,y0\n", "missing column"),
        (".csv", "image,name,kind,x0,y0,x1,y1\na.jpg,n,edge,1,2,,\n", "kind 'edge'"),
        (".csv", "image,name,kind,x0,y0,x1,y1\na.jpg,n,box,0,0,4,4\na.jpg,n,box,1,1,5,5\n", "one box per prompt set"),
        (".csv", "image,name,kind,x0,y0,x1,y1\na.jpg,n,foreground,one,2,,\n", "line 2.*not a number"),
        (".txt", "", ".json or .csv"),
    ],
)
def test_bad_prompt_files_are_refused_naming_the_entry(tmp_path, suffix, text, phrase):
    path = tmp_path / f"prompts{suffix}"
    path.write_text(text)
    with pytest.raises(ValueError, match=phrase):
        load_prompts(path)


def test_prompt_keys_match_file_name_relative_path_or_path(tmp_path):
    images = [ImageItem(tmp_path / "in" / "sub" / "a.jpg", "sub/a.jpg"), ImageItem(tmp_path / "in" / "b.jpg", "b.jpg")]
    p = [Prompt("x", foreground=((1.0, 1.0),))]
    matched, missing = match_prompts({"sub/a.jpg": p, "b.jpg": p, "c.jpg": p}, images)
    assert set(matched) == set(images) and [key for key, _ in missing] == ["c.jpg"]
    twins = [ImageItem(tmp_path / "x" / "a.jpg", "x/a.jpg"), ImageItem(tmp_path / "y" / "a.jpg", "y/a.jpg")]
    with pytest.raises(ValueError, match="names several images"):
        match_prompts({"a.jpg": p}, twins)


def test_collect_images_from_folders_patterns_and_globs(tmp_path):
    d = tmp_path / "in"
    (d / "sub").mkdir(parents=True)
    for name in ("b.jpg", "a.PNG", "notes.txt", ".hidden.jpg", "sub/c.tif"):
        (d / name).write_bytes(b"x")
    out = d / "out"
    out.mkdir()
    (out / "0.png").write_bytes(b"x")
    images, problems = collect_images([d], exclude=out)
    assert [i.name for i in images] == ["a.PNG", "b.jpg"] and not problems
    images, _ = collect_images([d], pattern="**/*", exclude=out)
    assert [i.name for i in images] == ["a.PNG", "b.jpg", "notes.txt", "sub/c.tif"]
    images, problems = collect_images([str(d / "*.jpg"), d / "b.jpg", tmp_path / "missing.jpg", str(tmp_path / "*.gif")])
    assert [i.name for i in images] == ["b.jpg"], "each file once"
    assert [p[0] for p in problems] == [str(tmp_path / "missing.jpg"), str(tmp_path / "*.gif")]
    images, _ = collect_images([str(d / "*" / "*.tif")])
    assert [i.name for i in images] == ["sub/c.tif"], "glob matches are named relative to the glob's fixed folder"


# ------------------------------------------------------------------- the command line


@pytest.mark.parametrize(
    "args, phrase",
    [
        (["--prompts", "nowhere.json"], "cannot read it"),
        (["--auto", "--multimask"], "--multimask applies to --prompts"),
        (["--prompts", str(EXAMPLES / "prompts.json"), "--points-per-side", "4"], "apply to --auto only"),
        (["--auto", "--pred-iou-thresh", "1.5"], r"--pred-iou-thresh 1.5 must be in \[0, 1\]"),
        (["--auto", "--max-pixels", "0"], "--max-pixels"),
        (["--auto", "--pattern", "/abs/*.png"], "--pattern"),
        (["--auto", "--threads", "0"], r"--threads 0: give a whole number of threads >= 1"),
    ],
)
def test_bad_flags_exit_2_with_one_line(tmp_path, capsys, args, phrase):
    assert segment(EXAMPLES, "--output", tmp_path / "out", *args) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err
    assert re.search(phrase, err), err


def _options(**kwargs):
    from sam_blocked.engines.options import SegmentOptions
    from sam_blocked.tiles.plan import Tiling

    return SegmentOptions(**{k: Tiling(256) if k == "tiling" else v for k, v in kwargs.items()})


@pytest.mark.parametrize(
    "refuse, library, args, command_line",
    [
        (lambda: load_prompts("nowhere.json"), "prompts nowhere.json: cannot read it", ["--prompts", "nowhere.json"], "--prompts nowhere.json: cannot read it"),
        (lambda: collect_images([EXAMPLES], pattern="/abs/*.png"), "pattern '/abs/*.png': give a glob", ["--auto", "--pattern", "/abs/*.png"], "--pattern '/abs/*.png': give a glob"),
        (lambda: _options(max_pixels=0), "max_pixels 0 must be a whole number >= 1", ["--auto", "--max-pixels", "0"], "--max-pixels 0 must be a whole number >= 1"),
        (lambda: _options(amg={"points_per_side": 0}), "points_per_side 0 must be a whole number >= 1", ["--auto", "--points-per-side", "0"], "--points-per-side 0 must be a whole number >= 1"),
        (lambda: _options(formats=("gif",)), "formats gif: choose one or more", ["--auto", "--format", "gif"], "--format gif: choose one or more"),
        (
            lambda: _options(overlay=True, tiling=True),
            "overlay draws the masks on the whole image: it goes with formats png/coco, not with tiling or formats labels/table",
            ["--auto", "--tile", "256", "--overlay"],
            "--overlay draws the masks on the whole image: it goes with --format png/coco, not with --tile or --format labels/table",
        ),
        (
            lambda: _options(amg={"crop_n_layers": 1}, tiling=True),
            "crop_n_layers re-runs SAM",
            ["--auto", "--tile", "256", "--crop-n-layers", "1"],
            "--crop-n-layers re-runs SAM on crops of one 1024 px view to find small objects; with --tile every pixel",
        ),
    ],
)  # fmt: skip
def test_library_refusals_name_the_setting_and_the_command_line_its_flag(tmp_path, capsys, refuse, library, args, command_line):
    from sam_blocked.errors import SettingError

    with pytest.raises(SettingError) as refused:
        refuse()
    assert str(refused.value).startswith(library) and "--" not in str(refused.value)
    assert segment(EXAMPLES, "--output", tmp_path / "out", *args) == 2
    assert f"error: {command_line}" in capsys.readouterr().err


def test_a_folder_without_matches_names_the_pattern_setting_and_the_command_line_its_flag(tmp_path, capsys):
    _, problems = collect_images([EXAMPLES], pattern="*.nothing")
    assert problems == [(str(EXAMPLES), "the folder has no new file with pattern '*.nothing'")]
    _, problems = collect_images([EXAMPLES], pattern="*.nothing", names=cli.FLAGS)
    assert problems == [(str(EXAMPLES), "the folder has no new file with --pattern '*.nothing'")]
    assert segment(EXAMPLES, "--auto", "--pattern", "*.nothing", "--output", tmp_path / "out") == 2
    assert "the folder has no new file with --pattern '*.nothing'" in capsys.readouterr().err


def test_no_images_exits_2(tmp_path, capsys):
    assert segment(tmp_path / "nothing", "--auto", "--output", tmp_path / "out") == 2
    assert "no images to segment" in capsys.readouterr().err


@pytest.mark.skipif(find_spec("cv2") is not None, reason="opencv is installed")
def test_min_mask_region_area_without_opencv_is_refused(tmp_path, capsys):
    assert segment(EXAMPLES, "--auto", "--output", tmp_path / "out", "--min-mask-region-area", "100") == 2
    assert "opencv-python-headless" in capsys.readouterr().err


@pytest.mark.slow
def test_console_script(tmp_path):
    script = Path(sys.executable).with_name("sam-blocked")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "sam_blocked"]
    prompts = write_prompts(tmp_path / "p.json", {"chelsea.jpg": [{"name": "eye", "foreground": [[170, 115]]}]})
    out = tmp_path / "out"
    result = subprocess.run(
        [*command, "segment", str(EXAMPLES / "chelsea.jpg"), str(tmp_path / "missing.jpg"),
         "--prompts", str(prompts), "--output", str(out), "--model-type", "tiny", "--overlay"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "2"},
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert "failed " + str(tmp_path / "missing.jpg") in result.stderr
    assert (out / "chelsea" / "metadata.csv").is_file() and (out / "chelsea.overlay.png").is_file()
    assert summary_of(out)["counts"]["done"] == 1


def test_the_run_loop_and_the_ray_engines_run_stay_split_at_their_seams():
    """segment_images (147 lines) and RayEngine.run (110) were split: planning, collecting and closing are helpers."""
    import inspect

    from sam_blocked.engines.ray import RayEngine
    from sam_blocked.segment import segment_images

    for function, limit in ((segment_images, 80), (RayEngine.run, 40)):
        code = len(inspect.getsource(function).splitlines()) - len((function.__doc__ or "").splitlines())
        assert code <= limit, f"{function.__qualname__} has {code} lines of code besides its docstring: split it at its seams"


def test_threads_flag_sets_this_process_threads_and_a_busy_cpu_gets_a_note(tmp_path, monkeypatch, capsys):
    """--threads is the user's choice of torch threads; on a CPU other processes already use,
    a run with all its threads, where this torch cannot give the patched steps threads of
    their own, says what is faster there (issue 23), and changes nothing itself."""
    import torch

    from sam_blocked.attention import threads
    from sam_blocked.cli.common import busy_cpu_note

    before = torch.get_num_threads()
    try:
        assert segment(EXAMPLES / "astronaut.jpg", "--output", tmp_path / "out", "--auto", "--points-per-side", "2", "--threads", "1", "--device", "cpu") == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    # where the patched steps get threads of their own (attention.threads), a busy CPU needs no note
    assert busy_cpu_note("cpu", threads=2, load=1.0, cores=2) is None or not threads.shares_steps()
    monkeypatch.setattr(threads, "_runtime", lambda: None)  # a torch whose OpenMP cannot be reached
    note = busy_cpu_note("cpu", threads=2, load=1.0, cores=2)  # one busy process on 2 cores, 2 threads
    assert note and "--threads 1" in note and "OMP_WAIT_POLICY=PASSIVE" in note and "load average 1.0 on 2 cores" in note
    assert busy_cpu_note("cpu", threads=2, load=0.1, cores=2) is None  # quiet
    assert busy_cpu_note("cpu", threads=1, load=1.0, cores=2) is None  # one thread already
    assert busy_cpu_note("cpu", threads=4, load=2.0, cores=16) is None  # room to spare
    assert busy_cpu_note("meta", threads=2, load=1.0, cores=2) is None  # not the CPU
    monkeypatch.setenv("OMP_WAIT_POLICY", "passive")
    assert busy_cpu_note("cpu", threads=2, load=1.0, cores=2) is None  # the user chose already
    monkeypatch.delenv("OMP_WAIT_POLICY")
    monkeypatch.setattr("os.getloadavg", lambda: (1.5, 1.0, 1.0))
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        capsys.readouterr()
        assert segment(EXAMPLES / "astronaut.jpg", "--output", tmp_path / "out2", "--auto", "--points-per-side", "2", "--device", "cpu") == 0
        assert "note: other processes are using the CPU (load average 1.5 on 2 cores)" in capsys.readouterr().err
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
