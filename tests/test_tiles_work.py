"""The unit of work on the real architecture (tiny SAM at 256 px, random weights): one encoder
pass per tile at scale 1, prompts decoded as on the crop, SAM's own automatic-mask filters.

Random weights give masks of noise around logit 0; the model's mask threshold is raised
(an instance attribute SamPredictor and amg.py read) so that masks are sparse blobs of many
sizes, some cut by tile edges: what stitching must sort out.
"""

from __future__ import annotations

import pickle
import random

import numpy as np
import pytest
import tifffile
import torch
from segment_anything import SamAutomaticMaskGenerator, SamPredictor
from skimage import data

from sam_blocked.inputs.images import InputError
from sam_blocked.masks import prompt_masks
from sam_blocked.models.registry import build_sam
from sam_blocked.inputs.prompts import Prompt
from sam_blocked.tiles.crops import MaskCrop
from sam_blocked.tiles.plan import TileTask, Tiling, plan_points, plan_prompts
from sam_blocked.tiles.stitch import intersection, stitch_points
from sam_blocked.tiles.tile import DecodeSettings, encode_tile, segment_tile

TILE = 256
AUTO = DecodeSettings(points_per_batch=16, pred_iou_thresh=0.0, stability_score_thresh=0.01, stability_score_offset=0.02)


@pytest.fixture(scope="module")
def sam():
    model = build_sam("tiny", img_size=TILE, seed=0)
    model.mask_threshold = 0.12
    return model


@pytest.fixture(scope="module")
def mosaic() -> np.ndarray:
    """(400, 700, 3): astronaut beside coffee; 256 px tiles with 64 px overlap: 2 rows x 4 columns, last ones shifted."""
    image = np.zeros((400, 700, 3), np.uint8)
    image[:, :512] = data.astronaut()[:400]
    image[:, 512:] = data.coffee()[:400, :188]
    return image


def pasted(crop: MaskCrop, height: int, width: int) -> np.ndarray:
    out = np.zeros((height, width), bool)
    x0, y0, x1, y1 = crop.box
    out[y0:y1, x0:x1] = crop.mask
    return out


def test_tiles_of_the_mosaic_are_full_size_and_the_last_ones_shifted(mosaic):
    boxes = Tiling(TILE, 64).boxes(*mosaic.shape[:2])
    assert boxes == [(x, y, x + TILE, y + TILE) for y in (0, 144) for x in (0, 192, 384, 444)]


@pytest.mark.parametrize("box", [(0, 0, 256, 256), (444, 144, 700, 400), (192, 0, 448, 200)], ids=["first", "shifted-last", "short"])
def test_tile_embedding_is_the_encoder_run_on_the_crop(sam, mosaic, box):
    predictor = SamPredictor(sam)
    encode_tile(predictor, mosaic[:200] if box[3] == 200 else mosaic, box)
    x0, y0, x1, y1 = box
    crop = torch.as_tensor(mosaic[y0:y1, x0:x1]).permute(2, 0, 1)[None].float()  # (1, 3, h, w), no resize: scale 1
    with torch.no_grad():
        expected = sam.image_encoder(sam.preprocess(crop))
    assert predictor.input_size == predictor.original_size == (y1 - y0, x1 - x0), "pixels go in at scale 1"
    torch.testing.assert_close(predictor.features, expected, rtol=0, atol=0)


