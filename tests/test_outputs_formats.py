"""The label images and polygons users open, checked with the readers they use.

Masks come from a photograph (skimage's coffee, segmented by felzenszwalb), plus masks
that overlap them, one with a hole and one in two parts. Checked: tifffile reads every
level of the pyramidal OME-TIFF and its OME metadata, level k is level 0 sampled every
2**k pixels; ome-zarr-py's Reader finds the NGFF labels (standalone and inside an OME-Zarr
input, NGFF 0.4 and 0.5); shapely finds every polygon valid, each rasterizes back to its
mask, holes are interior rings; pyogrio and rasterio see the GeoPackage's and the COG's
CRS, the COG validates; all outputs agree id for id; a failed write leaves nothing partial.
"""

from __future__ import annotations

import importlib.util
import json
from importlib.util import find_spec as real_find_spec
from pathlib import Path

import numpy as np
import pytest
import tifffile
from skimage import data, segmentation

from sam_blocked.engines.options import SegmentOptions
from sam_blocked.errors import InputError, SettingError
from sam_blocked.inputs.images import ImageItem
from sam_blocked.outputs import huge as huge_module
from sam_blocked.outputs import vector as vector_module
from sam_blocked.outputs.frame import Frame
from sam_blocked.outputs.huge import HugeImageOutputs, default_tiled_formats, input_kind
from sam_blocked.outputs.ometiff import write_ome_tiff
from sam_blocked.outputs.polygons import mask_polygon, row_runs
from sam_blocked.outputs.pyramid import LabelPainter, level_shapes
from sam_blocked.tiles.crops import MaskCrop
from test_tiles_writers import naive_labels  # tests/ is on sys.path (pytest's rootdir import)

shapely = pytest.importorskip("shapely")
ALL = ["labels", "ome-tiff", "ngff", "geojson", "gpkg", "table"]


def crop_of(mask: np.ndarray, record: dict | None = None) -> MaskCrop:
    """A loose crop (one pixel of margin where the image allows) of a full-size mask."""
    if not mask.any():
        return MaskCrop(np.zeros((0, 0), bool), 0, 0, dict(record or {}))
    ys, xs = np.nonzero(mask)
    y0, y1 = max(0, ys.min() - 1), min(mask.shape[0], ys.max() + 2)
    x0, x1 = max(0, xs.min() - 1), min(mask.shape[1], xs.max() + 2)
    return MaskCrop(mask[y0:y1, x0:x1].copy(), int(x0), int(y0), dict(record or {}))


