"""The demo's "Download for viewers": what is shown, written with the batch run's writers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile

pytest.importorskip("gradio")
shapely = pytest.importorskip("shapely")

from sam_blocked.demo import handlers as demo  # noqa: E402
from test_outputs_formats import naive_labels, photo_masks, rasterize  # noqa: E402


@pytest.mark.slow
def test_the_shown_masks_download_as_ome_tiff_geojson_and_gpkg(tmp_path):
    from skimage import data

    image = data.coffee()[:371, :553]
    crops, full = photo_masks(image)
    session = demo.DemoSession(image=image, name="coffee.png", everything_crops=crops)
    with pytest.raises(ValueError, match="unknown export"):
        demo.export(session, "png")
    paths = {kind: demo.export(session, kind) for kind in demo.EXPORTS}
    ome, geojson, gpkg = paths.values()
    assert [p.name for p in paths.values()] == ["coffee.labels.ome.tif", "coffee.geojson", "coffee.gpkg"]
    with tifffile.TiffFile(ome) as tif:
        assert tif.is_ome and len(tif.series[0].levels) == 3
        np.testing.assert_array_equal(tif.series[0].levels[0].asarray(), naive_labels(crops, 371, 553))
    features = json.loads(geojson.read_text())["features"]
    assert [f["properties"]["id"] for f in features] == list(range(1, len(crops) + 1))
    assert all(np.array_equal(rasterize(shapely.geometry.shape(f["geometry"]), 371, 553), m) for f, m in zip(features, full))
    import pyogrio

    assert pyogrio.read_info(gpkg)["features"] == len(crops)
    update = demo.on_export(session, next(iter(demo.EXPORTS)))
    assert update["visible"] and update["value"] == str(ome) and "coffee.labels.ome.tif" in update["label"]
    session.everything_crops = None
    with pytest.raises(ValueError, match="no masks yet"):
        demo.export(session, next(iter(demo.EXPORTS)))
    session.close()
