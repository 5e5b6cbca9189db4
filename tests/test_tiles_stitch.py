"""Stitching proven with a stand-in predictor that knows the objects: the connected component
under each point, as the tile it is decoded in sees it (clipped to the tile).

On a synthetic image of disks and bars that cross tile borders, the stitched masks must be
exactly skimage.measure.label of the truth, each object once; with an overlap too small for
the objects, the pieces of a cut object are reported truncated, never passed off as whole.
"""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from segment_anything.utils.transforms import ResizeLongestSide
from skimage import measure
from skimage.draw import disk

from sam_blocked.tiles.crops import MaskCrop
from sam_blocked.tiles.plan import Tiling, plan_points
from sam_blocked.tiles.stitch import intersection, is_duplicate, rank_key, stitch_points
from sam_blocked.tiles.loop import segment_tiled
from sam_blocked.tiles.tile import DecodeSettings, segment_tile

TILE = 128


@pytest.fixture(autouse=True)
def _one_thread():
    # The stand-in's tensors are small: a second thread only spins (20x slower on a busy 2-core machine).
    torch.set_num_threads(1)
SETTINGS = DecodeSettings(points_per_batch=32)  # SAM's filters: the stand-in's masks pass them (stability 1, IoU 0.99)


class _PromptEncoder:
    """The stand-in's prompt encoder: a point's "embedding" is its coordinates."""

    def __call__(self, points, boxes=None, masks=None):
        coords, _ = points  # (B, 1, 2)
        return coords, torch.zeros(len(coords), 1)

    def get_dense_pe(self):
        return None


class ComponentPredictor:
    """A SamPredictor stand-in: the mask of a point is the connected component under it, as
    each point in the tile it was given; background points give an empty mask. It answers
    at the decoder's level (prompt encoder, mask decoder, postprocess_masks), where
    sam_blocked.automatic.batch.decode_steps calls a model."""

    def __init__(self, tile: int) -> None:
        self.model = SimpleNamespace(
            mask_threshold=0.0,
            image_encoder=SimpleNamespace(img_size=tile),
            prompt_encoder=_PromptEncoder(),
            mask_decoder=self._mask_decoder,
            postprocess_masks=lambda masks, input_size, original_size: masks,  # the stand-in's masks are at the tile's size
        )
        self.transform = ResizeLongestSide(tile)
        self.device = torch.device("cpu")
        self.features = torch.zeros(1, 1, 1, 1)
        self.encoded = 0

    def set_image(self, image: np.ndarray) -> None:
        self.labels = measure.label(image[..., 0] > 0)  # (h, w), components as the tile shows them
        self.original_size = self.input_size = image.shape[:2]
        self.encoded += 1

    def reset_image(self) -> None:
        self.labels = None

    def _mask_decoder(self, image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings, multimask_output=True):
        assert self.transform.get_preprocess_shape(*self.original_size, TILE) == self.original_size, "scale 1"
        masks = []
        for x, y in sparse_prompt_embeddings[:, 0, :].tolist():
            label = self.labels[int(y), int(x)]
            masks.append(torch.as_tensor((self.labels == label) & (label > 0)))
        logits = torch.where(torch.stack(masks)[:, None], 10.0, -10.0).expand(-1, 3, -1, -1)  # (B, 3, h, w)
        return logits, torch.full((len(masks), 3), 0.99)


