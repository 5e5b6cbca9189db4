"""Tile geometry, exhaustively over small sizes: boxes, cores, ownership, routing, box tests."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from segment_anything.utils.amg import build_point_grid

from sam_blocked.tiles.geometry import (
    boxes_meet,
    centred_box,
    boxes_meeting,
    check_tiling,
    core_bounds,
    grid_points,
    margins,
    owners,
    route,
    tile_boxes,
    tile_cores,
    tile_grid,
    tile_starts,
    touches_inner_edge,
)

# (length, tile, overlap): every length from 1 to 3 tiles and a bit, several overlaps.
CASES = [(n, t, o) for t in (16, 32, 48) for o in sorted({0, 1, 5, t // 4, t // 2, t - 1}) for n in range(1, 3 * t + 7)]


def sahi_starts(length: int, tile: int, overlap: int) -> list[int]:
    """SAHI's get_slice_bboxes along one axis, transcribed: the oracle."""
    starts, lo, hi = [], 0, 0
    while hi < length:
        hi = lo + tile
        starts.append(max(0, min(length, hi) - tile) if hi > length else lo)
        lo = hi - overlap
    return starts


@pytest.mark.parametrize("tile", [16, 32, 48])
def test_tile_starts_are_sahis_every_tile_full_size_and_overlapping_enough(tile):
    for length, t, overlap in CASES:
        if t != tile:
            continue
        starts = tile_starts(length, tile, overlap)
        assert starts == sahi_starts(length, tile, overlap), (length, tile, overlap)
        size = min(tile, length)
        ends = [s + size for s in starts]
        assert starts[0] == 0 and ends[-1] == length, "the tiles cover the axis, the last one ends at the edge"
        assert all(0 <= s and e <= length for s, e in zip(starts, ends)), "every tile full size, inside the image"
        assert all(b > a for a, b in zip(starts, starts[1:])), "no tile twice"
        assert all(ends[i] - starts[i + 1] >= overlap for i in range(len(starts) - 1)), "neighbours share >= overlap px"
        if length > tile:
            assert all(starts[i + 1] - starts[i] == tile - overlap for i in range(len(starts) - 2)), "fixed stride but the last"


def test_an_image_that_fits_one_tile_is_one_tile_of_its_own_size():
    assert tile_boxes(100, 200, 256, 64) == [(0, 0, 200, 100)]
    assert tile_boxes(256, 256, 256, 0) == [(0, 0, 256, 256)]
    assert tile_grid(300, 200, 256, 64) == (2, 1)
    assert tile_boxes(300, 200, 256, 64) == [(0, 0, 200, 256), (0, 44, 200, 300)], "last row shifted back, full height"


def test_cores_partition_each_axis_and_lie_inside_their_tiles_with_half_the_overlap_to_spare():
    for length, tile, overlap in CASES:
        bounds = core_bounds(length, tile, overlap)
        starts = tile_starts(length, tile, overlap)
        assert bounds[0] == 0 and bounds[-1] == length and len(bounds) == len(starts) + 1
        assert all(b > a for a, b in zip(bounds, bounds[1:])), f"empty core for {(length, tile, overlap)}"
        for i, s in enumerate(starts):
            e = s + min(tile, length)
            lo, hi = bounds[i], bounds[i + 1]
            assert s <= lo and hi <= e, "a core lies in its tile"
            if i > 0:
                assert lo - s >= overlap // 2, "owned pixels sit at least overlap // 2 inside the tile"
            if i < len(starts) - 1:
                assert e - hi >= overlap // 2


