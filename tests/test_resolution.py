"""set_image_size: SAM at other input sizes, with stock segment_anything as the oracle."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from segment_anything import SamAutomaticMaskGenerator, SamPredictor

from sam_blocked.models.registry import build_sam
from sam_blocked.patch import is_patched, patch_sam
from sam_blocked.resolution import resample_pos_embed, resized, set_image_size

# Largest encoder-output error allowed for patched vs stock in float32, relative to max |stock|.
FP32_RTOL = 1e-4


def assert_close(out, ref, rtol, what):
    err = (out.double() - ref.double()).abs()
    scale = ref.double().abs().max().clamp_min(1e-12)
    worst = err.max().item()
    where = tuple(int(i) for i in torch.unravel_index(err.argmax(), err.shape))
    assert worst <= rtol * scale, (
        f"{what}: max abs error {worst:.3e} at {where} exceeds {rtol:.0e} x max|stock| = {rtol * scale.item():.3e}"
    )


# --- sizes everywhere ------------------------------------------------------------------


@pytest.mark.parametrize("size", [1536, 2048, 512, 16])
def test_every_size_follows(tiny_sam, size):
    keys = {k: v.shape for k, v in tiny_sam.state_dict().items()}
    windows = [(b.window_size, b.attn.rel_pos_h.shape, b.attn.rel_pos_w.shape) for b in tiny_sam.image_encoder.blocks]
    set_image_size(tiny_sam, size)
    grid = size // 16
    encoder, prompt = tiny_sam.image_encoder, tiny_sam.prompt_encoder
    assert encoder.img_size == size
    assert encoder.pos_embed.shape == (1, grid, grid, 64)
    assert prompt.image_embedding_size == (grid, grid)
    assert prompt.input_image_size == (size, size)
    assert prompt.mask_input_size == (4 * grid, 4 * grid)
    assert prompt.get_dense_pe().shape == (1, 256, grid, grid)
    # Rel-pos tables and windows are untouched (get_rel_pos interpolates global ones at run time).
    assert [(b.window_size, b.attn.rel_pos_h.shape, b.attn.rel_pos_w.shape) for b in encoder.blocks] == windows
    # Same keys; only pos_embed changes shape, and the state_dict holds the resized one.
    resized = tiny_sam.state_dict()
    assert resized.keys() == keys.keys()
    assert {k for k in keys if resized[k].shape != keys[k]} == ({"image_encoder.pos_embed"} if size != 1024 else set())
    assert resized["image_encoder.pos_embed"].shape == (1, grid, grid, 64)
    assert SamPredictor(tiny_sam).transform.target_length == size


def test_resample_is_timms_bicubic(tiny_sam):
    original = tiny_sam.image_encoder.pos_embed.detach().clone()
    set_image_size(tiny_sam, 1536)
    # timm's resample_abs_pos_embed_nhwc with its defaults, written out.
    expected = F.interpolate(original.permute(0, 3, 1, 2), size=(96, 96), mode="bicubic", antialias=True).permute(0, 2, 3, 1)
    assert torch.equal(tiny_sam.image_encoder.pos_embed.detach(), expected)
    assert resample_pos_embed(original, 64) is original


def test_patched_model_stays_patched(tiny_sam):
    patch_sam(tiny_sam, chunks=7)
    set_image_size(tiny_sam, 1536)
    assert is_patched(tiny_sam)
    assert tiny_sam.image_encoder.img_size == 1536


# --- the original embedding ------------------------------------------------------------


def test_round_trip_is_exact(tiny_sam):
    encoder = tiny_sam.image_encoder
    original = encoder.pos_embed.detach().clone()
    param = encoder.pos_embed
    for size in (1536, 2048, 512, 4096):
        set_image_size(tiny_sam, size)
    at_4096 = encoder.pos_embed.detach().clone()
    set_image_size(tiny_sam, 1024)
    assert encoder.pos_embed is param, "the Parameter object must stay the same"
    assert torch.equal(encoder.pos_embed.detach(), original), "restoring 1024 px must give the original bit for bit"
    # Every resize starts from the original: 1024 -> ... -> 4096 equals 1024 -> 4096.
    assert torch.equal(set_image_size(tiny_sam, 4096).image_encoder.pos_embed.detach(), at_4096)


def test_round_trip_in_bfloat16_after_cast(tiny_sam):
    original = tiny_sam.image_encoder.pos_embed.detach().clone()
    set_image_size(tiny_sam, 1536)
    tiny_sam.image_encoder.to(torch.bfloat16)
    set_image_size(tiny_sam, 1024)
    assert tiny_sam.image_encoder.pos_embed.dtype == torch.bfloat16
    assert torch.equal(tiny_sam.image_encoder.pos_embed.detach(), original.to(torch.bfloat16))


def test_own_state_dict_round_trip_keeps_the_original(tiny_sam):
    original = tiny_sam.image_encoder.pos_embed.detach().clone()
    set_image_size(tiny_sam, 1536)
    tiny_sam.load_state_dict(tiny_sam.state_dict())
    set_image_size(tiny_sam, 1024)
    assert torch.equal(tiny_sam.image_encoder.pos_embed.detach(), original)


def test_loaded_weights_become_the_original(tiny_sam):
    other = set_image_size(build_sam("tiny", seed=1), 1536)
    set_image_size(tiny_sam, 1536)
    tiny_sam.load_state_dict(other.state_dict())
    loaded = tiny_sam.image_encoder.pos_embed.detach().clone()
    set_image_size(tiny_sam, 1024)  # from the loaded 96 x 96 embedding, not seed 0's 64 x 64 one
    assert torch.equal(tiny_sam.image_encoder.pos_embed.detach(), resample_pos_embed(loaded, 64))
    set_image_size(tiny_sam, 1536)
    assert torch.equal(tiny_sam.image_encoder.pos_embed.detach(), loaded)


def test_context_manager_restores_on_exception(tiny_sam):
    original = tiny_sam.image_encoder.pos_embed.detach().clone()
    with pytest.raises(KeyError):
        with resized(tiny_sam, 2048) as sam:
            assert sam.prompt_encoder.input_image_size == (2048, 2048)
            raise KeyError("body failed")
    assert tiny_sam.image_encoder.img_size == 1024
    assert tiny_sam.prompt_encoder.image_embedding_size == (64, 64)
    assert torch.equal(tiny_sam.image_encoder.pos_embed.detach(), original)


def test_encoder_without_pos_embed(tiny_sam):
    tiny_sam.image_encoder.pos_embed = None  # use_abs_pos=False
    set_image_size(tiny_sam, 1536)
    assert tiny_sam.image_encoder.img_size == 1536
    assert tiny_sam.prompt_encoder.image_embedding_size == (96, 96)


# --- refusals --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size, message",
    [
        (1000, "not a multiple of the patch size 16: use 992 or 1008"),
        (8, "not a multiple of the patch size 16: use 16"),
        (0, "must be > 0"),
        (-1024, "must be > 0"),
        (1536.0, "whole number of pixels"),
        ("1536", "whole number of pixels"),
        (True, "whole number of pixels"),
        (None, "whole number of pixels"),
        ((1536, 1024), "whole number of pixels"),
    ],
)
def test_bad_sizes_refused(tiny_sam, size, message):
    with pytest.raises(ValueError, match=message):
        set_image_size(tiny_sam, size)
    assert tiny_sam.image_encoder.img_size == 1024, "a refused size must leave the model as it was"


def test_numpy_integer_accepted(tiny_sam):
    assert set_image_size(tiny_sam, np.int64(1536)).image_encoder.img_size == 1536


def test_bad_models_refused(tiny_sam):
    with pytest.raises(ValueError, match="takes a Sam of segment_anything"):
        set_image_size(tiny_sam.image_encoder, 1536)
    tiny_sam.image_encoder.img_size = 2048  # resized behind set_image_size's back
    with pytest.raises(ValueError, match="pos_embed is a 64 x 64 grid but img_size=2048 needs 128 x 128"):
        set_image_size(tiny_sam, 1536)


def test_predictor_made_before_resizing_fails_loudly(tiny_sam, photo):
    predictor = SamPredictor(tiny_sam)
    set_image_size(tiny_sam, 1536)
    with pytest.raises(AssertionError, match="long side 1536"):
        predictor.set_image(photo)


def test_cli_img_size_flag():
    from sam_blocked.cli.common import add_model_args, model_from_args

    parser = argparse.ArgumentParser()
    add_model_args(parser)
    loaded = model_from_args(parser.parse_args(["--model-type", "tiny", "--device", "cpu", "--img-size", "1536"]))
    assert loaded.sam.image_encoder.img_size == 1536
    assert loaded.sam.prompt_encoder.image_embedding_size == (96, 96)
    assert is_patched(loaded.sam)
    with pytest.raises(ValueError, match="image size 1000 is not a multiple"):
        model_from_args(parser.parse_args(["--model-type", "tiny", "--device", "cpu", "--img-size", "1000"]))


# --- end to end ------------------------------------------------------------------------


@pytest.mark.slow
def test_patched_equals_stock_at_1536(tiny_sam):
    # Stock's global block at 96 x 96 tokens: 9216^2 x 2 heads x 4 B = 680 MB per score tensor.
    set_image_size(tiny_sam, 1536)
    x = torch.randn(1, 3, 1536, 1536, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = tiny_sam.image_encoder(x)
        out = patch_sam(tiny_sam).image_encoder(x)
    assert out.shape == ref.shape == (1, 256, 96, 96)
    assert_close(out, ref, FP32_RTOL, "tiny encoder at 1536 px, patched vs stock")


@pytest.fixture(scope="module", params=[1536, 2048])
def resized_predictor(request, photo):
    """A patched tiny SAM at the param size, its predictor set on a non-square crop of the photo."""
    sam = set_image_size(patch_sam(build_sam("tiny")), request.param)
    predictor = SamPredictor(sam)
    predictor.set_image(photo[:, :384])  # (512, 384): padded on the right at every size
    return request.param, predictor


@pytest.mark.slow
def test_predictor_masks_have_the_image_shape(resized_predictor):
    size, predictor = resized_predictor
    grid = size // 16
    assert predictor.input_size == (size, size * 3 // 4)
    assert predictor.features.shape == (1, 256, grid, grid)
    masks, scores, low_res = predictor.predict(point_coords=np.array([[100, 200]]), point_labels=np.array([1]))
    assert masks.shape == (3, 512, 384) and masks.dtype == bool
    assert scores.shape == (3,)
    assert low_res.shape == (3, 4 * grid, 4 * grid)
    # Low-res logits go back in as a mask prompt (prompt_encoder.mask_input_size).
    masks, _, _ = predictor.predict(
        point_coords=np.array([[100, 200]]), point_labels=np.array([1]), mask_input=low_res[:1], multimask_output=False
    )
    assert masks.shape == (1, 512, 384)


@pytest.mark.slow
def test_batched_prompts_are_scaled_by_the_transform(resized_predictor):
    size, predictor = resized_predictor
    scale = size / 512
    boxes = torch.tensor([[10, 20, 200, 300], [0, 0, 383, 511], [50, 60, 70, 80]], dtype=torch.float)
    transformed = predictor.transform.apply_boxes_torch(boxes, (512, 384))
    assert torch.allclose(transformed, boxes * scale)
    masks, scores, low_res = predictor.predict_torch(None, None, boxes=transformed, multimask_output=True)
    assert masks.shape == (3, 3, 512, 384)
    assert scores.shape == (3, 3)
    assert low_res.shape == (3, 3, size // 4, size // 4)
    points = predictor.transform.apply_coords_torch(torch.tensor([[[100.0, 200.0]], [[383.0, 511.0]]]), (512, 384))
    assert torch.allclose(points, torch.tensor([[[100.0, 200.0]], [[383.0, 511.0]]]) * scale)
    masks, _, _ = predictor.predict_torch(points, torch.ones(2, 1, dtype=torch.int))
    assert masks.shape == (2, 3, 512, 384)


@pytest.mark.slow
@pytest.mark.parametrize("size", [1536, 2048])
def test_automatic_masks_have_the_image_shape(photo, size):
    sam = set_image_size(patch_sam(build_sam("tiny")), size)
    # Random weights: keep every mask, so there are some to check.
    generator = SamAutomaticMaskGenerator(
        sam, points_per_side=1, pred_iou_thresh=-100.0, stability_score_thresh=-100.0, box_nms_thresh=1.0
    )
    image = photo[:448]  # (448, 512)
    annotations = generator.generate(image)
    assert annotations, "no masks kept although every threshold is off"
    for ann in annotations:
        assert ann["segmentation"].shape == (448, 512)
        assert ann["crop_box"] == [0, 0, 512, 448]
