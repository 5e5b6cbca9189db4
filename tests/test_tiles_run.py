"""`sam-blocked segment --tile` end to end on a tiled TIFF mosaic of real photographs, tiny SAM.

Random weights: the masks mean nothing; what is checked is that huge images go tile by
tile (one encoder pass per tile used), that an image fitting one tile is exactly the
untiled run, that the label TIFF, COCO RLE and object table agree, and that bad input
fails alone with a message.
"""

from __future__ import annotations

import csv
import json
import types
from pathlib import Path

import numpy as np
import pytest
import tifffile
from pycocotools import mask as mask_utils
from skimage import data

from sam_blocked import cli
from sam_blocked.summary import SUMMARY_NAME
from test_segment import EncoderCalls  # tests/ is on sys.path (pytest's rootdir import)
from test_tiles_writers import amg_bbox

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")


def segment(*args: object) -> int:
    return cli.main(["segment", *map(str, args), "--model-type", "tiny"])


def summary_of(out: Path) -> dict:
    return json.loads((out / SUMMARY_NAME).read_text())


def mosaic() -> np.ndarray:
    """(700, 1100, 3): astronaut, coffee and chelsea side by side."""
    image = np.zeros((700, 1100, 3), np.uint8)
    image[:512, :512] = data.astronaut()
    image[:400, 512:1100] = data.coffee()[:, :588]
    image[400:700, :451] = data.chelsea()
    return image


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("in")
    tifffile.imwrite(folder / "mosaic.tif", mosaic(), tile=(128, 128), compression="zlib")
    prompts = {
        "mosaic.tif": [
            {"name": "face", "foreground": [[222, 125]]},
            {"name": "cup", "box": [720, 100, 840, 230]},  # straddles tile borders: a tile of its own
            {"name": "cat", "foreground": [[200, 550]], "background": [[300, 650]]},
            {"name": "corner", "foreground": [[1099, 699]]},  # the shifted last tile
        ]
    }
    (folder / "prompts.json").write_text(json.dumps(prompts))
    return folder


def read_outputs(out: Path, stem: str):
    labels = tifffile.imread(out / f"{stem}.labels.tif")
    coco = json.loads((out / f"{stem}.json").read_text())
    table = list(csv.DictReader((out / f"{stem}.objects.csv").open()))
    return labels, coco, table


def check_outputs_agree(labels: np.ndarray, coco: dict, table: list[dict]) -> list[np.ndarray]:
    """The label TIFF, the RLE and the table describe the same masks; returns the decoded masks."""
    height, width = labels.shape
    assert labels.dtype == np.uint32 and (coco["image"]["height"], coco["image"]["width"]) == (height, width)
    anns = coco["annotations"]
    assert [a["id"] for a in anns] == [int(r["id"]) for r in table] == list(range(1, len(anns) + 1))
    masks = [mask_utils.decode(a["segmentation"]).astype(bool) for a in anns]
    order = sorted(range(len(masks)), key=lambda i: -masks[i].sum())  # painted largest first: the smallest wins
    expected = np.zeros((height, width), np.uint32)
    for i in order:
        expected[masks[i]] = i + 1
    np.testing.assert_array_equal(labels, expected)
    for ann, row, mask in zip(anns, table, masks):
        assert int(row["area"]) == ann["area"] == int(mask.sum())
        assert [int(row[c]) for c in ("bbox_x0", "bbox_y0", "bbox_w", "bbox_h")] == ann["bbox"] == amg_bbox(mask)
        assert (row["truncated"] == "True") == ann["truncated"]
        assert [int(row[c]) for c in ("crop_box_x0", "crop_box_y0", "crop_box_w", "crop_box_h")] == ann["crop_box"]
    return masks


@pytest.mark.slow
def test_prompt_mode_encodes_only_the_tiles_its_prompts_need(inputs, tmp_path, monkeypatch):
    out = tmp_path / "out"
    calls = EncoderCalls(monkeypatch)
    assert segment(inputs / "mosaic.tif", "--prompts", inputs / "prompts.json", "--output", out, "--tile", 256, "--multimask") == 0
    (done,) = summary_of(out)["done"]
    assert done["tiles"] == 24 and done["encoder_passes"] == calls.count == 4, "4 prompt sets in 4 tiles, each encoded once"
    assert summary_of(out)["counts"]["encoder_passes"] == 4
    labels, coco, table = read_outputs(out, "mosaic")
    masks = check_outputs_agree(labels, coco, table)
    assert len(masks) == 12 and [r["prompt_name"] for r in table[::3]] == ["face", "cup", "cat", "corner"]
    corner = coco["annotations"][9]
    assert corner["crop_box"] == [844, 444, 256, 256], "the shifted last tile"
    assert all(m[y0 : y0 + 256, x0 : x0 + 256].sum() == m.sum() for m, (x0, y0, _, _) in zip(masks, (a["crop_box"] for a in coco["annotations"])))

    assert segment(inputs / "mosaic.tif", "--prompts", inputs / "prompts.json", "--output", out, "--tile", 256, "--multimask") == 0
    assert calls.count == 4 and summary_of(out)["counts"]["skipped"] == 1, "a complete image is not redone"


