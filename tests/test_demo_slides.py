"""The web demo on images opened on the server (--slides): a slide or an OME-Zarr is read window by
window, shown from a low-resolution level, and a click encodes its tile at the level asked for.

Built from scikit-image photographs (tests/test_inputs_formats.py); tiny SAM at 256 px (TILED),
random weights: the plumbing is checked, the masks compared with the library's own.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

gr = pytest.importorskip("gradio", reason="the demo needs gradio: pip install 'sam-blocked[demo]'")

from test_demo import TILED, click, count_encodes  # noqa: E402  tests/ is on sys.path
from test_demo_tiles import library_masks  # noqa: E402
from test_inputs_formats import mosaic, photo_channels, stretched, write_ome_zarr, write_svs  # noqa: E402

from sam_blocked.demo import handlers as demo  # noqa: E402
from sam_blocked.inputs.base import ImageSource, ReadSettings  # noqa: E402
from sam_blocked.inputs.prompts import Prompt  # noqa: E402


@pytest.fixture
def tile_encodes():
    yield from count_encodes(TILED)


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    """A folder with an SVS pyramid (600 x 1200, then 300 x 600) and a 4-channel OME-Zarr 0.5."""
    folder = tmp_path_factory.mktemp("slides")
    image = np.concatenate([np.concatenate([mosaic(), mosaic()[::-1]], axis=0)] * 3, axis=1)  # (600, 1200, 3)
    level1 = write_svs(folder / "tissue.svs", image)
    write_ome_zarr(folder / "cells.ome.zarr", "0.5", photo_channels())
    return folder, image, level1


@pytest.mark.slow
def test_a_slide_is_shown_from_a_low_level_and_a_click_encodes_its_tile_at_level_0(slides, tile_encodes, monkeypatch):
    folder, image, level1 = slides
    listed = demo.list_server_images(folder)
    assert [p.rsplit("/", 1)[1] for p in listed] == ["cells.ome.zarr", "tissue.svs"]
    monkeypatch.setattr("sam_blocked.demo.session.PREVIEW_SIDE", 600)  # the preview is level 1's size: read from it
    session, canvas, _, _, _, status, _ = demo.on_server_image(str(folder / "tissue.svs"), demo.DemoSession(), TILED, listed)
    assert isinstance(session.image, ImageSource) and session.image.shape == (600, 1200, 3) and session.tiled
    np.testing.assert_array_equal(session.preview.image, level1)
    assert tile_encodes == [] and "(1200 x 600 at level 0 (x1 of level 0, 0.25 um/px)) is larger than the 256 px input" in status

    session, *_ = demo.on_click(session, "fg", click(250, 100))
    assert len(tile_encodes) == 1 and session.prompts.points == (session.preview.to_full(250, 100),)
    task, crops = library_masks(TILED, image, Prompt("click", foreground=session.prompts.points))
    assert task.box == session.tile.task.box and [c.record["predicted_iou"] for c in crops] == list(session.scores)
    demo.DemoSession.close(session)


@pytest.mark.slow
def test_a_level_and_channels_asked_for_are_what_a_click_encodes(slides, tile_encodes):
    folder, _, _ = slides
    listed = demo.list_server_images(folder)
    settings = dataclasses.replace(TILED, read=ReadSettings(level=1, channels=(3,)))
    session, *_, status, _ = demo.on_server_image(str(folder / "cells.ome.zarr"), demo.DemoSession(), settings, listed)
    # level 1 is 200 x 150: it fits the 256 px input, so it is decoded and encoded whole
    assert isinstance(session.image, np.ndarray) and session.embedding is not None and len(tile_encodes) == 1
    import zarr

    group = zarr.open_group(str(folder / "cells.ome.zarr"), mode="r")
    np.testing.assert_array_equal(session.image, stretched(np.asarray(group[group.attrs["ome"]["multiscales"][0]["datasets"][1]["path"]]), (3,), True))

    with pytest.raises(gr.Error, match="--level 5 is past the last"):
        demo.on_server_image(str(folder / "cells.ome.zarr"), demo.DemoSession(), dataclasses.replace(TILED, read=ReadSettings(level=5)), listed)
    with pytest.raises(gr.Error, match="is not one of the images this demo was started with"):
        demo.on_server_image("/etc/passwd", demo.DemoSession(), TILED, listed)