@pytest.mark.parametrize("height, width, tile, overlap", [(40, 70, 16, 5), (33, 17, 16, 0), (16, 16, 16, 8), (50, 90, 32, 31)])
def test_2d_cores_partition_the_image_and_owners_agree_with_them(height, width, tile, overlap):
    boxes, cores = tile_boxes(height, width, tile, overlap), tile_cores(height, width, tile, overlap)
    assert len(boxes) == len(cores) == math.prod(tile_grid(height, width, tile, overlap))
    cover = np.zeros((height, width), dtype=int)
    for (x0, y0, x1, y1), (tx0, ty0, tx1, ty1) in zip(cores, boxes):
        cover[y0:y1, x0:x1] += 1
        assert tx0 <= x0 and ty0 <= y0 and x1 <= tx1 and y1 <= ty1
        assert (tx1 - tx0, ty1 - ty0) == (min(tile, width), min(tile, height)), "every tile full size"
    assert (cover == 1).all(), "cores partition the image"
    ys, xs = np.mgrid[0:height, 0:width]
    pixels = np.stack([xs.ravel() + 0.5, ys.ravel() + 0.5], axis=1)  # pixel centres
    got = owners(pixels, height, width, tile, overlap)
    expected = np.empty(height * width, dtype=int)
    for i, (x0, y0, x1, y1) in enumerate(cores):
        inside = (pixels[:, 0] >= x0) & (pixels[:, 0] < x1) & (pixels[:, 1] >= y0) & (pixels[:, 1] < y1)
        expected[inside] = i
    np.testing.assert_array_equal(got, expected)
    edges = np.array([[width, height], [0, 0], [width, 0], [0.0, height]])  # on the image border: the border pixel's owner
    np.testing.assert_array_equal(owners(edges, height, width, tile, overlap), owners(np.clip(edges, 0, [width - 0.5, height - 0.5]), height, width, tile, overlap))


def test_route_picks_the_tile_with_the_largest_margin_to_inner_edges():
    height, width, tile, overlap = 40, 70, 16, 6
    boxes = tile_boxes(height, width, tile, overlap)
    rng = np.random.default_rng(0)
    for _ in range(2000):
        x0, x1 = np.sort(rng.uniform(0, width, 2))
        y0, y1 = np.sort(rng.uniform(0, height, 2))
        if rng.random() < 0.3:
            x1, y1 = x0, y0  # a single point
        extent = (x0, y0, x1, y1)
        best = route(extent, boxes, height, width)
        scores = []
        for tx0, ty0, tx1, ty1 in boxes:
            if not (tx0 <= x0 and x1 <= tx1 and ty0 <= y0 and y1 <= ty1):
                scores.append(-math.inf)
                continue
            sides = [(x0 - tx0, tx0 > 0), (y0 - ty0, ty0 > 0), (tx1 - x1, tx1 < width), (ty1 - y1, ty1 < height)]
            scores.append(min([gap for gap, inner in sides if inner], default=math.inf))
        if max(scores) == -math.inf:
            assert best is None
            assert max(x1 - x0, y1 - y0) > overlap, "any extent up to the overlap fits some tile"
        else:
            assert best == scores.index(max(scores)), extent
        np.testing.assert_array_equal(margins(extent, boxes, height, width), scores)


def test_route_of_a_point_in_the_shifted_last_tile_and_ties():
    boxes = tile_boxes(40, 70, 16, 6)  # columns start 0, 10, 20, ..., 50, 54
    last = route((69, 39, 69, 39), boxes, 40, 70)
    assert boxes[last] == (54, 24, 70, 40), "the shifted last tile holds the bottom-right corner"
    (only,) = tile_boxes(10, 10, 16, 6)
    assert route((0, 0, 10, 10), [only], 10, 10) == 0, "a single tile is the whole image: infinite margin"
    assert route((3, 3, 3, 3), [(0, 0, 16, 16), (0, 0, 16, 16)], 40, 40) == 0, "ties go to the first tile"


def test_boxes_meet_brute_force():
    spans = [(a, b) for a in range(5) for b in range(a + 1, 6)]
    boxes = [(x0, y0, x1, y1) for (x0, x1), (y0, y1) in itertools.product(spans, spans)]
    array = np.array(boxes)
    for a in boxes:
        grid_a = np.zeros((6, 6), bool)
        grid_a[a[1] : a[3], a[0] : a[2]] = True
        expected = []
        for b in boxes:
            grid_b = np.zeros((6, 6), bool)
            grid_b[b[1] : b[3], b[0] : b[2]] = True
            expected.append(bool((grid_a & grid_b).any()))
            assert boxes_meet(a, b) == expected[-1], (a, b)
        np.testing.assert_array_equal(boxes_meeting(a, array), expected)


