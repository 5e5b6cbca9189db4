"""Outputs of huge images from mask crops (sam_blocked.outputs.labels / coco / table / outputs):
the label TIFF equals a naive painting, the RLE equals pycocotools', all three agree on ids,
areas and boxes, memory stays far below the image, and writes are atomic."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
import torch
from pycocotools import mask as mask_utils
from segment_anything.utils.amg import batched_mask_to_box, box_xyxy_to_xywh

from sam_blocked.inputs.images import ImageItem, InputError
from sam_blocked.memory.measure import current_bytes, peak_bytes, reset_peak
from sam_blocked.inputs import geo as geo_module
from sam_blocked.outputs import labels as labels_module
from sam_blocked.outputs.coco import coco_rle, write_coco
from sam_blocked.tiles.crops import MaskCrop
from sam_blocked.inputs.geo import GeoInfo
from sam_blocked.outputs.labels import write_label_tiff
from sam_blocked.outputs.huge import HugeImageOutputs, check_tiled_formats
from sam_blocked.outputs.table import COLUMNS, crop_stats, write_object_table


def random_crops(rng: np.random.Generator, height: int, width: int, n: int, max_side: int) -> list[MaskCrop]:
    """Random crops inside the image, some at its edges, with blobby masks and loose (non-tight) boxes."""
    crops = []
    for i in range(n):
        h, w = rng.integers(1, min(max_side, height) + 1), rng.integers(1, min(max_side, width) + 1)
        y0 = [0, height - h, rng.integers(0, height - h + 1)][i % 3]
        x0 = [width - w, 0, rng.integers(0, width - w + 1)][i % 3]
        yy, xx = np.mgrid[:h, :w]
        mask = (yy - rng.uniform(0, h)) ** 2 / h**2 + (xx - rng.uniform(0, w)) ** 2 / w**2 < rng.uniform(0.05, 0.5)
        record = {"predicted_iou": float(rng.random()), "stability_score": float(rng.random()), "point_coords": [[int(x0), int(y0)]],
                  "crop_box": [0, 0, width, height], "truncated": bool(i % 4 == 0)}
        crops.append(MaskCrop(mask, int(x0), int(y0), record))
    return crops


def naive_labels(crops: list[MaskCrop], height: int, width: int, box: tuple | None = None) -> np.ndarray:
    """The label image (or its `box` window, (x0, y0, x1, y1)) painted on a full array, uint32: smaller
    masks over larger ones, equal sizes the later over the earlier (interactive.label_image's rule)."""
    bx0, by0, bx1, by1 = box or (0, 0, width, height)
    full = np.zeros((by1 - by0, bx1 - bx0), np.uint32)
    areas = [int(c.mask.sum()) for c in crops]
    for i in sorted(range(len(crops)), key=lambda i: -areas[i]):
        x0, y0, x1, y1 = crops[i].box
        pasted = np.zeros((height, width), bool) if box is None else np.zeros((max(by1, y1), max(bx1, x1)), bool)
        pasted[y0:y1, x0:x1] = crops[i].mask
        full[pasted[by0:by1, bx0:bx1]] = i + 1
    return full


@pytest.mark.parametrize("size, tile, n", [((37, 53), 16, 12), ((100, 64), 32, 30), ((1, 1), 16, 2), ((300, 41), 64, 40)])
def test_label_tiff_equals_naive_painting_on_a_full_array(tmp_path, size, tile, n):
    rng = np.random.default_rng(sum(size))
    crops = random_crops(rng, *size, n, max_side=40)
    side = min(3, *size)
    crops.append(MaskCrop(np.ones((side, side), bool), 0, 0))  # equal areas: the later wins
    crops.append(MaskCrop(np.ones((side, side), bool), 0, 0))
    crops.append(MaskCrop(np.zeros((0, 1), bool), 0, 0))  # empty masks paint nothing
    path = tmp_path / "labels.tif"
    write_label_tiff(path, crops, *size, tile=tile)
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        assert page.is_tiled and page.tilewidth == tile and page.compression == 8 and not tif.is_bigtiff
        labels = page.asarray()
    assert labels.dtype == np.uint32
    np.testing.assert_array_equal(labels, naive_labels(crops, *size))
    assert labels[0, 0] == len(crops) - 1


def test_bigtiff_when_the_labels_pass_the_classic_tiff_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(labels_module, "CLASSIC_TIFF_BYTES", 40 * 40 * 4 - 1)  # stands for 4 GB
    for side, big in [(40, True), (39, False)]:
        write_label_tiff(tmp_path / "l.tif", [MaskCrop(np.ones((5, 5), bool), 1, 1)], side, side, tile=16)
        with tifffile.TiffFile(tmp_path / "l.tif") as tif:
            assert tif.is_bigtiff == big and tif.asarray()[3, 3] == 1


def crops_at_edges(rng: np.random.Generator, height: int, width: int) -> list[MaskCrop]:
    out = random_crops(rng, height, width, 8, max_side=max(height, width))
    out.append(MaskCrop(np.ones((height, width), bool), 0, 0))  # the whole image
    out.append(MaskCrop(np.zeros((height, width), bool), 0, 0))  # empty
    out.append(MaskCrop(rng.random((height, min(2, width))) < 0.5, max(0, width - 2), 0))  # full-height: runs join across columns
    out.append(MaskCrop(np.ones((height, 1), bool), 0, 0))
    out.append(MaskCrop(np.zeros((0, 0), bool), width, height))
    return out


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools' decode on numpy 2
def test_coco_rle_equals_pycocotools_on_the_full_array():
    rng = np.random.default_rng(0)
    for case in range(400):
        height, width = (int(v) for v in rng.integers(1, 14, 2))
        for crop in crops_at_edges(rng, height, width) if case % 10 == 0 else random_crops(rng, height, width, 3, 14):
            full = np.zeros((height, width), np.uint8)
            x0, y0, x1, y1 = crop.box
            full[y0:y1, x0:x1] = crop.mask
            expected = mask_utils.encode(np.asfortranarray(full))
            rle = coco_rle(crop, height, width)
            assert rle == {"size": [height, width], "counts": expected["counts"].decode()}, (height, width, crop.box, crop.mask)
            assert mask_utils.area(expected) == crop_stats(crop)[0]
            assert crop_stats(crop)[1] == amg_bbox(full.astype(bool)), "amg.py's bbox, measured on the full array"
            np.testing.assert_array_equal(mask_utils.decode({**rle, "counts": rle["counts"].encode()}), full)


def amg_bbox(mask: np.ndarray) -> list[int]:
    """The bbox amg.py (and an untiled run) gives an (H, W) mask: XYWH with w = last column - first column."""
    return box_xyxy_to_xywh(batched_mask_to_box(torch.as_tensor(mask))).tolist()


def test_bbox_is_amg_convention_one_less_than_the_pixel_extent():
    image = np.zeros((20, 30), bool)
    image[4:9, 10:17] = True  # 7 columns, 5 rows
    crop = MaskCrop(image[2:12, 8:20], 8, 2)  # a loose crop
    assert crop_stats(crop) == (35, [10, 4, 6, 4]) and amg_bbox(image) == [10, 4, 6, 4]
    assert mask_utils.toBbox(mask_utils.encode(np.asfortranarray(image.astype(np.uint8)))).tolist() == [10, 4, 7, 5], "COCO's extent"
    assert crop_stats(MaskCrop(np.ones((1, 1), bool), 3, 5)) == (1, [3, 5, 0, 0])  # one pixel
    assert crop_stats(MaskCrop(np.zeros((3, 3), bool), 3, 5)) == (0, [0, 0, 0, 0])  # empty, as amg.py


def test_coco_rle_refuses_crops_outside_and_images_beyond_32_bits():
    with pytest.raises(ValueError, match="outside"):
        coco_rle(MaskCrop(np.ones((2, 2), bool), 9, 0), 10, 10)
    with pytest.raises(ValueError, match="32 bits"):
        coco_rle(MaskCrop(np.ones((2, 2), bool), 0, 0), 70000, 70000)
    with pytest.raises(InputError, match="use formats labels table"):
        check_tiled_formats(["coco"], 70000, 70000)
    from sam_blocked.cli import FLAGS
    from sam_blocked.errors import spell

    with pytest.raises(InputError) as refused:
        check_tiled_formats(["png"], 5000, 4000)
    assert spell(refused.value, FLAGS).startswith("--format png writes one full-size PNG per mask") and "use --format labels coco table" in spell(refused.value, FLAGS)


def read_outputs(out: Path, stem: str) -> tuple[np.ndarray, dict, list[dict]]:
    labels = tifffile.imread(out / f"{stem}.labels.tif")
    coco = json.loads((out / f"{stem}.json").read_text())
    with open(out / f"{stem}.objects.csv", newline="") as f:
        table = list(csv.DictReader(f))
    return labels, coco, table


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
def test_label_tiff_rle_json_and_table_agree_on_ids_areas_and_boxes(tmp_path):
    rng = np.random.default_rng(3)
    height, width = 150, 230
    crops = random_crops(rng, height, width, 25, max_side=60)
    for i, crop in enumerate(crops):  # prompt mode's fields
        crop.record.update(prompt=i // 2, prompt_name=f"cell {i // 2}", mask_index=i % 2)
    outputs = HugeImageOutputs(tmp_path, ImageItem(tmp_path / "scan.tif", "slides/scan.tif"))
    assert outputs.finals() == [tmp_path / "slides/scan.labels.tif", tmp_path / "slides/scan.json", tmp_path / "slides/scan.objects.csv"]
    assert not outputs.complete()
    outputs.commit(crops, height, width)
    assert outputs.complete()
    labels, coco, table = read_outputs(tmp_path / "slides", "scan")
    painted = naive_labels(crops, height, width)
    np.testing.assert_array_equal(labels, painted)
    assert coco["image"] == {"file_name": "slides/scan.tif", "height": height, "width": width}
    assert list(table[0]) == COLUMNS + ["prompt", "prompt_name", "mask_index"]
    assert [a["id"] for a in coco["annotations"]] == [int(r["id"]) for r in table] == list(range(1, len(crops) + 1))
    for crop, annotation, row in zip(crops, coco["annotations"], table):
        k = annotation["id"]
        mask = mask_utils.decode({**annotation["segmentation"], "counts": annotation["segmentation"]["counts"].encode()}).astype(bool)
        assert mask.sum() == annotation["area"] == int(row["area"]) == crop.mask.sum()
        assert amg_bbox(mask) == annotation["bbox"], "amg.py's bbox, as an untiled run writes it"
        assert annotation["bbox"] == [int(row[c]) for c in ("bbox_x0", "bbox_y0", "bbox_w", "bbox_h")]
        assert np.all(mask[labels == k]), f"id {k}: label pixels outside its RLE mask"
        covered = [j + 1 for j, other in enumerate(crops) if j + 1 != k]
        assert np.all(np.isin(labels[mask & (labels != k)], covered)), f"id {k}: lost pixels not taken by another mask"
        assert annotation["truncated"] == (row["truncated"] == "True") == crop.record["truncated"]
        assert annotation["crop_box"] == [int(row[c]) for c in ("crop_box_x0", "crop_box_y0", "crop_box_w", "crop_box_h")]
        assert (annotation["prompt_name"], str(annotation["mask_index"])) == (row["prompt_name"], row["mask_index"])
        assert float(row["predicted_iou"]) == annotation["predicted_iou"] == crop.record["predicted_iou"]


@pytest.mark.slow
def test_a_20000_px_label_image_is_written_with_memory_far_below_the_image(tmp_path):
    """400 crops over a 20000 x 20000 image (1.5 GiB of uint32 labels): the write's peak is
    bounded by one band of tile rows plus the crops, measured as a ratio of the image."""
    rng = np.random.default_rng(1)
    side = 20000
    crops = []
    for _ in range(400):
        r = int(rng.integers(30, 400))
        yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
        crops.append(MaskCrop(yy**2 + xx**2 <= r * r, int(rng.integers(0, side - 2 * r)), int(rng.integers(0, side - 2 * r))))
    path = tmp_path / "big.labels.tif"
    reset_peak()
    before = current_bytes()
    write_label_tiff(path, crops, side, side)
    grown = peak_bytes() - before
    image_bytes = side * side * 4
    print(f"label TIFF {side} x {side}: peak grew by {grown / 2**20:.0f} MiB for {image_bytes / 2**20:.0f} MiB of labels")
    assert grown < image_bytes / 10
    x0, y0 = crops[7].x0 - 300, crops[7].y0 - 300  # a window around one mask, read without reading it all
    box = (max(0, x0), max(0, y0), min(side, x0 + 1500), min(side, y0 + 1500))
    window = zarr.open(tifffile.imread(path, aszarr=True), mode="r")[box[1] : box[3], box[0] : box[2]]
    np.testing.assert_array_equal(window, naive_labels(crops, side, side, box))


def test_geotiff_round_trip_keeps_crs_and_transform(tmp_path):
    rasterio = pytest.importorskip("rasterio")
    from affine import Affine

    from sam_blocked.inputs.sources import open_image

    transform = Affine(0.3, 0.0, 388000.0, 0.0, -0.3, 5820000.0)
    scene = tmp_path / "scene.tif"
    rgb = np.random.default_rng(0).integers(0, 256, (3, 120, 200), dtype=np.uint8)
    profile = dict(driver="GTiff", width=200, height=120, count=3, dtype="uint8", crs="EPSG:25833", transform=transform, tiled=True)
    with rasterio.open(scene, "w", **profile) as dataset:
        dataset.write(rgb)
    with open_image(scene) as source:
        geo, (height, width) = source.geo, (source.height, source.width)
    crops = [MaskCrop(np.ones((30, 40), bool), 10, 20), MaskCrop(np.ones((10, 10), bool), 190, 110)]
    outputs = HugeImageOutputs(tmp_path / "out", ImageItem(scene, "scene.tif"))
    outputs.commit(crops, height, width, geo=geo)
    with rasterio.open(tmp_path / "out/scene.labels.tif") as labels:
        assert labels.crs == rasterio.crs.CRS.from_epsg(25833) and labels.transform == transform
        band = labels.read(1)
    np.testing.assert_array_equal(band, naive_labels(crops, height, width))
    image = json.loads((tmp_path / "out/scene.json").read_text())["image"]
    assert image["transform"] == list(transform)[:6] and "25833" in image["crs"]


def test_geo_without_rasterio_is_refused_with_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setattr(geo_module, "have_rasterio", lambda: False)
    monkeypatch.setattr(labels_module, "have_rasterio", lambda: False)
    geo = GeoInfo('GEOGCS["WGS 84"]', (1.0, 0.0, 0.0, 0.0, -1.0, 0.0))
    with pytest.raises(ValueError, match=r"pip install 'sam-blocked\[geo\]'"):
        write_label_tiff(tmp_path / "l.tif", [], 10, 10, geo=geo)
    assert list(tmp_path.iterdir()) == []


def test_png_is_written_for_small_images_and_refused_for_huge_ones(tmp_path):
    crops = [MaskCrop(np.ones((4, 6), bool), 3, 2, {"predicted_iou": 0.9, "stability_score": 0.8, "point_coords": [[5, 4]], "crop_box": [0, 0, 32, 16]})]
    outputs = HugeImageOutputs(tmp_path, ImageItem(tmp_path / "a.tif", "a.tif"), ["png", "table"])
    outputs.commit(crops, 16, 32)
    assert outputs.complete() and sorted(p.name for p in (tmp_path / "a").iterdir()) == ["0.png", "metadata.csv"]
    assert not (tmp_path / "a.labels.tif").exists()
    with pytest.raises(InputError, match="^formats png .*above 4096 x 4096.*use formats labels coco table"):
        HugeImageOutputs(tmp_path, ImageItem(tmp_path / "b.tif", "b.tif"), ["png"]).check(5000, 4000)
    with pytest.raises(ValueError, match="one or more of"):
        HugeImageOutputs(tmp_path, ImageItem(tmp_path / "c.tif", "c.tif"), ["overlay"])


def partials(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if ".partial" in p.name]


def test_a_failing_write_leaves_no_partial_file_and_keeps_finished_outputs(tmp_path, monkeypatch):
    item = ImageItem(tmp_path / "scan.tif", "scan.tif")
    first = [MaskCrop(np.ones((5, 5), bool), 0, 0, {"predicted_iou": 0.5})]
    outputs = HugeImageOutputs(tmp_path, item)
    outputs.commit(first, 40, 40)
    before = {p: p.read_bytes() for p in outputs.finals()}

    def broken_tiles(*args, **kwargs):  # the disk fills up while the label TIFF is written
        raise OSError(28, "No space left on device")
        yield

    monkeypatch.setattr(labels_module, "label_tiles", broken_tiles)
    second = first + [MaskCrop(np.ones((3, 3), bool), 20, 20)]
    with pytest.raises(OSError, match="No space"):
        HugeImageOutputs(tmp_path, item).commit(second, 40, 40)
    assert partials(tmp_path) == [] and {p: p.read_bytes() for p in outputs.finals()} == before
    monkeypatch.undo()

    import sam_blocked.outputs.coco as coco_module

    def failing_rle(crop, height, width):
        if crop.x0 == 20:
            raise KeyboardInterrupt
        return coco_rle(crop, height, width)

    monkeypatch.setattr(coco_module, "coco_rle", failing_rle)
    with pytest.raises(KeyboardInterrupt):
        HugeImageOutputs(tmp_path, item).commit(second, 40, 40)  # the labels were written, the JSON fails
    assert partials(tmp_path) == [] and {p: p.read_bytes() for p in outputs.finals()} == before
    monkeypatch.undo()
    outputs.commit(second, 40, 40)
    assert tifffile.imread(tmp_path / "scan.labels.tif")[21, 21] == 2 and outputs.complete()


def test_clean_removes_what_an_interrupted_run_left(tmp_path):
    outputs = HugeImageOutputs(tmp_path, ImageItem(tmp_path / "s.tif", "s.tif"), ["labels", "coco", "table", "png"])
    for path in outputs.finals():
        path.with_name(f".{path.name}.partial").write_bytes(b"half")
    outputs.clean()
    assert partials(tmp_path) == [] and not outputs.complete()


def test_object_table_without_prompts_and_with_sparse_records(tmp_path):
    crops = [MaskCrop(np.eye(4, dtype=bool), 2, 3), MaskCrop(np.zeros((2, 2), bool), 0, 0, {"truncated": True})]
    write_object_table(tmp_path / "t.csv", crops)
    rows = list(csv.DictReader(open(tmp_path / "t.csv", newline="")))
    assert list(rows[0]) == COLUMNS
    assert [rows[0][c] for c in ("id", "area", "bbox_x0", "bbox_y0", "bbox_w", "bbox_h", "truncated")] == ["1", "4", "2", "3", "3", "3", "False"]
    assert [rows[1][c] for c in ("id", "area", "bbox_w", "predicted_iou", "truncated")] == ["2", "0", "0", "", "True"]
    write_coco(tmp_path / "t.json", crops, 10, 10, file_name="t.tif")
    assert [a["area"] for a in json.loads((tmp_path / "t.json").read_text())["annotations"]] == [4, 0]


def test_whole_and_huge_image_writers_share_one_interface(tmp_path):
    """The run loop and the engines ask any writer the same four things: finals, complete, clean, check."""
    from sam_blocked.engines.options import SegmentOptions
    from sam_blocked.engines.unit import make_outputs
    from sam_blocked.inputs.images import ImageItem
    from sam_blocked.outputs.huge import HugeImageOutputs
    from sam_blocked.outputs.images import ImageOutputs
    from sam_blocked.outputs.writer import OutputWriter
    from sam_blocked.tiles.plan import Tiling

    item = ImageItem(tmp_path / "a.png", "a.png")
    whole = make_outputs(tmp_path, item, SegmentOptions(formats=("png", "coco")))
    huge = make_outputs(tmp_path, item, SegmentOptions(tiling=Tiling(256)))
    assert isinstance(whole, ImageOutputs) and isinstance(huge, HugeImageOutputs)
    for writer in (whole, huge):
        assert isinstance(writer, OutputWriter) and issubclass(type(writer), OutputWriter)
        assert writer.finals() and not writer.complete()
        writer.clean()
        writer.check(100, 100)
    with pytest.raises(InputError, match="png"):
        HugeImageOutputs(tmp_path, item, ("png",)).check(5000, 5000)