def objects(height: int, width: int, seed: int, size: int = 32) -> np.ndarray:
    """(H, W, 3) uint8: disks (radius 12 to size / 2) and bars (size x 16 px), at most `size` px
    across, many on tile borders, none touching another or the image edge. Each holds a point of
    a 16 px grid."""
    rng = random.Random(seed)
    truth = np.zeros((height, width), bool)
    borders = list(range(TILE // 2, max(height, width), TILE // 2))
    for _ in range(300):
        x = rng.choice(borders + [rng.randrange(width)]) + rng.randrange(-16, 16)
        y = rng.choice(borders + [rng.randrange(height)]) + rng.randrange(-16, 16)
        kind = rng.choice(["disk", "bar", "column"])
        if kind == "disk":
            r = rng.randint(12, size // 2)
            x0, y0, x1, y1 = x - r, y - r, x + r + 1, y + r + 1
        else:
            w, h = (size, 16) if kind == "bar" else (16, size)
            x0, y0, x1, y1 = x - w // 2, y - h // 2, x + w // 2, y + h // 2
        if x0 < 2 or y0 < 2 or x1 > width - 2 or y1 > height - 2 or truth[y0 - 2 : y1 + 2, x0 - 2 : x1 + 2].any():
            continue
        if kind == "disk":
            truth[disk((y, x), r + 0.5, shape=truth.shape)] = True
        else:
            truth[y0:y1, x0:x1] = True
    return np.repeat((truth * 200).astype(np.uint8)[..., None], 3, axis=2)


def paste(masks: list[MaskCrop], height: int, width: int) -> np.ndarray:
    """Test-side only: an (H, W) label image of the crops, ids from 1, checking no pixel is claimed twice."""
    out = np.zeros((height, width), np.int32)
    for i, m in enumerate(masks, start=1):
        x0, y0, x1, y1 = m.box
        window = out[y0:y1, x0:x1]
        assert not (window[m.mask] > 0).any(), f"mask {i} overlaps mask {window[m.mask].max()}"
        window[m.mask] = i
    return out


def components(labels: np.ndarray) -> set[bytes]:
    return {np.flatnonzero(labels == i).tobytes() for i in range(1, labels.max() + 1)}


@pytest.fixture(scope="module")
def scene():
    image = objects(300, 520, seed=1)
    truth = measure.label(image[..., 0] > 0)
    assert truth.max() > 40
    return image, truth


@pytest.mark.slow
@pytest.mark.parametrize("size, seed", [(32, 1), (60, 0), (60, 3)])
def test_stitched_masks_are_the_objects_each_once(size, seed):
    image = objects(300, 520, seed=seed, size=size)
    truth = measure.label(image[..., 0] > 0)
    height, width = truth.shape
    tiling = Tiling(TILE, 64)  # objects up to 32 px (overlap / 2) are whole in the tile owning any of their points
    predictor = ComponentPredictor(TILE)
    progress = []
    result = segment_tiled(predictor, image, height, width, tiling, points_per_side=8, settings=SETTINGS, on_tile=lambda *a: progress.append(a))
    assert result.tiles == result.encoder_passes == predictor.encoded == len(tiling.boxes(height, width)) == 32
    assert progress == [(i, 32) for i in range(1, 33)], "per-tile progress"
    xs = [np.nonzero(truth == i)[1] for i in range(1, truth.max() + 1)]
    crossing = sum(any(x.min() < b <= x.max() for b in range(TILE // 2, width, TILE // 2)) for x in xs)
    assert crossing > 10, "many objects cross tile borders"
    candidates = [c for task in plan_points(tiling, height, width, 8) for c in segment_tile(predictor, image, task, SETTINGS)]
    assert len(candidates) > len(result.masks), "objects found in several tiles"
    if size > 32:
        assert sum(c.record["truncated"] for c in candidates) > 5, "some found cut by a tile edge, and whole elsewhere"
    assert _signature(stitch_points(candidates, SETTINGS.box_nms_thresh)) == _signature(result.masks)
    assert not any(m.record["truncated"] for m in result.masks)
    labels = paste(result.masks, height, width)
    assert len(result.masks) == truth.max(), "each object once: no duplicates"
    assert components(labels) == components(truth), "stitched labels are skimage.measure.label of the truth"


@pytest.mark.parametrize("overlap", [0, 16])
def test_too_small_an_overlap_reports_cut_objects_truncated_never_silently_split(scene, overlap):
    image, truth = scene
    height, width = truth.shape
    result = segment_tiled(ComponentPredictor(TILE), image, height, width, Tiling(TILE, overlap), points_per_side=8, settings=SETTINGS)
    whole = {np.flatnonzero(truth == i).tobytes(): i for i in range(1, truth.max() + 1)}
    found = np.zeros_like(truth, dtype=bool)
    masks_on = {i: [] for i in whole.values()}
    for m in result.masks:
        full = np.zeros_like(found)
        x0, y0, x1, y1 = m.box
        full[y0:y1, x0:x1] = m.mask
        found |= full
        (obj,) = np.unique(truth[full])
        assert obj > 0, "every mask is (part of) one object"
        masks_on[obj].append(m)
        if not m.record["truncated"]:
            assert np.flatnonzero(full).tobytes() in whole, "a mask not marked truncated is a whole object"
    cut = 0
    for obj, masks in masks_on.items():
        assert masks, f"object {obj} dropped"
        if len(masks) > 1 or not found[truth == obj].all():
            cut += 1
            assert all(m.record["truncated"] for m in masks), f"object {obj} split into {len(masks)} masks, not all marked truncated"
    assert cut > 5, "the scene has objects that no tile sees whole"


def test_tile_order_does_not_change_the_output(scene):
    image, truth = scene
    height, width = truth.shape
    tiling = Tiling(TILE, 16)  # small overlap: truncated pieces and duplicates to sort out
    tasks = plan_points(tiling, height, width, 8)
    crops = [segment_tile(ComponentPredictor(TILE), image, t, SETTINGS) for t in tasks]
    reference = _signature(stitch_points([c for tile in crops for c in tile], 0.7))
    for seed in range(3):
        order = list(range(len(crops)))
        random.Random(seed).shuffle(order)
        shuffled = [c for i in order for c in crops[i]]
        assert _signature(stitch_points(shuffled, 0.7)) == reference


def _signature(masks: list[MaskCrop]) -> list:
    return [(m.x0, m.y0, m.mask.shape, m.mask.tobytes(), sorted(m.record.items())) for m in masks]


def crop(x0: int, y0: int, mask, *, tile: int = 0, truncated: bool = False, iou: float = 0.9) -> MaskCrop:
    mask = np.asarray(mask, bool)
    return MaskCrop(mask, x0, y0, {"area": int(mask.sum()), "truncated": truncated, "tile": tile, "predicted_iou": iou, "stability_score": 1.0, "point_coords": [[x0, y0]]})


def test_overlaps_are_counted_on_crops_where_boxes_meet():
    a = crop(10, 10, np.ones((4, 5)))
    b = crop(12, 11, [[1, 0, 1], [1, 1, 1]])  # rows 11-12, columns 12-14
    assert intersection(a, b) == intersection(b, a) == 5
    assert intersection(a, crop(15, 10, np.ones((2, 2)))) == 0, "boxes touch at an edge: no shared pixel"
    assert intersection(a, crop(0, 0, np.ones((3, 3)))) == 0


def test_duplicate_rules():
    whole = crop(0, 0, np.ones((10, 10)), tile=0)
    piece = crop(0, 0, np.ones((10, 4)), tile=1, truncated=True)  # IoU 0.4, covered fully
    assert is_duplicate(piece, whole, 0.7), "a cut piece of an object another tile saw whole"
    same_tile = crop(0, 0, np.ones((10, 4)), tile=0, truncated=True)
    assert not is_duplicate(same_tile, whole, 0.7), "within a tile, SAM's NMS already decided"
    assert not is_duplicate(crop(0, 0, np.ones((10, 4)), tile=1), whole, 0.7), "a whole part of an object is SAM's multimask, kept"
    big_cut = crop(0, 0, np.ones((10, 30)), tile=1, truncated=True)
    small = crop(2, 2, np.ones((3, 3)), tile=0)
    assert not is_duplicate(big_cut, small, 0.7), "a small object inside a cut piece does not remove the piece"
    assert is_duplicate(crop(0, 0, np.ones((10, 9)), tile=0), whole, 0.7), "IoU 0.9 > 0.7"


def test_ranking_puts_whole_masks_first_then_predicted_iou():
    masks = [crop(0, 0, np.ones((2, 2)), truncated=True, iou=0.99), crop(5, 5, np.ones((2, 2)), iou=0.5), crop(9, 9, np.ones((2, 2)), iou=0.8)]
    assert [m.x0 for m in sorted(masks, key=rank_key)] == [9, 5, 0]
