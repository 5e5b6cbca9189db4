"""sam_blocked.automatic against stock segment_anything itself: the mask decoder without a copy of
the image per prompt, the RLE, and whole SamAutomaticMaskGenerator runs over its settings.

The oracle and the comparison rules (what "the same records" means, with each tolerance's
reason) are in tests/automatic_oracle.py.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from segment_anything import SamAutomaticMaskGenerator
from segment_anything.modeling import MaskDecoder
from segment_anything.utils.amg import mask_to_rle_pytorch
from skimage import data

import sam_blocked
from automatic_oracle import compare_records, peaked_sam, record_stock_logits
from sam_blocked.automatic.batch import mask_to_rle
from sam_blocked.automatic.decoder import decoder_reasons, predict_masks
from sam_blocked.automatic.generator import BlockedMaskGenerator
from sam_blocked.models.registry import cast_image_encoder

DECODER_RTOL = 1e-5  # reassociated float32 sums over 256 channels: stock's own rounding is ~1e-7 relative


@pytest.fixture(scope="module")
def sam():
    return peaked_sam()


@pytest.fixture(scope="module")
def image():
    return data.astronaut()[100:231, 150:347]  # 131 x 197: neither side a multiple of 16


def _prompts(sam, n, seed=0, with_masks=False):
    g = torch.Generator().manual_seed(seed)
    size = sam.image_encoder.img_size
    points = (torch.rand(n, 2, 2, generator=g) * size, torch.tensor([[1, 0]] * n, dtype=torch.int))
    masks = torch.randn(n, 1, 4 * sam.prompt_encoder.image_embedding_size[0], 4 * sam.prompt_encoder.image_embedding_size[1], generator=g) if with_masks else None
    with torch.no_grad():
        return sam.prompt_encoder(points=points, boxes=None, masks=masks)


@pytest.mark.parametrize("workspace", [False, True], ids=["fresh-tensors", "workspace"])
@pytest.mark.parametrize("with_masks", [False, True], ids=["shared-image", "mask-prompts"])
@pytest.mark.parametrize("budget", [None, 1], ids=["default-budget", "one-prompt-steps"])
def test_decoder_matches_stock(sam, image, with_masks, budget, workspace):
    """The decoder against MaskDecoder.predict_masks; with a workspace, four calls in a row on
    it (its slots reused, the first layer's image side made once and kept): different prompts,
    then mask prompts (a different dense embedding: what was kept must not be used), then the
    first prompts again, then another image (what was kept is the first image's)."""
    from segment_anything import SamPredictor

    from sam_blocked.automatic.workspace import Workspace

    predictor = SamPredictor(sam)
    predictor.set_image(image)
    features = predictor.features
    predictor.set_image(np.ascontiguousarray(image[::-1]))
    other = predictor.features
    decoder = sam.mask_decoder
    assert decoder_reasons(decoder) == []
    pe = sam.prompt_encoder.get_dense_pe()
    work = Workspace() if workspace else None
    # 7 prompts: no chunk divides them
    calls = [(features, 7, with_masks, 0), (features, 5, not with_masks, 1), (features, 7, with_masks, 0), (other, 7, with_masks, 0)] if workspace else [(features, 7, with_masks, 0)]
    for embedding, n, masks, seed in calls:
        sparse, dense = _prompts(sam, n, seed=seed, with_masks=masks)
        with torch.no_grad():
            want_masks, want_iou = decoder.predict_masks(embedding, pe, sparse, dense)
            got_masks, got_iou = predict_masks(decoder, embedding, pe, sparse, dense, budget_bytes=budget, work=work)
        scale = want_masks.abs().max()
        assert (got_masks - want_masks).abs().max() <= DECODER_RTOL * scale, float((got_masks - want_masks).abs().max() / scale)
        assert torch.allclose(got_iou, want_iou, rtol=DECODER_RTOL, atol=DECODER_RTOL)


def test_mask_boxes_equal_stock():
    """mask_boxes (byte reductions) gives batched_mask_to_box's boxes exactly: empty, full,
    single pixels at the corners, thin lines, random masks and a non-contiguous view."""
    from segment_anything.utils.amg import batched_mask_to_box

    from sam_blocked.automatic.batch import mask_boxes

    g = torch.Generator().manual_seed(0)
    masks = torch.rand(12, 37, 53, generator=g) > 0.97
    masks[0] = False
    masks[1] = True
    masks[2] = False
    masks[2, 0, 0] = True
    masks[3] = False
    masks[3, 36, 52] = True
    masks[4] = False
    masks[4, 10, 3:40] = True
    masks[5] = False
    masks[5, 2:30, 51] = True
    for m in (masks, masks.transpose(1, 2), masks[:, 5:, ::2]):
        want = batched_mask_to_box(m)
        got = mask_boxes(m)
        assert got.dtype == want.dtype and torch.equal(got, want)
    assert torch.equal(mask_boxes(masks[:0]), batched_mask_to_box(masks[:0]))


@pytest.mark.parametrize("input_size, size", [((256, 256), (256, 256)), ((175, 256), (175, 256)), ((256, 187), (1500, 1100))], ids=["model-size", "padded", "resized"])
def test_postprocessing_steps_in_the_workspace_equal_stock(sam, input_size, size):
    """upsample and stability_score written into a workspace give Sam.postprocess_masks' logits
    and calculate_stability_score's scores bit for bit (the same aten ops), twice in a row on the
    same slots, the second step smaller."""
    from segment_anything.utils.amg import calculate_stability_score

    from sam_blocked.automatic.batch import stability_score, upsample
    from sam_blocked.automatic.workspace import Workspace

    g = torch.Generator().manual_seed(1)
    low = 4 * sam.prompt_encoder.image_embedding_size[0]
    work = Workspace()
    for m in (5, 2):
        low_res = torch.randn(1, m, low, low, generator=g) * 8
        with torch.no_grad():
            want = sam.postprocess_masks(low_res, input_size, size)[0]
            got = upsample(sam, low_res, input_size, size, work)[0]
            assert torch.equal(got, want)
            want_score = calculate_stability_score(want, sam.mask_threshold, 1.0)
            assert torch.equal(stability_score(got, sam.mask_threshold, 1.0, work), want_score)


def test_decoder_forward_under_switch_matches_stock(sam, image):
    """enable() swaps MaskDecoder.forward (a single prompt and multimask both), disable() restores it."""
    from segment_anything import SamPredictor

    stock_forward = MaskDecoder.__dict__["forward"]
    predictor = SamPredictor(sam)
    predictor.set_image(image)
    point = np.array([[60.0, 40.0]])
    want = [predictor.predict(point, np.array([1]), multimask_output=m, return_logits=True) for m in (True, False)]
    with sam_blocked.enabled():
        assert MaskDecoder.__dict__["forward"] is not stock_forward
        got = [predictor.predict(point, np.array([1]), multimask_output=m, return_logits=True) for m in (True, False)]
    assert MaskDecoder.__dict__["forward"] is stock_forward
    for (wm, ws, wl), (gm, gs, gl) in zip(want, got):
        assert np.abs(gl - wl).max() <= DECODER_RTOL * np.abs(wl).max()
        np.testing.assert_allclose(gs, ws, rtol=DECODER_RTOL, atol=DECODER_RTOL)


def test_one_generator_on_two_images_matches_stock(sam, image):
    """What a workspace keeps of an image (the first layer's image side) is that image's: one
    generator on two images in a row (crop layers: a new image per crop too) gives stock's
    records for each."""
    settings = SETTINGS["crop-layers"]
    blocked = BlockedMaskGenerator(sam, **settings, max_block_mb=1)
    for picture in (image, np.ascontiguousarray(image[::-1, ::-1])):
        stock = SamAutomaticMaskGenerator(sam, **settings)
        logits = record_stock_logits(stock)
        want = stock.generate(picture)
        compare_records(want, blocked.generate(picture), logits, settings)


@pytest.mark.parametrize("name", ["filters-off", "filters-mid", "crop-layers"])
def test_chunks_on_step_threads_match_stock(sam, image, name, monkeypatch):
    """On 2 CPU threads a batch's chunks of points run on step threads (attention.threads),
    each with its own workspace and half the budget, and are put back in stock's order: the
    records are stock's (compare_records' rule), the same as on 1 thread."""
    from sam_blocked.attention import threads

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        if threads.step_threads("cpu") < 2:
            pytest.skip("this torch's CPU operators do not run through a reachable OpenMP")
        from sam_blocked.automatic import batch

        seen = []
        records = batch._records

        def spy(*args):
            seen.append(threading.current_thread().name)
            return records(*args)

        monkeypatch.setattr(batch, "_records", spy)
        settings = SETTINGS[name]
        stock = SamAutomaticMaskGenerator(sam, **settings)
        logits = record_stock_logits(stock)
        want = stock.generate(image)
        got = BlockedMaskGenerator(sam, **settings, max_block_mb=1).generate(image)
        # a batch of one chunk runs in this thread; the others on both step threads
        assert {"sam_blocked-step-0", "sam_blocked-step-1"} <= set(seen), f"the chunks ran on {seen}"
        compare_records(want, got, logits, settings)
        with threads.steps_on_threads(1):
            one = BlockedMaskGenerator(sam, **settings, max_block_mb=1).generate(image)
        compare_records(want, one, logits, settings)
    finally:
        torch.set_num_threads(before)


def test_chunks_stay_in_this_thread_when_the_budget_holds_one_full_size_mask(sam, image, monkeypatch):
    """Each thread post-processes one full-size mask at least: a budget that holds fewer than
    two (131 x 197 px at 12 bytes a pixel: 0.30 MiB each, budget 0.5 MiB) runs the chunks here."""
    from sam_blocked.automatic import batch

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen = []
        records = batch._records
        monkeypatch.setattr(batch, "_records", lambda *args: seen.append(threading.current_thread().name) or records(*args))
        settings = SETTINGS["filters-off"]
        stock = SamAutomaticMaskGenerator(sam, **settings)
        logits = record_stock_logits(stock)
        want = stock.generate(image)
        compare_records(want, BlockedMaskGenerator(sam, **settings, max_block_mb=0.5).generate(image), logits, settings)
        assert seen and set(seen) == {threading.current_thread().name}
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("shape", [(1, 1), (37, 53), (64, 64)])
def test_mask_to_rle_matches_stock(shape):
    g = torch.Generator().manual_seed(sum(shape))
    masks = torch.rand(6, *shape, generator=g) > 0.5
    masks[0] = False
    masks[1] = True
    masks[2, 0, 0] = True
    masks[3, 0, 0] = False
    assert mask_to_rle(masks) == mask_to_rle_pytorch(masks)


SETTINGS = {
    "filters-off": dict(points_per_side=6, points_per_batch=5, pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0, output_mode="binary_mask"),
    "filters-mid": dict(points_per_side=6, points_per_batch=64, pred_iou_thresh=0.005, stability_score_thresh=0.1, stability_score_offset=0.5, box_nms_thresh=0.98, output_mode="uncompressed_rle"),
    "defaults": dict(points_per_side=4),
    "point-grids-small-regions": dict(points_per_side=None, point_grids=[np.random.default_rng(0).random((11, 2))], points_per_batch=4, pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0, min_mask_region_area=40, output_mode="coco_rle"),
    "crop-layers": dict(points_per_side=4, points_per_batch=7, pred_iou_thresh=0.005, stability_score_thresh=0.05, box_nms_thresh=0.95, crop_nms_thresh=0.95, crop_n_layers=1, crop_overlap_ratio=0.25, crop_n_points_downscale_factor=2, output_mode="coco_rle"),
}


@pytest.mark.parametrize("name", list(SETTINGS))
def test_generator_matches_stock(sam, image, name):
    settings = SETTINGS[name]
    stock = SamAutomaticMaskGenerator(sam, **settings)
    logits = record_stock_logits(stock)
    want = stock.generate(image)
    got = BlockedMaskGenerator(sam, **settings, max_block_mb=1).generate(image)  # 1 MiB: a few masks a step
    counts = compare_records(want, got, logits, settings)
    assert counts["records"] == len(want)
    if name == "filters-off":
        assert len(want) == 3 * 36  # every mask of every point: nothing filtered, all compared


def test_generator_matches_stock_bfloat16_encoder(image):
    """The encoder in bfloat16 (the supported cast: decoder in float32): the same records as stock on the same model."""
    sam = cast_image_encoder(peaked_sam(), torch.bfloat16)
    settings = SETTINGS["filters-off"]
    stock = SamAutomaticMaskGenerator(sam, **settings)
    logits = record_stock_logits(stock)
    want = stock.generate(image)
    compare_records(want, BlockedMaskGenerator(sam, **settings).generate(image), logits, settings)


def test_switch_patches_stock_generator(sam, image):
    """enable(): an unmodified SamAutomaticMaskGenerator gives BlockedMaskGenerator's records; disable() restores its methods."""
    settings = SETTINGS["point-grids-small-regions"]
    before = {name: SamAutomaticMaskGenerator.__dict__[name] for name in ("_process_batch", "postprocess_small_regions")}
    stock = SamAutomaticMaskGenerator(sam, **settings)
    logits = record_stock_logits(stock)
    want = stock.generate(image)
    with sam_blocked.enabled():
        assert SamAutomaticMaskGenerator.__dict__["_process_batch"] is not before["_process_batch"]
        got = SamAutomaticMaskGenerator(sam, **settings).generate(image)
    assert {name: SamAutomaticMaskGenerator.__dict__[name] for name in before} == before
    compare_records(want, got, logits, settings)


def test_switch_patches_sam_hq_generator():
    """SAM-HQ's generator under the switch: its own decoder a chunk of points at a time, the
    bounded post-processing after it: stock SAM-HQ's records; disable() restores its methods."""
    from segment_anything_hq import SamAutomaticMaskGenerator as HQGenerator

    from sam_libraries import sam_hq_sam

    sam = sam_hq_sam()
    image = data.coffee()[:150, :211]
    settings = dict(points_per_side=4, points_per_batch=5, pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0, output_mode="binary_mask")
    before = HQGenerator.__dict__["_process_batch"]
    stock = HQGenerator(sam, **settings)
    logits = record_stock_logits(stock)
    want = stock.generate(image)
    with sam_blocked.enabled(max_block_mb=1):
        got = HQGenerator(sam, **settings).generate(image)
    assert HQGenerator.__dict__["_process_batch"] is before
    assert len(want) == 16  # SAM-HQ keeps its best of the three masks a point
    compare_records(want, got, logits, settings)


@pytest.mark.slow
@pytest.mark.parametrize("img_size, max_block_mb", [(512, 16), (1024, None)])
def test_planner_counts_the_automatic_path(img_size, max_block_mb):
    """The planner's decoder figure (automatic_tensor_bytes) against the tensors a whole
    generate() holds beyond the embedding, filters at 0 (every mask post-processed), within 15%."""
    from sam_blocked.automatic.batch import automatic_tensor_bytes
    from sam_blocked.automatic.decoder import budget_bytes
    from sam_blocked.memory.measure import tensor_peak_bytes
    from sam_blocked.models.registry import build_sam

    sam = build_sam("tiny", img_size=img_size, seed=0)
    grid = img_size // 16
    embedding = torch.randn(1, 256, grid, grid)
    generator = BlockedMaskGenerator(sam, points_per_side=8, pred_iou_thresh=0, stability_score_thresh=0, max_block_mb=max_block_mb, output_mode="uncompressed_rle")
    predictor = generator.predictor

    def set_image(image, image_format="RGB"):  # the embedding installed, as the demo and bench_amg do
        predictor.reset_image()
        predictor.features, predictor.original_size, predictor.input_size, predictor.is_image_set = embedding, (img_size, img_size), (img_size, img_size), True

    predictor.set_image = set_image
    with torch.inference_mode():
        _, measured = tensor_peak_bytes(lambda: generator.generate(np.zeros((img_size, img_size, 3), np.uint8)))
    predicted = automatic_tensor_bytes(grid * grid, img_size * img_size, budget_bytes(max_block_mb))
    assert predicted == pytest.approx(measured, rel=0.15), (predicted / 2**20, measured / 2**20)


def test_run_lengths_are_shared_by_deepcopy_and_read_as_lists():
    """The counts stock's MaskData.cat deep-copies twice per batch are shared, and read as lists everywhere."""
    import copy
    import json

    from pycocotools import mask as mask_utils

    masks = torch.zeros(1, 5, 4, dtype=torch.bool)
    masks[0, 1:3, 1:3] = True
    (rle,) = mask_to_rle(masks)
    assert copy.deepcopy(rle)["counts"] is rle["counts"]
    assert rle["counts"] == [6, 2, 3, 2, 7] and json.loads(json.dumps(rle))["counts"] == [6, 2, 3, 2, 7]
    assert mask_utils.area(mask_utils.frPyObjects(rle, 5, 4)) == 4


@pytest.mark.parametrize("original", [(256, 256), (256, 171), (131, 197)])
def test_upsample_is_sams_postprocess_masks_bit_for_bit(sam, original):
    """The skipped second interpolation (same size) changes no bit of stock's logits; other sizes run stock's."""
    from sam_blocked.automatic.batch import upsample
    from segment_anything.utils.transforms import ResizeLongestSide

    input_size = ResizeLongestSide(256).get_preprocess_shape(*original, 256)
    low_res = torch.randn(1, 5, 64, 64, generator=torch.Generator().manual_seed(0)) * 20
    assert torch.equal(upsample(sam, low_res, input_size, original), sam.postprocess_masks(low_res, input_size, original))