def photo_masks(image: np.ndarray) -> tuple[list[MaskCrop], list[np.ndarray]]:
    """Segments of the photograph, a ring (a hole), a mask in two parts, one over several segments."""
    seg = segmentation.felzenszwalb(image, scale=400, sigma=0.8, min_size=300)
    full = [seg == k for k in range(seg.max() + 1)]
    full = [m for m in full if m.sum() > 0][:40]
    h, w = seg.shape
    yy, xx = np.mgrid[:h, :w]
    r2 = (yy - h // 2) ** 2 + (xx - w // 3) ** 2
    full.append((r2 < (h // 5) ** 2) & (r2 >= (h // 12) ** 2))  # a ring: one hole
    full.append(full[0] | full[-1])  # most likely two parts
    full.append(full[1] | full[2] | full[3])  # over others: the smaller ones stay on top
    records = [{"predicted_iou": 0.5 + i / 100, "stability_score": 0.9, "point_coords": [[0, 0]], "crop_box": [0, 0, w, h]} for i in range(len(full))]
    return [crop_of(m, r) for m, r in zip(full, records)], full


@pytest.fixture(scope="module")
def coffee() -> np.ndarray:
    return data.coffee()[:371, :553]  # (371, 553, 3): odd sizes, no tile divides them


@pytest.fixture(scope="module")
def masks(coffee):
    return photo_masks(coffee)


def rasterize(shape, height: int, width: int, transform=None) -> np.ndarray:
    from rasterio.features import rasterize as burn
    from affine import Affine

    return burn([shape], out_shape=(height, width), transform=transform or Affine.identity()).astype(bool)


def naive_window(crops: list[MaskCrop], box: tuple[int, int, int, int]) -> np.ndarray:
    """The label image inside box (x0, y0, x1, y1) painted crop by crop, largest first (the rule)."""
    bx0, by0, bx1, by1 = box
    out = np.zeros((by1 - by0, bx1 - bx0), np.uint32)
    areas = [int(c.mask.sum()) for c in crops]
    for i in sorted(range(len(crops)), key=lambda i: -areas[i]):
        x0, y0, x1, y1 = crops[i].box
        ix0, iy0, ix1, iy1 = max(x0, bx0), max(y0, by0), min(x1, bx1), min(y1, by1)
        if ix0 < ix1 and iy0 < iy1:
            part = crops[i].mask[iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0]
            out[iy0 - by0 : iy1 - by0, ix0 - bx0 : ix1 - bx0][part] = i + 1
    return out


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return (a & b).sum() / (a | b).sum()


@pytest.mark.parametrize("size", [(37, 53), (1, 1), (64, 64), (371, 553)])
def test_painter_windows_equal_the_naive_painting_sampled_every_2k_pixels(masks, size):
    height, width = size
    crops = [crop_of(m[:height, :width]) for m in masks[1]]  # the photo's masks cut to the window, some empty
    painter = LabelPainter(crops, height, width)
    level0 = naive_labels(crops, height, width)
    for k in range(4):
        s = 2**k
        expected = level0[::s, ::s]
        h, w = expected.shape
        np.testing.assert_array_equal(painter.window(0, 0, w, h, s), expected, err_msg=f"level {k}")
        x0, y0 = w // 3, h // 4  # a window inside, passing the edge: zeros beyond
        got = painter.window(x0, y0, x0 + 17, y0 + 13, s)
        ref = np.zeros((13, 17), np.uint32)
        part = expected[y0 : y0 + 13, x0 : x0 + 17]
        ref[: part.shape[0], : part.shape[1]] = part
        np.testing.assert_array_equal(got, ref, err_msg=f"window of level {k}")
    assert level_shapes(371, 553, 64) == [(371, 553), (186, 277), (93, 139), (47, 70), (24, 35)]


def test_ome_tiff_levels_and_metadata_read_by_tifffile(tmp_path, coffee, masks):
    crops, _ = masks
    height, width = coffee.shape[:2]
    path = tmp_path / "coffee.labels.ome.tif"
    write_ome_tiff(path, crops, height, width, frame=Frame(mpp=0.25), tile=64)
    with tifffile.TiffFile(path) as tif:
        assert tif.is_ome and len(tif.series) == 1
        levels = tif.series[0].levels
        assert [lv.shape for lv in levels] == level_shapes(height, width, 64) and len(levels) == 5
        first = tif.pages.first
        assert first.is_tiled and first.tilewidth == 64 and first.compression == 8 and len(first.subifds) == 4, "SubIFDs, deflate tiles"
        level0 = levels[0].asarray()
        for k, level in enumerate(levels):
            assert level.dtype == np.uint32
            np.testing.assert_array_equal(level.asarray(), level0[:: 2**k, :: 2**k], err_msg=f"level {k} is not nearest down-sampling")
        ome = tif.ome_metadata
    np.testing.assert_array_equal(level0, naive_labels(crops, height, width))
    assert 'PhysicalSizeX="0.25"' in ome and 'PhysicalSizeXUnit="µm"' in ome and 'Type="uint32"' in ome
    assert set(np.unique(level0)) <= set(range(len(crops) + 1)), "down-sampling never invents an id"


@pytest.fixture(autouse=True)
def _small_chunks(monkeypatch):
    from sam_blocked.outputs import ngff

    monkeypatch.setattr(ngff, "CHUNK", 128)  # a few NGFF levels for a 553 px image


def commit_all(tmp_path: Path, crops, height: int, width: int, formats=ALL, **kwargs) -> HugeImageOutputs:
    outputs = HugeImageOutputs(tmp_path / "out", ImageItem(tmp_path / "coffee.tif", "coffee.tif"), formats, **{k: v for k, v in kwargs.items() if k in ("simplify", "labels_into_input")})
    outputs.commit(crops, height, width, **{k: v for k, v in kwargs.items() if k in ("geo", "frame")})
    assert outputs.complete()
    return outputs


def read_ngff_labels(path: Path):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Reader

    nodes = [n for n in Reader(parse_url(str(path)))() if any(isinstance(s, Label) for s in n.specs)]
    assert nodes, f"ome-zarr's Reader finds no labels under {path}"
    return nodes[0]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*version mismatch")
def test_label_tiff_ngff_ome_tiff_and_polygons_agree_mask_for_mask(tmp_path, coffee, masks):
    crops, full = masks
    height, width = coffee.shape[:2]
    outputs = commit_all(tmp_path, crops, height, width, frame=Frame(mpp=0.5))
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["coffee.labels.tif", "coffee.labels.ome.tif", "coffee.ome.zarr", "coffee.geojson", "coffee.gpkg", "coffee.objects.csv"]
    )
    labels = tifffile.imread(out / "coffee.labels.tif")
    np.testing.assert_array_equal(tifffile.imread(out / "coffee.labels.ome.tif"), labels)

    node = read_ngff_labels(out / "coffee.ome.zarr" / "labels" / "sam")
    np.testing.assert_array_equal(np.asarray(node.data[0]), labels, err_msg="NGFF level 0 is not the label TIFF")
    for k, level in enumerate(node.data):
        np.testing.assert_array_equal(np.asarray(level), labels[:: 2**k, :: 2**k], err_msg=f"NGFF level {k}")
    attrs = json.loads((out / "coffee.ome.zarr/labels/sam/zarr.json").read_text())["attributes"]["ome"]
    assert "image-label" in attrs and attrs["multiscales"][0]["axes"][0]["unit"] == "micrometer"
    scales = [d["coordinateTransformations"][0]["scale"] for d in attrs["multiscales"][0]["datasets"]]
    assert len(node.data) == 4 and scales == [[0.5, 0.5], [1.0, 1.0], [2.0, 2.0], [4.0, 4.0]], "micrometres, halving"

    collection = json.loads((out / "coffee.geojson").read_text())
    features = collection["features"]
    assert collection["type"] == "FeatureCollection" and [f["properties"]["id"] for f in features] == list(range(1, len(crops) + 1))
    for feature, mask in zip(features, full):
        k = feature["properties"]["id"]
        props = feature["properties"]
        assert props["objectType"] == "detection" and props["classification"]["name"] == "SAM" and len(props["classification"]["color"]) == 3
        assert props["measurements"]["area_px"] == mask.sum() and props["measurements"]["area_um2"] == pytest.approx(mask.sum() * 0.25)
        shape = shapely.geometry.shape(feature["geometry"])
        assert shape.is_valid, shapely.is_valid_reason(shape)
        burnt = rasterize(shape, height, width)
        assert iou(burnt, mask) >= 0.98, f"id {k}: IoU {iou(burnt, mask):.3f}"
        np.testing.assert_array_equal(burnt, mask, err_msg=f"id {k}: simplify 0 traces the pixel edges exactly")
        assert np.all(burnt[labels == k]), f"id {k}: label pixels outside its polygon"
    ring = shapely.geometry.shape(features[len(crops) - 3]["geometry"])
    assert ring.geom_type == "Polygon" and len(ring.interiors) == 1, "the ring keeps its hole"
    two = shapely.geometry.shape(features[len(crops) - 2]["geometry"])
    assert two.geom_type == "MultiPolygon" and len(two.geoms) >= 2

    import pyogrio

    info = pyogrio.read_info(out / "coffee.gpkg")
    assert info["features"] == len(crops) and info["crs"] is None and info["geometry_type"] == "MultiPolygon"
    _, _, geometry, fields = pyogrio.raw.read(out / "coffee.gpkg")
    assert list(fields[0]) == list(range(1, len(crops) + 1))
    for wkb, feature in zip(geometry, features):
        assert shapely.from_wkb(wkb).equals(shapely.geometry.shape(feature["geometry"]))
    assert outputs.complete()


def test_simplify_drops_vertices_and_keeps_the_shape(coffee, masks):
    crops, full = masks
    ring = crops[-3]
    exact, simple = mask_polygon(ring), mask_polygon(ring, simplify=1.5)
    assert shapely.get_num_coordinates(simple) < shapely.get_num_coordinates(exact) / 3
    assert simple.is_valid and len(simple.interiors) == 1
    assert iou(rasterize(simple, *coffee.shape[:2]), full[-3]) >= 0.95
    assert mask_polygon(MaskCrop(np.zeros((3, 4), bool), 1, 1)) is None and len(row_runs(np.zeros((0, 0), bool))) == 0


def test_polygons_in_level_0_pixels_of_a_downsampled_level(tmp_path, coffee, masks):
    crops, full = masks
    height, width = coffee.shape[:2]
    commit_all(tmp_path, crops[:3], height, width, formats=["geojson"], frame=Frame(level=2, downsample=4.0))
    feature = json.loads((tmp_path / "out/coffee.geojson").read_text())["features"][0]
    shape = shapely.geometry.shape(feature["geometry"])
    from affine import Affine

    np.testing.assert_array_equal(rasterize(shape, height, width, Affine.scale(4.0)), full[0])


@pytest.fixture(scope="module")
def scene(tmp_path_factory, coffee):
    """A georeferenced RGB scene (UTM 33N, 0.3 m pixels) of the photograph."""
    rasterio = pytest.importorskip("rasterio")
    from affine import Affine

    path = tmp_path_factory.mktemp("geo") / "scene.tif"
    height, width = coffee.shape[:2]
    transform = Affine(0.3, 0.0, 388000.0, 0.0, -0.3, 5820000.0)
    profile = dict(driver="GTiff", width=width, height=height, count=3, dtype="uint8", crs="EPSG:32633", transform=transform, tiled=True)
    with rasterio.open(path, "w", **profile) as dataset:
        dataset.write(np.moveaxis(coffee, 2, 0))
    return path, transform


@pytest.mark.slow
def test_georeferenced_scene_gives_a_valid_cog_and_polygons_in_its_crs(tmp_path, scene, masks):
    import pyogrio
    import rasterio
    from rio_cogeo.cogeo import cog_validate

    from sam_blocked.inputs.sources import open_image

    path, transform = scene
    with open_image(path) as source:
        geo, height, width = source.geo, source.height, source.width
    crops, full = masks
    assert input_kind(path) == "geo" and default_tiled_formats(path)[0] == ("cog", "gpkg", "table")
    outputs = HugeImageOutputs(tmp_path / "out", ImageItem(path, "scene.tif"), ["labels", "cog", "gpkg", "geojson", "table"])
    outputs.commit(crops, height, width, geo=geo)
    out = tmp_path / "out"
    valid, errors, _ = cog_validate(out / "scene.labels.cog.tif", quiet=True)
    assert valid, errors
    with rasterio.open(out / "scene.labels.cog.tif") as cog, rasterio.open(path) as src:
        assert cog.crs == src.crs and cog.transform == transform and cog.overviews(1) == [2], "one overview halves 553 px to one 512 px block"
        np.testing.assert_array_equal(cog.read(1), tifffile.imread(out / "scene.labels.tif"))
        bounds = src.bounds
    info = pyogrio.read_info(out / "scene.gpkg")
    assert info["crs"] == "EPSG:32633" and info["features"] == len(crops)
    x0, y0, x1, y1 = info["total_bounds"]
    assert bounds.left <= x0 < x1 <= bounds.right and bounds.bottom <= y0 < y1 <= bounds.top, "the polygons land on the scene"
    _, _, geometry, fields = pyogrio.raw.read(out / "scene.gpkg")
    for wkb, mask, k in zip(geometry, full, fields[0]):
        assert iou(rasterize(shapely.from_wkb(wkb), height, width, transform), mask) >= 0.98, f"id {k}"
    collection = json.loads((out / "scene.geojson").read_text())
    assert collection["crs"]["properties"]["name"] == "urn:ogc:def:crs:EPSG::32633"
    assert pyogrio.read_info(out / "scene.geojson")["crs"] == "EPSG:32633"


@pytest.mark.filterwarnings("ignore:.*version mismatch")
@pytest.mark.parametrize("zarr_format", [2, 3], ids=["ngff-0.4", "ngff-0.5"])
def test_ngff_labels_into_an_ome_zarr_input(tmp_path, coffee, masks, zarr_format):
    import zarr
    from ome_zarr.format import CurrentFormat, FormatV04
    from ome_zarr.writer import write_image

    height, width = coffee.shape[:2]
    image = tmp_path / "coffee.ome.zarr"
    root = zarr.open_group(str(image), mode="w", zarr_format=zarr_format)
    write_image(np.moveaxis(coffee, 2, 0), root, axes="cyx", fmt=FormatV04() if zarr_format == 2 else CurrentFormat())
    assert input_kind(image) == "ome-zarr" and default_tiled_formats(image)[0] == ("ngff", "geojson", "table")
    crops, _ = masks
    item = ImageItem(image, "coffee.ome.zarr")
    for run in range(2):  # a rerun (--overwrite) replaces the labels, listed once
        outputs = HugeImageOutputs(tmp_path / "out", item, ["ngff", "table"], labels_into_input=True)
        assert outputs.finals()[0] == image / "labels" / "sam"
        outputs.commit(crops[: 10 + run], height, width)
        assert outputs.complete()
    node = read_ngff_labels(image)
    np.testing.assert_array_equal(np.asarray(node.data[0]), naive_labels(crops[:11], height, width))
    assert node.metadata["name"] == "sam", "found from the image by its name, as napari-ome-zarr finds it"
    meta = json.loads((image / "labels" / ("zarr.json" if zarr_format == 3 else ".zattrs")).read_text())
    listed = meta["attributes"]["ome"]["labels"] if zarr_format == 3 else meta["labels"]
    assert listed == ["sam"] and not (tmp_path / "out" / "coffee.ome.zarr").exists()
    assert sorted(p.name for p in (image / "labels").iterdir() if p.name.startswith(".sam")) == []
    with pytest.raises(InputError, match="labels_into_input"):
        HugeImageOutputs(tmp_path / "out", ImageItem(tmp_path / "x.tif", "x.tif"), ["ngff"], labels_into_input=True).check(10, 10)


def test_a_failing_write_leaves_no_partial_output_and_keeps_the_finished_ones(tmp_path, coffee, masks, monkeypatch):
    crops, _ = masks
    height, width = coffee.shape[:2]
    outputs = commit_all(tmp_path, crops[:5], height, width)
    out = tmp_path / "out"
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def full_disk(*args, **kwargs):  # the disk fills up with the GeoPackage, after the zarr store was staged
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(huge_module, "save_gpkg", full_disk)
    with pytest.raises(OSError, match="No space"):
        commit_all(tmp_path, crops, height, width)
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before, "the earlier run's outputs are untouched"
    assert not [p for p in out.rglob("*") if ".partial" in p.name or ".replaced" in p.name]
    monkeypatch.undo()
    for path in outputs.finals():  # an interrupted run's leftovers, files and folders
        staged = path.with_name(f".{path.name}.partial")
        staged.mkdir() if path.is_dir() else staged.write_bytes(b"half")
    outputs.clean()
    assert not [p for p in out.rglob("*") if ".partial" in p.name] and outputs.complete()


def test_options_refuse_what_cannot_be_written(monkeypatch):
    from sam_blocked.tiles.plan import Tiling

    with pytest.raises(SettingError, match="simplify"):
        SegmentOptions(formats=("geojson",), simplify=-1)
    with pytest.raises(SettingError, match="simplify applies to polygons"):
        SegmentOptions(formats=("ome-tiff",), simplify=2)
    with pytest.raises(SettingError, match="labels_into_input"):
        SegmentOptions(formats=("ome-tiff",), labels_into_input=True)
    options = SegmentOptions(tiling=Tiling(256), labels_into_input=True)
    assert options.per_input_formats and options.huge_outputs
    assert SegmentOptions(formats=("geojson",)).huge_outputs, "asked for without --tile: written as huge images are"
    assert default_tiled_formats(Path("slide.svs")) == (("ome-tiff", "geojson", "table"), [])
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ome_zarr" else real_find_spec(name, *a))
    with pytest.raises(SettingError, match=r'ngff needs .*pip install "sam-blocked\[ome\]"'):
        SegmentOptions(formats=("ngff", "table"))
    formats, notes = default_tiled_formats(Path("slide.svs"))  # ome-tiff needs nothing more, geojson shapely: installed
    assert formats == ("ome-tiff", "geojson", "table") and notes == []
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "shapely" else real_find_spec(name, *a))
    formats, notes = default_tiled_formats(Path("slide.svs"))
    assert formats == ("labels", "coco", "table") and 'pip install "sam-blocked[polygons]"' in notes[0], "said, not silent"


def test_a_mask_with_many_parts_and_holes_traces_exactly(coffee):
    """Thresholded photo: speckled parts, holes, pixels touching at corners only."""
    gray = coffee[100:160, 200:280].mean(axis=2)
    mask = gray > np.median(gray)
    shape = mask_polygon(MaskCrop(mask, 3, 5))
    assert shape.is_valid
    burnt = rasterize(shape, 70, 90)
    np.testing.assert_array_equal(burnt[5:65, 3:83], mask)
    assert vector_module.class_color("cat") == vector_module.class_color("cat")


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*version mismatch", "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")
def test_cli_writes_ome_tiff_ngff_and_geojson_that_agree(tmp_path):
    """`sam-blocked segment --tile 256 --format ome-tiff,ngff,geojson` with the tiny model on a tiled
    TIFF mosaic of photographs: the three outputs hold the same masks under the same ids."""
    from test_tiles_run import mosaic, segment, summary_of

    tifffile.imwrite(tmp_path / "mosaic.tif", mosaic(), tile=(128, 128), compression="zlib")
    prompts = {"mosaic.tif": [{"name": "face", "foreground": [[222, 125]]}, {"name": "cup", "box": [720, 100, 840, 230]}]}
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    out = tmp_path / "out"
    code = segment(tmp_path / "mosaic.tif", "--prompts", tmp_path / "prompts.json", "--output", out, "--tile", 256,
                   "--format", "ome-tiff,ngff,geojson", "--multimask")  # fmt: skip
    assert code == 0, summary_of(out)
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith("segment")) == ["mosaic.geojson", "mosaic.labels.ome.tif", "mosaic.ome.zarr"]
    with tifffile.TiffFile(out / "mosaic.labels.ome.tif") as tif:
        levels = [level.asarray() for level in tif.series[0].levels]
    labels = levels[0]
    assert labels.shape == (700, 1100) and len(levels) == 4 and all(np.array_equal(lv, labels[:: 2**k, :: 2**k]) for k, lv in enumerate(levels))
    np.testing.assert_array_equal(np.asarray(read_ngff_labels(out / "mosaic.ome.zarr/labels/sam").data[0]), labels)
    features = json.loads((out / "mosaic.geojson").read_text())["features"]
    assert len(features) == 6 and [f["properties"]["classification"]["name"] for f in features[::3]] == ["face", "cup"]
    for feature in features:
        k = feature["properties"]["id"]
        shape = shapely.geometry.shape(feature["geometry"])
        assert shape.is_valid and feature["properties"]["objectType"] == "annotation"
        burnt = rasterize(shape, 700, 1100)
        assert burnt.sum() == feature["properties"]["measurements"]["area_px"], f"id {k}: the polygon is its mask"
        assert np.all(burnt[labels == k]), f"id {k}: label pixels outside its polygon"
    assert summary_of(out)["done"][0]["masks"] == 6


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*version mismatch")
def test_pyramids_of_a_12000_px_image_are_written_with_memory_far_below_it(tmp_path, coffee, masks):
    """The photo's masks repeated over a 12000 x 12000 image (549 MiB of uint32 labels, 733 MiB
    with the pyramid): the OME-TIFF and the NGFF labels each grow the process's peak by under a
    tenth of the label image (one band of tiles, a few chunks), and read back right."""
    import dask  # noqa: F401  (imported before measuring: importing is not writing)
    import ome_zarr.writer  # noqa: F401

    from sam_blocked.memory.measure import current_bytes, peak_bytes, reset_peak
    from sam_blocked.outputs import ngff

    crops, _ = masks
    side = 12000
    step_y, step_x = coffee.shape[0] + 29, coffee.shape[1] + 47  # 30 x 20 copies, not aligned with tiles or chunks
    big = [MaskCrop(c.mask, c.x0 + i * step_x, c.y0 + j * step_y) for j in range(side // step_y) for i in range(side // step_x) for c in crops]
    image_bytes = side * side * 4
    # dask's threads, their malloc arenas, zarr's codecs: set up once per process, by a first write of 16 chunks
    warm = [c for c in big if c.box[2] <= 4096 and c.box[3] <= 4096]
    ngff.write_label_group(tmp_path / "warm.ome.zarr", warm, 4096, 4096, scale=[1, 1], unit=None, chunk=1024)
    grown = {}
    for name, write in [
        ("ome-tiff", lambda: write_ome_tiff(tmp_path / "big.ome.tif", big, side, side)),
        ("ngff", lambda: ngff.write_label_group(tmp_path / "big.ome.zarr", big, side, side, scale=[1, 1], unit=None, chunk=1024)),
    ]:
        reset_peak()
        before = current_bytes()
        write()
        grown[name] = peak_bytes() - before
    print(", ".join(f"{k}: peak grew by {v / 2**20:.0f} MiB" for k, v in grown.items()), f"for {image_bytes / 2**20:.0f} MiB of labels")
    assert all(v < image_bytes / 10 for v in grown.values()), grown
    box = (5000, 7000, 5600, 7400)  # a window read back from each, never the whole
    expected = naive_window(big, box)
    import zarr

    tif_window = zarr.open(tifffile.imread(tmp_path / "big.ome.tif", aszarr=True, level=0), mode="r")[7000:7400, 5000:5600]
    np.testing.assert_array_equal(tif_window, expected)
    level2 = zarr.open(tifffile.imread(tmp_path / "big.ome.tif", aszarr=True, level=2), mode="r")[1750:1850, 1250:1400]
    np.testing.assert_array_equal(level2, expected[::4, ::4])
    z = zarr.open_group(str(tmp_path / "big.ome.zarr" / "labels" / "sam"), mode="r")
    path0 = z.attrs["ome"]["multiscales"][0]["datasets"][0]["path"]
    np.testing.assert_array_equal(z[path0][7000:7400, 5000:5600], expected)


@pytest.mark.filterwarnings("ignore:.*version mismatch")
def test_the_sources_level_downsample_and_mpp_reach_every_file(tmp_path, coffee, masks):
    """A source read at level 1 of a slide (downsample 2, 0.5 µm a pixel), through the unit of work's
    plan_huge / finish_huge: physical sizes in the OME-TIFF and NGFF, polygons in level-0 pixels."""
    from affine import Affine

    from sam_blocked.engines.unit import Job, finish_huge, make_outputs, plan_huge
    from sam_blocked.inputs.base import ArraySource

    crops, full = masks
    source = ArraySource(coffee)
    source.level, source.downsample, source.mpp = 1, 2.0, 0.5
    item = ImageItem(tmp_path / "slide.svs", "slide.svs")
    options = SegmentOptions(formats=("ome-tiff", "ngff", "geojson"))
    outputs = make_outputs(tmp_path / "out", item, options)
    huge = plan_huge(source, Job(0, item), options, outputs, prompt_mode=True)
    assert huge.scale == {"level": 1, "downsample": 2.0, "mpp": 0.5}
    finish_huge(huge, crops, outputs)
    out = tmp_path / "out"
    with tifffile.TiffFile(out / "slide.labels.ome.tif") as tif:
        assert 'PhysicalSizeX="0.5"' in tif.ome_metadata and tif.series[0].shape == coffee.shape[:2]
    attrs = json.loads((out / "slide.ome.zarr/labels/sam/zarr.json").read_text())["attributes"]["ome"]["multiscales"][0]
    assert attrs["datasets"][1]["coordinateTransformations"][0]["scale"] == [1.0, 1.0] and attrs["axes"][1]["unit"] == "micrometer"
    feature = json.loads((out / "slide.geojson").read_text())["features"][0]
    burnt = rasterize(shapely.geometry.shape(feature["geometry"]), *coffee.shape[:2], Affine.scale(2.0))
    np.testing.assert_array_equal(burnt, full[0], err_msg="polygons in level-0 pixels: segmented pixels x 2")
    assert feature["properties"]["measurements"]["area_um2"] == pytest.approx(full[0].sum() * 0.25)
