"""Inputs beyond TIFF and photos, read window by window: OME-Zarr (NGFF 0.4, 0.5), plain zarr,
numpy and dask arrays, whole-slide images (OpenSlide, tiffslide, or as a TIFF), pyramid levels
(`level`, `mpp`) and channels, each built from scikit-image photographs.

Every window is compared with the pixels written, converted by the contrast rule stated in
sam_blocked.inputs.channels, computed here independently from the stored level.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import tifffile
import zarr
from skimage import data
from skimage.color import rgb2gray

from sam_blocked import cli
from sam_blocked.errors import InputError, SettingError
from sam_blocked.inputs.base import ReadSettings
from sam_blocked.inputs.images import collect_images
from sam_blocked.inputs.slide import SlideSource
from sam_blocked.inputs.sources import open_image, read_whole
from sam_blocked.inputs.tiff import TiffSource
from sam_blocked.summary import SUMMARY_NAME

WINDOWS = [(0, 0, 37, 53), (101, 17, 240, 150), (399, 299, 400, 300), (0, 0, 400, 300)]  # odd sizes, the last pixel, the whole


def photo_channels() -> np.ndarray:
    """(4, 300, 400) uint16 channels of real photographs: astronaut R, G, B and coffee as gray, on different ranges."""
    astronaut = data.astronaut()[:300, 50:450].astype(np.uint16)
    coffee = (rgb2gray(data.coffee()[:300, :400]) * 4095).astype(np.uint16)
    return np.stack([astronaut[:, :, 0] * 257, astronaut[:, :, 1] * 16 + 100, astronaut[:, :, 2] * 4, coffee])


def mosaic() -> np.ndarray:
    """(300, 400, 3) uint8: astronaut beside chelsea."""
    image = np.zeros((300, 400, 3), np.uint8)
    image[:, :250] = data.astronaut()[100:400, 150:400]
    image[:, 250:] = data.chelsea()[:300, 150:300]
    return image


def stretched(values: np.ndarray, channels, per_channel: bool) -> np.ndarray:
    """(k, h, w) stored values -> (h, w, 3) uint8, the rule written out: min..max of the level, linear, rounded."""
    picked = values[list(channels)].astype(np.float64)
    if per_channel:
        lo, hi = picked.min(axis=(1, 2), keepdims=True), picked.max(axis=(1, 2), keepdims=True)
    else:
        lo, hi = picked.min(), picked.max()
    out = np.clip(np.round((picked - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8).transpose(1, 2, 0)
    return np.repeat(out, 3, axis=2) if out.shape[2] == 1 else out


def check_windows(source, expected: np.ndarray, tolerance: int = 0) -> None:
    assert (source.height, source.width) == expected.shape[:2]
    for x0, y0, x1, y1 in WINDOWS:
        x1, y1 = min(x1, source.width), min(y1, source.height)
        x0, y0 = min(x0, x1 - 1), min(y0, y1 - 1)
        got = source.read((x0, y0, x1, y1))
        assert got.dtype == np.uint8 and got.shape == (y1 - y0, x1 - x0, 3)
        diff = np.abs(got.astype(int) - expected[y0:y1, x0:x1].astype(int)).max()
        assert diff <= tolerance, f"window {(x0, y0, x1, y1)} differs by up to {diff}"


# ----------------------------------------------------------------------------- OME-Zarr


def write_ome_zarr(path: Path, version: str, image: np.ndarray, mpp: float = 0.5) -> zarr.Group:
    """(c, y, x) -> an OME-Zarr of 3 levels (x1, x2, x4) with ome-zarr-py's writer, axes with units."""
    from ome_zarr.format import FormatV04, FormatV05
    from ome_zarr.writer import write_image

    fmt = FormatV04() if version == "0.4" else FormatV05()
    group = zarr.open_group(str(path), mode="w", zarr_format=2 if version == "0.4" else 3)
    units = {"y": "micrometer", "x": "micrometer"}
    write_image(image, group, scale_factors=[2, 4], axes="cyx", fmt=fmt, scale={"c": 1.0, "y": mpp, "x": mpp}, axes_units=units, storage_options={"chunks": (1, 64, 64)})
    return group