@pytest.mark.slow
def test_a_prompt_routed_to_a_tile_gives_the_crop_runs_mask_pasted_at_its_offset(sam, mosaic):
    height, width = mosaic.shape[:2]
    prompts = [
        Prompt("corner", foreground=((690.0, 395.0),)),  # only the shifted last tile holds it
        Prompt("face", foreground=((222.0, 125.0),), background=((225.0, 45.0),)),
        Prompt("box", box=(400.0, 200.0, 520.0, 330.0)),
        Prompt("edge", foreground=((700.0, 0.0),), box=(600.0, 0.0, 700.0, 60.0)),
    ]
    tasks = plan_prompts(Tiling(TILE, 64), height, width, prompts)
    routed = {index: task.box for task in tasks for index, _ in task.prompts}
    assert routed == {0: (444, 144, 700, 400), 1: (0, 0, 256, 256), 2: (384, 144, 640, 400), 3: (444, 0, 700, 256)}
    calls = 0
    for task in tasks:
        x0, y0, x1, y1 = task.box
        crops = segment_tile(SamPredictor(sam), mosaic, task, DecodeSettings(multimask=True))
        reference = SamPredictor(sam)
        reference.set_image(mosaic[y0:y1, x0:x1])
        for index, prompt in task.prompts:
            local = Prompt(prompt.name, tuple((x - x0, y - y0) for x, y in prompt.foreground), tuple((x - x0, y - y0) for x, y in prompt.background),
                           None if prompt.box is None else (prompt.box[0] - x0, prompt.box[1] - y0, prompt.box[2] - x0, prompt.box[3] - y0))  # fmt: skip
            expected = list(prompt_masks(reference, [local], multimask=True))
            got = [c for c in crops if c.record["prompt"] == index]
            assert [c.record["mask_index"] for c in got] == [0, 1, 2]
            for crop, (record, mask) in zip(got, expected):
                full = np.zeros((height, width), bool)
                full[y0:y1, x0:x1] = mask
                np.testing.assert_array_equal(pasted(crop, height, width), full, err_msg=f"prompt {prompt.name!r} mask {record['mask_index']}")
                assert crop.record["predicted_iou"] == record["predicted_iou"] and crop.record["area"] == record["area"] > 0
                assert crop.record["bbox"] == [record["bbox"][0] + x0, record["bbox"][1] + y0, *record["bbox"][2:]]
                assert crop.record["crop_box"] == [x0, y0, TILE, TILE] and crop.record["tile"] == task.index
                assert crop.record["point_coords"] == [list(p) for p in prompt.foreground + prompt.background]
                assert crop.box == (crop.x0, crop.y0, crop.x0 + record["bbox"][2] + 1, crop.y0 + record["bbox"][3] + 1), "tight to the mask"
                calls += 1
    assert calls == 12


def test_a_prompt_set_too_large_for_a_tile_is_refused_naming_the_fix():
    tiling = Tiling(TILE, 64)
    with pytest.raises(InputError, match=r"prompt set 'wide': box \[10.0, 10.0, 400.0, 50.0\] is 390 x 40 px, too large for one tile 256 px tile.*raise tile to 400"):
        plan_prompts(tiling, 1000, 1000, [Prompt("ok", foreground=((5.0, 5.0),)), Prompt("wide", box=(10.0, 10.0, 400.0, 50.0))])
    with pytest.raises(InputError, match=r"points spanning \[10, 10, 300, 10\] is 290 x 0 px"):
        plan_prompts(tiling, 1000, 1000, [Prompt("far", foreground=((10.0, 10.0), (300.0, 10.0)))])
    with pytest.raises(InputError, match="256 x 0 px, too large.*raise tile to 272"):
        plan_prompts(tiling, 1000, 1000, [Prompt("frac", foreground=((10.5, 10.0), (266.5, 10.0)))])  # 256 px, but not on whole pixels


def test_a_too_large_prompt_set_says_the_tile_flag_on_the_command_line():
    from sam_blocked.cli import FLAGS
    from sam_blocked.errors import spell

    with pytest.raises(InputError) as refused:
        plan_prompts(Tiling(TILE, 64), 1000, 1000, [Prompt("wide", box=(10.0, 10.0, 400.0, 50.0))])
    assert "--" not in str(refused.value)
    assert spell(refused.value, FLAGS).endswith("too large for one --tile 256 px tile (the model's input size): raise --tile to 400 or more")


def test_a_segmenter_refuses_a_tile_that_is_not_the_input_size_naming_the_setting(sam):
    from sam_blocked.cli import FLAGS
    from sam_blocked.engines.options import SegmentOptions
    from sam_blocked.engines.unit import Segmenter
    from sam_blocked.errors import SettingError, spell

    with pytest.raises(SettingError) as refused:
        Segmenter(sam, SegmentOptions(tiling=Tiling(512)), prompt_mode=True)
    assert str(refused.value).startswith("tile 512 must be the model's input size (256 px)") and "--" not in str(refused.value)
    assert spell(refused.value, FLAGS).startswith("--tile 512 must be the model's input size (256 px)")