@pytest.mark.slow
def test_automatic_masks_of_a_tiled_image(inputs, tmp_path):
    out = tmp_path / "out"
    code = segment(
        inputs / "mosaic.tif", "--auto", "--output", out, "--tile", 256, "--overlap", 32, "--points-per-side", 4,
        "--pred-iou-thresh", 0, "--stability-score-thresh", 0, "--box-nms-thresh", 0.5,
    )  # fmt: skip
    assert code == 0
    (done,) = summary_of(out)["done"]
    assert done["tiles"] == done["encoder_passes"] == 15
    masks = check_outputs_agree(*read_outputs(out, "mosaic"))
    assert len(masks) >= 10, "random weights: about one noise mask per tile survives box NMS"
    for i, a in enumerate(masks):
        for b in masks[i + 1 :]:
            inter = (a & b).sum()
            assert inter / (a.sum() + b.sum() - inter) <= 0.5, "no two masks overlap above --box-nms-thresh"


@pytest.mark.slow
@pytest.mark.parametrize("mode", [["--prompts", "PROMPTS"], ["--auto", "--points-per-side", "3", "--pred-iou-thresh", "0", "--stability-score-thresh", "0"]], ids=["prompts", "auto"])
def test_an_image_that_fits_one_tile_is_exactly_the_untiled_run(tmp_path, mode):
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps({"chelsea.jpg": [{"name": "eye", "foreground": [[170, 115]]}, {"name": "box", "box": [50, 50, 300, 250]}]}))
    mode = [str(prompts) if m == "PROMPTS" else m for m in mode]
    assert segment(EXAMPLES / "chelsea.jpg", *mode, "--output", tmp_path / "tiled", "--tile", 512, "--format", "coco") == 0
    assert segment(EXAMPLES / "chelsea.jpg", *mode, "--output", tmp_path / "whole", "--img-size", 512, "--format", "coco") == 0
    tiled = json.loads((tmp_path / "tiled" / "chelsea.json").read_text())["annotations"]
    whole = json.loads((tmp_path / "whole" / "chelsea.json").read_text())["annotations"]
    assert len(tiled) == len(whole) > 0
    for t, w in zip(tiled, whole):
        assert t["segmentation"] == w["segmentation"] and t["predicted_iou"] == w["predicted_iou"] and t["crop_box"] == w["crop_box"]
        assert t["bbox"] == w["bbox"] and t["area"] == w["area"], "the same numbers as the untiled run (amg.py's bbox)"
        assert t["truncated"] is False
    assert summary_of(tmp_path / "tiled")["done"][0]["encoder_passes"] == 1