def level_arrays(group: zarr.Group) -> list[np.ndarray]:
    """The stored levels, by the paths the writer recorded."""
    attrs = dict(group.attrs)
    multiscale = attrs.get("ome", attrs)["multiscales"][0]
    return [np.asarray(group[d["path"]]) for d in multiscale["datasets"]]


@pytest.fixture(scope="module", params=["0.4", "0.5"])
def ome(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("ome") / "cells.ome.zarr"
    group = write_ome_zarr(path, request.param, photo_channels())
    return path, request.param, level_arrays(group)


def test_ome_zarr_windows_at_each_level_equal_the_stored_pixels(ome):
    path, version, levels = ome
    meta = json.loads((path / ("zarr.json" if version == "0.5" else ".zattrs")).read_text())
    assert (meta["attributes"]["ome"]["version"] if version == "0.5" else meta["multiscales"][0]["version"]) == version
    for level, (downsample, mpp) in enumerate([(1.0, 0.5), (2.0, 1.0), (4.0, 2.0)]):
        with open_image(path, read=ReadSettings(level=level)) as source:
            assert source.scale == {"level": level, "downsample": downsample, "mpp": mpp}
            check_windows(source, stretched(levels[level], (0, 1, 2), per_channel=False))
            assert any("4 channels: using channels 0, 1, 2 as RGB" in n for n in source.notes)


def test_ome_zarr_channels_and_mpp(ome):
    path, _, levels = ome
    with open_image(path, read=ReadSettings(channels=(2, 1, 0))) as source:
        check_windows(source, stretched(levels[0], (2, 1, 0), per_channel=True))
    with open_image(path, read=ReadSettings(channels=(3,), mpp=1.1)) as source:  # level 1 is nearest, resampled
        assert source.level == 1 and source.mpp == pytest.approx(1.1) and source.downsample == pytest.approx(2.2)
        assert (source.width, source.height) == (round(200 / 1.1), round(150 / 1.1))
    with open_image(path, read=ReadSettings(channels=(3,), mpp=1.0)) as source:  # exactly level 1: not resampled
        check_windows(source, stretched(levels[1], (3,), per_channel=True))


def test_ome_zarr_refusals_name_the_setting(ome):
    path = ome[0]
    with pytest.raises(InputError, match=r"has 3 level\(s\), 0..2.*: level 3 is past the last: pick 0..2") as caught:
        open_image(path, read=ReadSettings(level=3))
    assert caught.value.settings == ("level",) and "--level 3" in caught.value.spelled(cli.FLAGS)
    with pytest.raises(InputError, match=r"has 4 channel\(s\), indices 0..3: channels 4,1,0 asks for 4") as caught:
        open_image(path, read=ReadSettings(channels=(4, 1, 0)))
    assert "--channels 4,1,0" in caught.value.spelled(cli.FLAGS)
    with pytest.raises(SettingError, match="give level or mpp, not both"):
        ReadSettings(level=1, mpp=1.0)


def test_a_window_reads_only_the_chunks_it_covers(tmp_path):
    from zarr.storage import LocalStore, LoggingStore

    array = zarr.create_array(str(tmp_path / "plain.zarr"), shape=(300, 400, 3), chunks=(64, 64, 3), dtype="uint8", dimension_names=("y", "x", "c"))
    array[:] = mosaic()
    store = LoggingStore(LocalStore(str(tmp_path / "plain.zarr"), read_only=True), log_level="DEBUG", log_handler=None)
    source = open_image(zarr.open_array(store, mode="r"))
    store.counter.clear()
    window = source.read((70, 70, 190, 120))  # chunks x 1..2, y 1: 2 of 35
    assert store.counter["get"] == 2, dict(store.counter)
    np.testing.assert_array_equal(window, mosaic()[70:120, 70:190])


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_a_plain_zarr_array_is_a_source(tmp_path, zarr_format):
    path = tmp_path / "plain.zarr"
    planes = np.ascontiguousarray(mosaic().transpose(2, 0, 1))  # (3, 300, 400): axes guessed cyx
    array = zarr.create_array(str(path), shape=planes.shape, chunks=(3, 100, 100), dtype="uint8", zarr_format=zarr_format)
    array[:] = planes
    with open_image(path) as source:
        check_windows(source, mosaic())
    with open_image(f"file://{path}") as source:  # a URL fsspec opens
        check_windows(source, mosaic())
    with open_image(path, read=ReadSettings(channels=(1,))) as source:
        check_windows(source, np.repeat(mosaic()[:, :, 1:2], 3, axis=2))


def test_numpy_and_dask_arrays_are_sources():
    image = mosaic()
    check_windows(open_image(image), image)
    source = open_image(image)
    assert open_image(source) is source, "an open source is taken as it is"
    check_windows(open_image(da.from_array(image, chunks=(64, 64, 3))), image)
    channels = photo_channels()
    with open_image(da.from_array(channels, chunks=(1, 100, 100)), read=ReadSettings(channels=(1,))) as source:
        check_windows(source, stretched(channels, (1,), per_channel=True))
    with pytest.raises(InputError, match=r"cannot tell its axes.*axes='czyx'"):
        open_image(np.zeros((2, 3, 40, 50), np.uint8))
    check_windows(open_image(channels[:, None], read=ReadSettings(channels=(0,)), axes="czyx"), stretched(channels, (0,), True))


# ----------------------------------------------------------------------------- slides and pyramidal TIFF


def write_svs(path: Path, image: np.ndarray, mpp: float = 0.25) -> np.ndarray:
    """An Aperio SVS-style pyramid (as OpenSlide and tiffslide read it): level 0, a stripped
    thumbnail, level 1 at half size. Returns level 1's pixels."""
    level1 = np.ascontiguousarray(image[::2, ::2])
    h, w = image.shape[:2]
    description = f"Aperio Image Library v12.0.15 \r\n{w}x{h} [0,0 {w}x{h}] (128x128) JPEG/RGB Q=70|AppMag = 40|MPP = {mpp}"
    with tifffile.TiffWriter(path) as tif:
        tif.write(image, tile=(128, 128), photometric="rgb", compression="zlib", description=description, metadata=None)
        tif.write(np.ascontiguousarray(image[::8, ::8]), photometric="rgb", compression="zlib", description="Aperio Image Library thumbnail", metadata=None)
        tif.write(level1, tile=(128, 128), photometric="rgb", compression="zlib", description="Aperio Image Library level 1", metadata=None)
    return level1


@pytest.fixture(scope="module")
def svs(tmp_path_factory):
    image = np.concatenate([mosaic(), mosaic()[::-1]], axis=0)  # (600, 400, 3)
    path = tmp_path_factory.mktemp("slides") / "tissue.svs"
    return path, image, write_svs(path, image)


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
def test_a_slide_reads_level_0_and_1_through_each_backend(svs, backend):
    path, image, level1 = svs
    with SlideSource(path, ReadSettings(), backend) as source:
        assert source.scale == {"level": 0, "downsample": 1.0, "mpp": 0.25}
        check_windows(source, image)
    with SlideSource(path, ReadSettings(level=1), backend) as source:
        assert source.scale == {"level": 1, "downsample": 2.0, "mpp": 0.5}
        check_windows(source, level1)
    with SlideSource(path, ReadSettings(mpp=0.45), backend) as source:
        assert source.level == 1, "0.5 um/px is nearer 0.45 than 0.25"


def test_open_image_picks_openslide_then_tiffslide_then_tifffile(svs, monkeypatch):
    path, image, level1 = svs
    with open_image(path, read=ReadSettings(level=1)) as source:
        assert isinstance(source, SlideSource) and source.backend == "openslide"
    monkeypatch.setattr("sam_blocked.inputs.slide.find_spec", lambda name: None if name == "openslide" else object())
    with open_image(path) as source:
        assert source.backend == "tiffslide"
    monkeypatch.setattr("sam_blocked.inputs.slide.find_spec", lambda name: None)
    with open_image(path, read=ReadSettings(mpp=0.5)) as source:  # without the extra: a TIFF, mpp from the SVS description
        assert isinstance(source, TiffSource) and source.scale == {"level": 1, "downsample": 2.0, "mpp": 0.5}
        assert 'pip install "sam-blocked[slide]"' in source.notes[0]
        check_windows(source, level1)
    mrxs = path.parent / "scan.mrxs"
    mrxs.write_text("[GENERAL]\n")
    with pytest.raises(InputError, match=r'scan.mrxs is a .mrxs whole-slide image, which only OpenSlide reads: pip install "sam-blocked\[slide\]"'):
        open_image(mrxs)


def test_pyramidal_tiff_levels_mpp_and_resampling(tmp_path):
    image = mosaic()
    path = tmp_path / "pyramid.tif"
    with tifffile.TiffWriter(path) as tif:  # a generic pyramid in SubIFDs, 2 um/px in cm units
        tif.write(image, tile=(64, 64), subifds=1, resolution=(5000, 5000), resolutionunit="CENTIMETER", photometric="rgb")
        tif.write(np.ascontiguousarray(image[::2, ::2]), tile=(64, 64), subfiletype=1, photometric="rgb")
    with open_image(path, read=ReadSettings(level=1)) as source:
        assert source.scale == {"level": 1, "downsample": 2.0, "mpp": 4.0}
        check_windows(source, image[::2, ::2])
    with open_image(path, read=ReadSettings(mpp=2.5)) as source:  # level 0 (2 um) is nearer in ratio than level 1 (4 um): shrunk
        assert source.level == 0 and (source.width, source.height) == (320, 240) and source.scale == {"level": 0, "downsample": 1.25, "mpp": 2.5}
        whole = source.read((0, 0, source.width, source.height))
        check_windows(source, whole, tolerance=1)  # windows agree with the whole where they meet (rounding only)
    with pytest.raises(InputError, match=r"does not state its microns per pixel, so mpp 1 cannot pick a level: give level instead"):
        open_image(_plain_tiff(tmp_path), read=ReadSettings(mpp=1.0))


def _plain_tiff(tmp_path: Path) -> Path:
    path = tmp_path / "plain.tif"
    tifffile.imwrite(path, mosaic(), tile=(64, 64))
    return path


def test_multichannel_uint16_tiff_channels(tmp_path):
    channels = photo_channels()
    path = tmp_path / "four.tif"
    tifffile.imwrite(path, channels, photometric="minisblack", tile=(64, 64), metadata={"axes": "CYX"})
    with open_image(path, read=ReadSettings(channels=(2, 1, 0))) as source:
        check_windows(source, stretched(channels, (2, 1, 0), per_channel=True))
    with open_image(path, read=ReadSettings(channels=(1,))) as source:
        check_windows(source, stretched(channels, (1,), per_channel=True))
    with open_image(path) as source:  # the rule of old: first three channels, one joint range
        check_windows(source, stretched(channels, (0, 1, 2), per_channel=False))
    with pytest.raises(InputError, match="has 4 channel"):
        open_image(path, read=ReadSettings(channels=(7,)))
    image, notes, scale = read_whole(path, 10**6, ReadSettings(channels=(1,)))
    np.testing.assert_array_equal(image, stretched(channels, (1,), per_channel=True))


def test_folders_collect_zarr_stores_and_slides_as_images(ome, svs, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    os.symlink(ome[0], folder / "cells.ome.zarr")
    os.symlink(svs[0], folder / "tissue.svs")
    images, problems = collect_images([folder, ome[0]])
    assert [i.name for i in images] == ["cells.ome.zarr", "tissue.svs"] and not problems


# ----------------------------------------------------------------------------- end to end


def segment(*args: object) -> int:
    return cli.main(["segment", *map(str, args), "--model-type", "tiny"])


def test_cli_segments_an_ome_zarr_level_and_a_slide_at_an_mpp_tile_by_tile(ome, svs, tmp_path):
    path, version, levels = ome
    runs = [
        (path, {"face": [60, 40]}, ["--level", "1", "--channels", "2,1,0"]),
        (svs[0], {"cat": [160, 40]}, ["--mpp", "0.5"]),
    ]
    done = {}
    for image, points, flags in runs:
        prompts = tmp_path / f"{image.name}.json"
        prompts.write_text(json.dumps({image.name: [{"name": n, "foreground": [p]} for n, p in points.items()]}))
        out = tmp_path / image.name
        assert segment(image, "--prompts", prompts, "--output", out, "--tile", 128, *flags) == 0
        (done[image.name],) = json.loads((out / SUMMARY_NAME).read_text())["done"]
    assert done["cells.ome.zarr"]["scale"] == {"level": 1, "downsample": 2.0, "mpp": 1.0}
    assert (done["cells.ome.zarr"]["height"], done["cells.ome.zarr"]["width"]) == (150, 200) and done["cells.ome.zarr"]["tiles"] == 4
    assert done["tissue.svs"]["scale"] == {"level": 1, "downsample": 2.0, "mpp": 0.5}
    # a slide's default outputs (ome-tiff, geojson, table): the pyramid's level 0 is level 1's frame
    assert tifffile.imread(tmp_path / "tissue.svs" / "tissue.labels.ome.tif").shape == (300, 200), "labels in level 1's frame"
    assert any("reading level 1" in n for n in done["tissue.svs"]["notes"])


def test_cli_refuses_a_level_the_image_lacks_naming_the_flag(ome, tmp_path, capsys):
    code = segment(ome[0], "--auto", "--output", tmp_path / "out", "--tile", 128, "--level", 5)
    summary = json.loads((tmp_path / "out" / SUMMARY_NAME).read_text())
    assert code == 1 and "--level 5 is past the last: pick 0..2" in summary["failed"][0]["reason"]


def test_tiles_read_from_zarr_and_dask_arrays_directly(tmp_path):
    from sam_blocked.tiles.tile import read_tile

    image = mosaic()
    array = zarr.create_array(str(tmp_path / "a.zarr"), shape=image.shape, chunks=(64, 64, 3), dtype="uint8")
    array[:] = image
    for source in (array, da.from_array(image, chunks=(64, 64, 3)), open_image(da.from_array(image))):
        np.testing.assert_array_equal(read_tile(source, (30, 40, 158, 168)), image[40:168, 30:158])


def test_read_settings_cross_to_workers_with_the_options():
    import pickle

    from sam_blocked.engines.options import SegmentOptions

    options = SegmentOptions(read=ReadSettings(mpp=0.5, channels="2,1,0"))
    assert pickle.loads(pickle.dumps(options)).read == ReadSettings(mpp=0.5, channels=(2, 1, 0))
    for bad, setting in ((dict(level=-1), "level"), (dict(mpp=0), "mpp"), (dict(channels="1,2"), "channels"), (dict(channels=(0, -1, 2)), "channels")):
        with pytest.raises(SettingError) as caught:
            ReadSettings(**bad)
        assert caught.value.settings == (setting,)


def test_a_recursive_pattern_takes_a_zarr_store_whole_not_its_chunks(ome, tmp_path):
    import shutil

    folder = tmp_path / "scans"
    shutil.copytree(ome[0], folder / "plate" / "cells.ome.zarr")
    tifffile.imwrite(folder / "plate" / "other.tif", mosaic())
    images, _ = collect_images([folder], pattern="**/*")
    assert [i.name for i in images] == ["plate/cells.ome.zarr", "plate/other.tif"]


@pytest.mark.slow
def test_ray_workers_read_the_level_and_channels_asked_for(tmp_path, monkeypatch):
    pytest.importorskip("ray.data")
    monkeypatch.setenv("RAY_DISABLE_USAGE_STATS", "1")
    path = tmp_path / "cells.ome.zarr"
    write_ome_zarr(path, "0.5", photo_channels())
    args = (path, "--auto", "--points-per-side", 2, "--pred-iou-thresh", 0, "--stability-score-thresh", 0, "--tile", 128, "--level", 1, "--channels", 3, "--format", "labels,table")
    assert segment(*args, "--output", tmp_path / "local") == 0
    try:
        assert segment(*args, "--output", tmp_path / "ray", "--engine", "ray", "--workers", 1, "--cpus-per-worker", 1) == 0
    finally:
        import ray

        ray.shutdown()
    (local,), (distributed,) = (json.loads((tmp_path / o / SUMMARY_NAME).read_text())["done"] for o in ("local", "ray"))
    assert distributed["scale"] == local["scale"] == {"level": 1, "downsample": 2.0, "mpp": 1.0}
    assert distributed["tiles"] == local["tiles"] == 4
    labels = [tifffile.imread(tmp_path / o / "cells.ome.labels.tif") for o in ("local", "ray")]
    assert labels[0].shape == (150, 200) and labels[1].shape == (150, 200)


def test_zarr_groups_that_are_not_one_image_are_refused_or_followed(tmp_path):
    plate = zarr.open_group(str(tmp_path / "plate.zarr"), mode="w")
    plate.attrs["plate"] = {"wells": [{"path": "A/1"}]}
    with pytest.raises(InputError, match=r"is an HCS plate: give one field's image, e.g. PLATE.zarr/A/1/0"):
        open_image(tmp_path / "plate.zarr")
    group = zarr.open_group(str(tmp_path / "group.zarr"), mode="w")
    group.create_array("raw", shape=(10, 10), dtype="uint8")
    with pytest.raises(InputError, match=r"without OME-NGFF multiscales metadata: give one of its arrays' paths \(raw\)"):
        open_image(tmp_path / "group.zarr")
    root = zarr.open_group(str(tmp_path / "b2r.zarr"), mode="w", zarr_format=2)
    root.attrs["bioformats2raw.layout"] = 3
    write_ome_zarr(tmp_path / "b2r.zarr" / "0", "0.4", photo_channels())
    with open_image(tmp_path / "b2r.zarr", read=ReadSettings(level=2)) as source:
        assert source.notes[0] == "bioformats2raw store of 1 series: reading series 0" and (source.width, source.height) == (100, 75)


def test_t_and_z_are_read_at_index_0_or_the_plane_asked_for():
    from sam_blocked.inputs.arrays import AxesSource

    stack = np.stack([photo_channels()[:1], photo_channels()[3:]])[:, :, None]  # (t=2, c=1, z=1, 300, 400)
    stack = np.concatenate([stack, stack[:, :, :, ::-1]], axis=2)  # z=2: the second plane upside down
    first = AxesSource([stack], "tczyx")
    check_windows(first, stretched(stack[0, :, 0], (0,), per_channel=False))
    assert "t has 2 planes: reading t=0" in first.notes and "z has 2 planes: reading z=0" in first.notes
    last = AxesSource([stack], "tczyx", planes={"t": 1, "z": 1})
    check_windows(last, stretched(stack[1, :, 1], (0,), per_channel=False))
    with pytest.raises(InputError, match=r"z=2 is outside its 2 plane\(s\) along z: pick 0..1"):
        AxesSource([stack], "tczyx", planes={"z": 2})


def test_cli_segments_an_ome_zarr_level_whole_without_tiles(ome, tmp_path):
    path = ome[0]
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({path.name: [{"name": "face", "foreground": [[30, 20]]}]}))
    out = tmp_path / "out"
    assert segment(path, "--prompts", prompts, "--output", out, "--img-size", 128, "--level", 2, "--format", "coco") == 0
    (done,) = json.loads((out / SUMMARY_NAME).read_text())["done"]
    assert done["scale"] == {"level": 2, "downsample": 4.0, "mpp": 2.0} and (done["width"], done["height"]) == (100, 75)
    coco = json.loads((out / "cells.ome.json").read_text())
    assert (coco["image"]["width"], coco["image"]["height"]) == (100, 75)


def test_a_level_of_a_georeferenced_image_keeps_its_origin_with_larger_pixels():
    from sam_blocked.inputs.geo import GeoInfo, scaled_geo

    geo = GeoInfo("EPSG:32633", (10.0, 0.0, 500000.0, 0.0, -10.0, 4600000.0))
    assert scaled_geo(geo, 4.0).transform == (40.0, 0.0, 500000.0, 0.0, -40.0, 4600000.0)
    assert scaled_geo(geo, 1.0) is geo and scaled_geo(None, 2.0) is None