def test_a_prompt_set_straddling_tile_borders_gets_a_tile_of_its_own_centred_on_it():
    tiling = Tiling(TILE, 64)  # grid starts 0, 192, 384, 576, 744 along 1000 px
    prompts = [
        Prompt("mid", box=(150.0, 10.0, 250.0, 50.0)),
        Prompt("across", box=(180.0, 10.0, 380.0, 50.0)),
        Prompt("near", foreground=((300.0, 30.0),)),
        Prompt("shares", foreground=((280.0, 100.0),)),
    ]
    tasks = plan_prompts(tiling, 1000, 1000, prompts)
    grid = len(tiling.boxes(1000, 1000))
    assert [(t.index, t.box, [i for i, _ in t.prompts]) for t in tasks] == [
        (0, (0, 0, 256, 256), [0]),  # 150..250 fits the first tile
        (1, (192, 0, 448, 256), [2]),  # margin 108 here and in the new tile: the grid's comes first
        (grid, (152, 0, 408, 256), [1, 3]),  # 180..380 fits no grid tile: its own, centred, shared by a later point with room
    ]


@pytest.mark.slow
def test_point_crops_on_a_whole_image_tile_are_sams_automatic_masks(sam, mosaic):
    """With no inner tile edge, a tile's automatic masks are SamAutomaticMaskGenerator's on that
    image, small-region removal and its second NMS included: the crops reuse SAM's steps."""
    image = mosaic[100:292, 300:556]  # 192 x 256: one tile, padded at the bottom
    points = np.stack(np.meshgrid(np.arange(8, 256, 40) + 0.5, np.arange(8, 192, 40) + 0.5), axis=-1).reshape(-1, 2)  # (N, 2)
    # Random weights' masks all span the tile: box NMS at 0.7 would leave one. At 0.98 some survive.
    amg = dict(points_per_batch=7, pred_iou_thresh=0.0, stability_score_thresh=0.01, stability_score_offset=0.02, min_mask_region_area=300, box_nms_thresh=0.98)
    generator = SamAutomaticMaskGenerator(sam, points_per_side=None, point_grids=[points / [256, 192]], **amg)
    settings = DecodeSettings.from_amg(amg)
    expected = generator.generate(image)
    task = TileTask(0, (0, 0, 256, 192), (192, 256), points=points)
    got = segment_tile(SamPredictor(sam), image, task, settings)
    assert len(got) == len(expected) > 5
    changed = 0
    for crop, record in zip(got, expected):
        np.testing.assert_array_equal(pasted(crop, 192, 256), record["segmentation"])
        assert crop.record["bbox"] == record["bbox"] and crop.record["area"] == record["area"]
        # the tile's decoder is sam_blocked.automatic's (reassociated float32 sums): stock's scores to rounding
        assert crop.record["predicted_iou"] == pytest.approx(record["predicted_iou"], rel=1e-5, abs=1e-6) and crop.record["point_coords"] == record["point_coords"]
        assert not crop.record["truncated"]
        changed += crop.record["area"] != int(crop.mask.size)
    assert changed, "masks are not all full boxes"


@pytest.fixture(scope="module")
def auto_run(sam, mosaic):
    height, width = mosaic.shape[:2]
    tiling = Tiling(TILE, 64)
    tasks = plan_points(tiling, height, width, points_per_side=6)
    per_tile = [segment_tile(SamPredictor(sam), mosaic, task, AUTO) for task in tasks]
    return tiling, tasks, per_tile