@pytest.mark.slow
def test_bad_inputs_fail_alone_with_a_message(inputs, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "good.tif").write_bytes((inputs / "mosaic.tif").read_bytes())
    whole = (inputs / "mosaic.tif").read_bytes()
    (folder / "truncated.tif").write_bytes(whole[: len(whole) // 2])
    (folder / "big-box.tif").write_bytes(whole)
    prompts = {
        "good.tif": [{"foreground": [[10, 10]]}],
        "truncated.tif": [{"foreground": [[10, 10]]}],
        "big-box.tif": [{"name": "huge", "box": [0, 0, 600, 100]}],
    }
    (folder / "p.json").write_text(json.dumps(prompts))
    out = tmp_path / "out"
    assert segment(folder, "--pattern", "*.tif", "--prompts", folder / "p.json", "--output", out, "--tile", 256) == 1
    summary = summary_of(out)
    failed = {f["image"]: f["reason"] for f in summary["failed"]}
    assert set(failed) == {"truncated.tif", "big-box.tif"}
    assert "truncated" in failed["truncated.tif"] or "incomplete" in failed["truncated.tif"], failed["truncated.tif"]
    assert "'huge': box [0.0, 0.0, 600.0, 100.0]" in failed["big-box.tif"] and "--tile 256" in failed["big-box.tif"] and "raise --tile to 608" in failed["big-box.tif"]
    assert [d["image"] for d in summary["done"]] == ["good.tif"], "the run goes on"
    assert not any(p.name.startswith(".") for p in out.iterdir()), "no partial files"


@pytest.mark.slow
def test_png_is_refused_for_huge_images_naming_the_formats_that_fit(inputs, tmp_path):
    out = tmp_path / "out"
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps({"mosaic.tif": [{"foreground": [[10, 10]]}], "chelsea.jpg": [{"foreground": [[10, 10]]}]}))
    tifffile.imwrite(tmp_path / "mosaic.tif", np.zeros((4200, 4100, 3), np.uint8), tile=(512, 512), compression="zlib")
    code = segment(tmp_path / "mosaic.tif", EXAMPLES / "chelsea.jpg", "--prompts", prompts, "--output", out, "--tile", 256, "--format", "png")
    assert code == 1
    (failure,) = summary_of(out)["failed"]
    assert failure["image"] == "mosaic.tif" and "--format png" in failure["reason"] and "labels coco table" in failure["reason"]
    assert (out / "chelsea" / "metadata.csv").is_file(), "an image that fits gets its PNG folder"


@pytest.mark.parametrize(
    "args, phrase",
    [
        (["--tile", "100"], "--tile 100 must be a positive multiple of the patch size 16.*96 or 112"),
        (["--tile", "256", "--overlap", "256"], r"--overlap 256 px must be a whole number in \[0, 256\)"),
        (["--tile", "big"], "--tile 'big': give a size in px"),
        (["--tile", "256", "--img-size", "512"], "--tile 256 is the model's input size.*--img-size is 512"),
        (["--tile", "auto", "--img-size", "512"], "--tile auto picks the model's input size"),
        (["--overlap", "64"], "go with --tile"),
        (["--tile", "256", "--max-memory-mb", "900"], "--max-memory-mb picks the tile size for --tile auto"),
        (["--tile", "256", "--overlay"], "--overlay draws the masks on the whole image"),
        (["--tile", "256", "--format", "labels,gif"], "--format labels,gif: choose one or more of png, coco, labels, table"),
    ],
)
def test_bad_tile_flags_exit_2_with_one_line(tmp_path, capsys, args, phrase):
    assert segment(EXAMPLES / "chelsea.jpg", "--auto", "--output", tmp_path / "out", *args) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err
    assert __import__("re").search(phrase, err), err


def test_crop_layers_are_refused_with_tiles(tmp_path, capsys):
    assert segment(EXAMPLES / "chelsea.jpg", "--auto", "--output", tmp_path / "out", "--tile", "256", "--crop-n-layers", "1") == 2
    assert "leave --crop-n-layers at 0" in capsys.readouterr().err


@pytest.fixture
def planner(monkeypatch):
    """sam_blocked.memory.planner with a stand-in largest_input_size that records its call and answers `size`."""
    from sam_blocked.memory import planner as module

    stand_in = types.SimpleNamespace(calls=[], size=256)

    def largest_input_size(model_type, max_memory_mb, *, dtype, device, chunks, max_block_mb, points_per_batch, multiple=16, backend="auto"):
        stand_in.calls.append(dict(model_type=model_type, max_memory_mb=max_memory_mb, dtype=dtype, device=device, points_per_batch=points_per_batch, multiple=multiple))
        return stand_in.size

    monkeypatch.setattr(module, "largest_input_size", largest_input_size)
    return stand_in


@pytest.mark.slow
def test_tile_auto_takes_the_planners_largest_input_size(planner, inputs, tmp_path, capsys):
    out = tmp_path / "out"
    assert segment(inputs / "mosaic.tif", "--prompts", inputs / "prompts.json", "--output", out, "--tile", "auto", "--max-memory-mb", 900) == 0
    assert planner.calls == [dict(model_type="tiny", max_memory_mb=900.0, dtype="float32", device="cpu", points_per_batch=1, multiple=16)]
    assert "tile: 256 px" in capsys.readouterr().err
    assert summary_of(out)["done"][0]["tiles"] == 24 and summary_of(out)["settings"]["options"]["tiling"] == {"tile": 256, "overlap": 64}
    planner.size = None
    assert segment(inputs / "mosaic.tif", "--auto", "--output", out, "--tile", "auto", "--max-memory-mb", 10) == 2
    assert "no input size of tiny fits 10 MiB" in capsys.readouterr().err


@pytest.mark.slow
def test_tile_auto_with_the_real_planner(inputs, tmp_path, capsys):
    from sam_blocked.memory.planner import largest_input_size

    expected = largest_input_size("tiny", 150, dtype="float32", device="cpu", chunks=16, max_block_mb=None, points_per_batch=64)
    assert expected is not None and expected < 700, "small enough to tile the mosaic"
    out = tmp_path / "out"
    code = segment(inputs / "mosaic.tif", "--auto", "--output", out, "--tile", "auto", "--max-memory-mb", 150, "--points-per-side", 2,
                   "--pred-iou-thresh", 0, "--stability-score-thresh", 0)  # fmt: skip
    assert code == 0
    assert f"tile: {expected} px" in capsys.readouterr().err
    assert summary_of(out)["settings"]["options"]["tiling"]["tile"] == expected and summary_of(out)["done"][0]["tiles"] > 1
