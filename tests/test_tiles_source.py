"""Huge images read window by window (sam_blocked.inputs.sources / tiff): same pixels as the whole
array, the same conversions as images.read_image, memory bounded by the window, clear refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from sam_blocked.inputs.images import InputError, read_image
from sam_blocked.memory.measure import current_bytes, peak_bytes, reset_peak
from sam_blocked.inputs import geo as geo_module
from sam_blocked.inputs import tiff as tiff_module
from sam_blocked.inputs.sources import ArraySource, open_image


def mosaic(height: int, width: int) -> np.ndarray:
    """(height, width, 3) uint8: scikit-image photographs side by side, cut to 256 x 384 cells."""
    from skimage import data

    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket(), data.immunohistochemistry()]
    cells = [p[:256, :384] for p in photos]
    out = np.empty((height, width, 3), np.uint8)
    for i, y in enumerate(range(0, height, 256)):
        for j, x in enumerate(range(0, width, 384)):
            cell = cells[(i * 2 + j) % len(cells)]
            out[y : y + 256, x : x + 384] = cell[: height - y, : width - x]
    return out


@pytest.fixture(scope="module")
def picture() -> np.ndarray:
    return mosaic(1100, 1700)  # not a multiple of any tile or strip size


WINDOWS = [(0, 0, 1700, 1100), (0, 0, 1, 1), (1699, 1099, 1700, 1100), (300, 200, 1324, 1224 - 200), (1000, 37, 1700, 901), (5, 1000, 1600, 1100)]
LAYOUTS = {
    "tiled": dict(tile=(256, 256), compression="zlib"),
    "bigtiff lzw": dict(tile=(128, 256), compression="lzw", bigtiff=True),
    "striped": dict(rowsperstrip=64, compression="zlib"),
    "one uncompressed strip": dict(rowsperstrip=1100),
    "uncompressed tiles": dict(tile=(256, 256)),
    "planar tiled": dict(tile=(256, 256), compression="zlib", planarconfig="separate"),
    "jpeg tiled": dict(tile=(256, 256), compression="jpeg"),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_windows_equal_the_same_windows_of_the_whole_array(tmp_path, picture, layout):
    path = tmp_path / "image.tif"
    options = LAYOUTS[layout]
    data = np.moveaxis(picture, 2, 0) if options.get("planarconfig") == "separate" else picture
    tifffile.imwrite(path, data, photometric="rgb", **options)
    whole = picture if "jpeg" not in layout else tifffile.imread(path)  # JPEG is lossy: tifffile's decode
    with open_image(path) as source:
        assert (source.height, source.width, source.notes, source.geo) == (1100, 1700, [], None)
        for x0, y0, x1, y1 in WINDOWS:
            window = source.read((x0, y0, x1, y1))
            assert window.dtype == np.uint8 and window.flags.c_contiguous
            np.testing.assert_array_equal(window, whole[y0:y1, x0:x1], err_msg=f"{layout} window {(x0, y0, x1, y1)}")
            window[:] = 0  # a new array: writing to it changes nothing kept
        np.testing.assert_array_equal(source.read((0, 0, 1700, 1100)), whole)


@pytest.mark.parametrize("make", ["gray8", "gray16", "float32", "rgba", "palette", "bilevel", "cmyk", "gray+alpha"])
def test_conversions_match_read_image(tmp_path, picture, make):
    gray = picture[:300, :400].mean(axis=2)
    arrays = {
        "gray8": (gray.astype(np.uint8), dict(photometric="minisblack")),
        "gray16": ((gray * 100 + 1000).astype(np.uint16), dict(photometric="minisblack")),
        "float32": ((gray / 7 - 3).astype(np.float32), dict(photometric="minisblack")),
        "rgba": (np.dstack([picture[:300, :400], gray.astype(np.uint8)]), dict(photometric="rgb", extrasamples=["unassalpha"])),
        "palette": ((gray // 16).astype(np.uint8), dict(photometric="palette", colormap=np.random.default_rng(0).integers(0, 65536, (3, 256), dtype=np.uint16))),
        "bilevel": (gray > 120, dict(photometric="minisblack")),
        "cmyk": (np.dstack([picture[:300, :400], gray.astype(np.uint8)]), dict(photometric="separated")),
        "gray+alpha": (np.dstack([gray.astype(np.uint8), np.full_like(gray, 200, np.uint8)]), dict(photometric="minisblack", extrasamples=["unassalpha"], planarconfig="contig")),
    }
    data, options = arrays[make]
    path = tmp_path / f"{make}.tif"
    tifffile.imwrite(path, data, rowsperstrip=64, **options)
    expected, _ = read_image(path)
    with open_image(path) as source:
        got = source.read((0, 0, 400, 300))
        assert source.notes, "a conversion is noted"
        np.testing.assert_array_equal(got, expected)
        np.testing.assert_array_equal(source.read((17, 30, 300, 290)), expected[30:290, 17:300])


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tiled", "striped"])
def test_reading_every_tile_keeps_memory_to_a_window(tmp_path, layout):
    """An 8000 x 8000 RGB TIFF (183 MiB of pixels) read in 1024 px windows, row by row as the
    tile loop does: the process's peak grows by a fraction of the image, never the image."""
    side, cell = 8000, mosaic(256, 384)[:, :256]
    path = tmp_path / "big.tif"
    if layout == "tiled":
        tiles = (cell for _ in range((side // 256 + 1) ** 2))
        tifffile.imwrite(path, data=tiles, shape=(side, side, 3), dtype=np.uint8, tile=(256, 256), photometric="rgb", compression="jpeg")
    else:  # tifffile takes whole pages only: the array is made, written and freed before measuring
        whole = np.tile(cell, (side // 256 + 1, side // 256 + 1, 1))[:side, :side]
        tifffile.imwrite(path, whole, rowsperstrip=256, photometric="rgb", compression="jpeg")
        del whole
    image_bytes = side * side * 3
    reset_peak()
    before = current_bytes()
    with open_image(path) as source:
        for y in range(0, side, 1024):
            for x in range(0, side, 1024):
                window = source.read((x, y, min(side, x + 1024), min(side, y + 1024)))
                assert window.shape[2] == 3
    grown = peak_bytes() - before
    print(f"{layout}: peak grew by {grown / 2**20:.0f} MiB reading a {image_bytes / 2**20:.0f} MiB image")
    assert grown < image_bytes / 4, f"{layout}: peak grew by {grown / 2**20:.0f} MiB for a {image_bytes / 2**20:.0f} MiB image"


def test_pyramids_stacks_and_several_images_use_full_resolution_first_and_say_so(tmp_path, picture):
    path = tmp_path / "pyramid.tif"
    with tifffile.TiffWriter(path) as tif:
        tif.write(picture, photometric="rgb", tile=(256, 256), subifds=1)
        tif.write(picture[::2, ::2], photometric="rgb", tile=(256, 256), subfiletype=1)
        tif.write(picture[:100, :100], photometric="rgb")  # a second image, e.g. a slide's label
    with open_image(path) as source:
        np.testing.assert_array_equal(source.read((0, 0, 1700, 1100)), picture)
        assert any("pyramid of 2 levels" in n for n in source.notes) and any("holds 2 images" in n for n in source.notes)
    stack = tmp_path / "stack.tif"
    tifffile.imwrite(stack, np.stack([picture[..., 0], picture[..., 1]]), photometric="minisblack")
    with open_image(stack) as source:
        np.testing.assert_array_equal(source.read((0, 0, 1700, 1100))[..., 1], picture[..., 0])
        assert any("using index 0" in n for n in source.notes)


def test_other_formats_are_decoded_whole_by_read_image_with_its_guard(tmp_path, picture):
    path = tmp_path / "photo.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    Image.fromarray(picture[:300, :500]).save(path, exif=exif)
    expected, notes = read_image(path)
    with open_image(path) as source:
        assert isinstance(source, ArraySource) and (source.height, source.width) == (500, 300)
        np.testing.assert_array_equal(source.read((10, 20, 300, 480)), expected[20:480, 10:300])
        assert source.notes == notes and "EXIF orientation 6" in notes[0]
    with pytest.raises(InputError, match="above max_pixels 1,000"):
        open_image(path, max_pixels=1000)


def test_a_tiff_named_png_is_read_as_tiff_and_a_text_named_tif_is_refused(tmp_path, picture):
    disguised = tmp_path / "really_a_tiff.png"
    tifffile.imwrite(disguised, picture, photometric="rgb", tile=(256, 256))
    with open_image(disguised) as source:
        assert type(source).__name__ == "TiffSource"
    text = tmp_path / "notes.tif"
    text.write_text("not an image")
    with pytest.raises(InputError, match="not an image"):
        open_image(text)
    with pytest.raises(InputError, match="no such file"):
        open_image(tmp_path / "missing.tif")


@pytest.mark.parametrize("keep", [0.6, 0.02])
def test_truncated_tiff_is_refused_with_a_clear_message(tmp_path, picture, keep):
    path = tmp_path / "cut.tif"
    tifffile.imwrite(path, picture, photometric="rgb", tile=(256, 256), compression="zlib")
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(InputError, match="incomplete") as error:
        open_image(path)
    assert "truncated" in str(error.value) or "not a readable TIFF" in str(error.value)


def test_corrupt_tile_fails_when_read_naming_the_window(tmp_path, picture):
    path = tmp_path / "corrupt.tif"
    tifffile.imwrite(path, picture, photometric="rgb", tile=(256, 256), compression="zlib")
    with tifffile.TiffFile(path) as tif:
        offset = tif.pages[0].dataoffsets[10]  # tile row 1, column 3
    data = bytearray(path.read_bytes())
    data[offset : offset + 64] = bytes(64)
    path.write_bytes(bytes(data))
    with open_image(path) as source:
        source.read((0, 0, 256, 256))  # other tiles still read
        with pytest.raises(InputError, match=r"cannot decode pixels \(700, 300, 900, 400\).*corrupt"):
            source.read((700, 300, 900, 400))


def test_unsupported_layouts_and_bad_windows_are_refused(tmp_path, picture):
    lab = tmp_path / "lab.tif"
    tifffile.imwrite(lab, picture, photometric="cielab")
    with pytest.raises(InputError, match="photometric CIELAB is not supported"):
        open_image(lab)
    good = tmp_path / "good.tif"
    tifffile.imwrite(good, picture, photometric="rgb", tile=(256, 256))
    with open_image(good) as source:
        for box in [(0, 0, 1701, 10), (5, 5, 5, 10), (-1, 0, 10, 10), (0.5, 0, 10, 10)]:
            with pytest.raises(ValueError, match="window"):
                source.read(box)


def test_a_file_in_one_huge_compressed_strip_is_decoded_whole_or_refused(tmp_path, picture, monkeypatch):
    monkeypatch.setattr(tiff_module, "CHUNK_LIMIT", 2**20)  # stands for 256 MiB: this strip is 5.4 MiB
    path = tmp_path / "one_strip.tif"
    tifffile.imwrite(path, picture, photometric="rgb", rowsperstrip=1100, compression="zlib")
    with open_image(path) as source:
        np.testing.assert_array_equal(source.read((100, 100, 900, 700)), picture[100:700, 100:900])
        assert any("decoded whole" in n for n in source.notes)
    with pytest.raises(InputError, match="gdal_translate -co TILED=YES.*max_pixels"):
        open_image(path, max_pixels=1000)


def write_geotiff(path: Path, picture: np.ndarray) -> tuple:
    import rasterio
    from affine import Affine

    crs, transform = rasterio.crs.CRS.from_epsg(32633), Affine(0.5, 0.0, 500000.0, 0.0, -0.5, 4200000.0)
    height, width = picture.shape[:2]
    profile = dict(driver="GTiff", width=width, height=height, count=3, dtype="uint8", crs=crs, transform=transform)
    with rasterio.open(path, "w", tiled=True, blockxsize=256, blockysize=256, compress="lzw", **profile) as dataset:
        dataset.write(np.moveaxis(picture, 2, 0))
    return crs, transform


def test_geotiff_input_gives_its_crs_and_transform(tmp_path, picture, monkeypatch):
    pytest.importorskip("rasterio")
    path = tmp_path / "scene.tif"
    crs, transform = write_geotiff(path, picture)
    with open_image(path) as source:
        np.testing.assert_array_equal(source.read((0, 0, 1700, 1100)), picture)  # GDAL's band-interleaved LZW
        assert source.geo.transform == tuple(transform)[:6]
        assert source.geo.crs == crs.to_wkt() and "EPSG:32633" in source.notes[0]
    monkeypatch.setattr(geo_module, "have_rasterio", lambda: False)
    with open_image(path) as source:
        assert source.geo is None
        assert "pip install 'sam-blocked[geo]'" in source.notes[0]


def test_the_sources_import_one_way_base_tiff_then_the_picker():
    """tiff.py builds on inputs.base; only inputs.sources (open_image) knows both: no import circle."""
    import ast

    from sam_blocked.inputs import base, sources

    def imported(module) -> set[str]:
        tree = ast.parse(Path(module.__file__).read_text())
        return {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}

    assert "sam_blocked.inputs.sources" not in imported(tiff_module), "tiff.py must not import the module that picks it"
    assert not {"sam_blocked.inputs.sources", "sam_blocked.inputs.tiff"} & imported(base)
    assert sources.TiffSource is tiff_module.TiffSource and sources.ImageSource is base.ImageSource