@pytest.mark.slow
def test_automatic_masks_do_not_overlap_above_the_nms_threshold(auto_run, mosaic):
    tiling, tasks, per_tile = auto_run
    candidates = [c for tile in per_tile for c in tile]
    masks = stitch_points(candidates, AUTO.box_nms_thresh)
    assert len(tasks) == 8 and 20 < len(masks) < len(candidates)
    assert any(m.record["truncated"] for m in masks) and any(not m.record["truncated"] for m in masks)
    sides = [max(m.mask.shape) for m in masks]
    assert min(sides) < 10 and max(sides) == TILE and len(set(sides)) > 10, "masks of many sizes"
    for i, a in enumerate(masks):
        full_a = pasted(a, *mosaic.shape[:2])
        assert full_a.sum() == a.record["area"]
        for b in masks[i + 1 :]:
            inter = intersection(a, b)
            assert inter == int((full_a & pasted(b, *mosaic.shape[:2])).sum()), "overlap on crops = overlap on whole images"
            assert inter / (a.record["area"] + b.record["area"] - inter) <= AUTO.box_nms_thresh


@pytest.mark.slow
def test_tile_order_does_not_change_the_automatic_masks(auto_run, sam, mosaic):
    tiling, tasks, per_tile = auto_run
    reference = [(m.box, m.mask.tobytes(), m.record) for m in stitch_points([c for t in per_tile for c in t], AUTO.box_nms_thresh)]
    order = list(range(len(tasks)))
    random.Random(0).shuffle(order)
    rerun = {i: segment_tile(SamPredictor(sam), mosaic, tasks[i], AUTO) for i in order}  # encoded in another order
    shuffled = [c for i in order for c in rerun[i]]
    assert [(m.box, m.mask.tobytes(), m.record) for m in stitch_points(shuffled, AUTO.box_nms_thresh)] == reference


def test_a_worker_gets_a_path_a_pickled_task_and_settings_and_returns_small_picklable_crops(sam, mosaic, tmp_path):
    path = tmp_path / "mosaic.tif"
    tifffile.imwrite(path, mosaic, tile=(128, 128), compression="zlib", photometric="rgb")
    (task,) = plan_prompts(Tiling(TILE, 64), *mosaic.shape[:2], [Prompt("corner", foreground=((690.0, 395.0),))])
    settings = DecodeSettings(multimask=True)
    shipped = pickle.loads(pickle.dumps((str(path), task, settings)))
    crops = segment_tile(SamPredictor(sam), *shipped[:2], shipped[2])
    in_memory = segment_tile(SamPredictor(sam), mosaic, task, settings)
    back = pickle.loads(pickle.dumps(crops))
    assert [(c.box, c.mask.tobytes(), c.record) for c in back] == [(c.box, c.mask.tobytes(), c.record) for c in in_memory]
    assert all(len(pickle.dumps(c.record)) < 1000 for c in crops), "records are small"


def test_the_batch_unit_and_segment_tiled_share_one_tile_loop(sam, mosaic, tmp_path, monkeypatch):
    """engines.unit (the batch run) and tiles.loop.segment_tiled (the demo) both run their tiles through loop.run_tiles."""
    from PIL import Image

    from sam_blocked.engines import unit
    from sam_blocked.engines.options import SegmentOptions
    from sam_blocked.inputs.images import ImageItem
    from sam_blocked.tiles import loop

    calls: list[int] = []
    real = loop.run_tiles

    def spy(tasks, *args, **kwargs):
        calls.append(len(tasks))
        return real(tasks, *args, **kwargs)

    monkeypatch.setattr(loop, "run_tiles", spy)
    monkeypatch.setattr(unit, "run_tiles", spy)
    prompt = Prompt("p", foreground=((600.0, 300.0),))
    height, width = mosaic.shape[:2]
    tiled = loop.segment_tiled(SamPredictor(sam), mosaic, height, width, Tiling(TILE, 64), prompts=[prompt])
    path = tmp_path / "mosaic.png"
    Image.fromarray(mosaic).save(path)
    segmenter = unit.Segmenter(sam, SegmentOptions(tiling=Tiling(TILE, 64)), prompt_mode=True)
    job = unit.Job(0, ImageItem(path, "mosaic.png"), (prompt,))
    done: list[tuple[int, int]] = []
    entry = unit.segment_image(segmenter, job, unit.make_outputs(tmp_path / "out", job.item, segmenter.options), print, lambda *d: done.append(d))
    assert calls == [1, 1] and done == [(1, 1)], "one loop, one tile each"
    assert entry["masks"] == len(tiled.masks) == 1 and entry["encoder_passes"] == tiled.encoder_passes == 1