def test_touches_inner_edge_only_counts_edges_inside_the_image():
    tile = (10, 0, 26, 16)  # a tile at the top edge, not at the left
    assert touches_inner_edge((10, 5, 12, 7), tile, 40, 40), "left tile edge is inside the image"
    assert not touches_inner_edge((11, 0, 12, 7), tile, 40, 40), "top tile edge is the image edge"
    assert touches_inner_edge((11, 5, 26, 7), tile, 40, 40) and touches_inner_edge((11, 5, 12, 16), tile, 40, 40)
    assert not touches_inner_edge((11, 1, 25, 15), tile, 40, 40)
    assert not touches_inner_edge((0, 0, 40, 40), (0, 0, 40, 40), 40, 40), "a whole-image tile cuts nothing"


def test_grid_points_at_tile_spacing_are_sams_grid_on_a_tile_sized_image():
    for side, n in [(1024, 32), (256, 8), (512, 5)]:
        np.testing.assert_allclose(grid_points(side, side, side / n), build_point_grid(n) * side, atol=1e-9)
    points = grid_points(100, 70, 16)
    assert points[:, 0].max() < 70 and points[:, 1].max() < 100 and points.min() == 8
    assert np.unique(points[:, 0]).tolist() == [8, 24, 40, 56] and np.unique(points[:, 1]).tolist() == [8, 24, 40, 56, 72, 88]


@pytest.mark.parametrize(
    "tile, overlap, phrase",
    [(100, 10, "multiple of the patch size 16.*use 96 or 112"), (0, 0, "^tile 0"), (8, 0, "^tile 8"), (True, 0, "^tile True"),
     (256, 256, r"^overlap 256 px must be a whole number in \[0, 256\) for tile 256"), (256, -1, "^overlap -1"), (256, 2.5, "^overlap 2.5")],
)  # fmt: skip
def test_check_tiling_refuses_with_the_flag_to_change(tile, overlap, phrase):
    with pytest.raises(ValueError, match=phrase):
        check_tiling(tile, overlap)
    check_tiling(256, 0)
    check_tiling(2048, 2047)


def test_check_tiling_names_settings_the_cli_spells_as_flags():
    from sam_blocked.cli import FLAGS
    from sam_blocked.errors import SettingError, spell

    with pytest.raises(SettingError) as refused:
        check_tiling(256, 300)
    assert str(refused.value).startswith("overlap 300 px must be a whole number in [0, 256) for tile 256")
    assert spell(refused.value, FLAGS).startswith("--overlap 300 px must be a whole number in [0, 256) for --tile 256")


def test_centred_box_holds_the_extent_on_whole_pixels_inside_the_image():
    rng = np.random.default_rng(1)
    for _ in range(3000):
        height, width, tile = int(rng.integers(1, 90)), int(rng.integers(1, 90)), 32
        x0, x1 = np.sort(rng.uniform(0, width, 2))
        y0, y1 = np.sort(rng.uniform(0, height, 2))
        box = centred_box((x0, y0, x1, y1), tile, height, width)
        fits = all(side <= tile or math.ceil(hi - tile) <= math.floor(lo) for lo, hi, side in ((x0, x1, width), (y0, y1, height)))
        if not fits:
            assert box is None
            continue
        bx0, by0, bx1, by1 = box
        assert all(isinstance(v, int) for v in box)
        assert (bx1 - bx0, by1 - by0) == (min(tile, width), min(tile, height)) and 0 <= bx0 and 0 <= by0 and bx1 <= width and by1 <= height
        assert bx0 <= x0 and x1 <= bx1 and by0 <= y0 and y1 <= by1
        if tile < width and bx0 > 0 and bx1 < width:
            assert abs((bx0 + bx1) / 2 - (x0 + x1) / 2) <= 1, "centred"
