"""set_image_size for the other libraries: transformers' SamModel (and processor), SAM-HQ; timm needs none."""

from __future__ import annotations

import pytest
import torch
from sam_libraries import SIZE, flat, pixels, sam_hq_sam, timm_vit, transformers_sam, transformers_vision

import sam_blocked
from sam_blocked.resolution import resized, set_image_size


def rel_error(out, ref) -> float:
    return ((out.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_transformers_sam_model_at_another_size_matches_stock(impl):
    model, run = transformers_sam(impl)
    original = model.vision_encoder.pos_embed.detach().clone()
    set_image_size(model, 384)  # 24 x 24 tokens: the global tables (31 rows) interpolate to 47
    assert model.vision_encoder.pos_embed.shape[1:3] == (24, 24)
    assert model.prompt_encoder.image_embedding_size == (24, 24) and model.prompt_encoder.input_image_size == 384
    assert model.get_image_wide_positional_embeddings().shape[-2:] == (24, 24)
    x = pixels(size=384)
    points = torch.tensor([[[[100.0, 300.0]]]])
    with torch.no_grad():
        ref = model(pixel_values=x, input_points=points)
        with sam_blocked.patched(model):
            out = model(pixel_values=x, input_points=points)
    assert ref.pred_masks.shape[-2:] == (96, 96)
    assert rel_error(out.pred_masks, ref.pred_masks) <= 1e-4
    set_image_size(model, SIZE)
    assert torch.equal(model.vision_encoder.pos_embed, original)
    with pytest.raises(ValueError, match="Input image size"):
        model(pixel_values=x)  # back at 256 px: transformers' own check


def test_processor_follows_the_model(photo, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from PIL import Image
    from transformers import SamImageProcessor, SamProcessor

    model, _ = transformers_sam("sdpa")
    processor = SamProcessor(image_processor=SamImageProcessor())  # 1024 px, as from_pretrained gives it
    set_image_size(model, 320, processor)
    image_processor = processor.image_processor
    assert processor.target_size == 320 and image_processor.size["longest_edge"] == 320
    assert (image_processor.pad_size["height"], image_processor.mask_pad_size["width"]) == (320, 80)
    inputs = processor(images=Image.fromarray(photo), input_points=[[[256, 256]]], return_tensors="pt")
    assert inputs["pixel_values"].shape[-2:] == (320, 320)
    with torch.no_grad(), sam_blocked.enabled():
        outputs = model(**inputs)
    masks = processor.image_processor.post_process_masks(outputs.pred_masks, inputs["original_sizes"], inputs["reshaped_input_sizes"])
    assert masks[0].shape[-2:] == photo.shape[:2]


def test_vision_model_resized_in_a_with_block():
    model, run = transformers_vision("eager")
    with resized(model, 320):
        with torch.no_grad():
            assert run(model, pixels(size=320)).shape[-2:] == (20, 20)
    assert model.vision_encoder.patch_embed.image_size == (SIZE, SIZE)


def test_sam_hq_sam_resizes_like_segment_anything():
    sam = sam_hq_sam()
    set_image_size(sam, 320)
    assert sam.image_encoder.img_size == 320 and sam.prompt_encoder.image_embedding_size == (20, 20)
    with torch.no_grad():
        ref = flat(sam.image_encoder(pixels(size=320)))
        with sam_blocked.patched(sam):
            assert rel_error(flat(sam.image_encoder(pixels(size=320))), ref) <= 1e-5


def test_timm_needs_no_resize_and_says_so():
    model, run = timm_vit()
    with pytest.raises(ValueError, match="resamples its position embedding"):
        set_image_size(model, 512)
    with torch.no_grad():  # any multiple of 16 px runs as it is, patched or not
        ref = run(model, pixels(size=320))
        with sam_blocked.patched(model):
            assert rel_error(run(model, pixels(size=320)), ref) <= 1e-5


def test_processor_refused_for_segment_anything(tiny_sam):
    with pytest.raises(ValueError, match="processor is for transformers"):
        set_image_size(tiny_sam, 512, processor=object())
