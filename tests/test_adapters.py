"""Every library's SAM encoder, patched by its adapter, against that library's own stock forward.

The libraries: segment_anything, segment_anything_hq, transformers (eager and SDPA, Sam and
SamHQ), timm (fused and unfused attention, with qk_norm). Small encoders with peaked
attention (tests/sam_libraries.py): a 16 x 16 token global block and padded 7 x 7 windows.
"""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
from sam_libraries import ENCODERS, SIZE, flat, pixels, timm_vit, transformers_sam, transformers_vision
from test_attention import LargestTensor  # the probe of the attention tests

import sam_blocked
from sam_blocked import adapters

FP32_RTOL = 1e-5


def build(name: str, seed: int = 0):
    model, run = ENCODERS[name](seed=seed)
    if name == "timm-unfused":
        for m in model.modules():
            if hasattr(m, "fused_attn"):
                m.fused_attn = False
    return model, run


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


@pytest.mark.parametrize("name", ENCODERS)
def test_float32_matches_the_library_stock_forward(name):
    model, run = build(name)
    x = pixels(batch=2)
    with torch.no_grad():
        ref = flat(run(model, x))
        sam_blocked.patch_sam(model, chunks=5)  # 5 does not divide 16 rows: uneven bands
        out = flat(run(model, x))
    assert all(type(m) is p.patched for _, m, p in adapters.find(model)[0])
    err = rel_error(out, ref)
    assert err <= FP32_RTOL, f"{name}: max |patched - stock| is {err:.2e} of max |stock|"


@pytest.mark.parametrize("name", ENCODERS)
def test_bfloat16_no_worse_than_twice_the_library_error(name):
    model, run = build(name)
    x = pixels()
    with torch.no_grad():
        reference = flat(run(copy.deepcopy(model).double(), x.double()))
        half = copy.deepcopy(model).to(torch.bfloat16)
        stock_err = rel_error(flat(run(half, x.bfloat16())), reference)
        sam_blocked.patch_sam(half)
        patched_err = rel_error(flat(run(half, x.bfloat16())), reference)
    assert patched_err <= 2 * stock_err, f"{name} bfloat16: patched {patched_err:.3e}, stock {stock_err:.3e} (float64 reference)"


@pytest.mark.parametrize("name", ENCODERS)
def test_global_attention_builds_no_n_by_n_tensor(name):
    model, _ = build(name)
    global_layer = next(m for _, m in sam_blocked.patch.sam_attentions(model) if m.rel_pos_h.shape[0] == 2 * (SIZE // 16) - 1)
    grid = SIZE // 16
    n = grid * grid
    x = torch.randn(1, grid, grid, global_layer.qkv.in_features)
    with torch.no_grad(), LargestTensor() as probe:
        global_layer(x)
    assert probe.largest >= n * n, "the probe sees stock's full matrix"
    sam_blocked.patch_sam(model)
    with torch.no_grad(), LargestTensor() as probe:
        global_layer(x)
    assert probe.largest < n * n, f"{name}: a tensor of {probe.largest} elements for N = {n} tokens"


@pytest.mark.parametrize("name", ["segment_anything_hq", "transformers-sdpa", "transformers-hq-eager", "timm-qk-norm"])
def test_unpatch_restores_stock_and_patched_models_pickle(name):
    model, run = build(name)
    x = pixels()
    keys = list(model.state_dict())
    with torch.no_grad():
        ref = flat(run(model, x))
        sam_blocked.patch_sam(model, chunks=4)
        assert list(model.state_dict()) == keys
        assert sam_blocked.is_patched(model)
        patched_out = flat(run(model, x))
        for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
            assert sam_blocked.is_patched(clone)
            assert torch.equal(flat(run(clone, x)), patched_out)
        sam_blocked.unpatch_sam(model)
        assert not sam_blocked.is_patched(model)
        assert all(type(m) is p.stock and "blocked_config" not in m.__dict__ for _, m, p in adapters.find(model)[0])
        assert torch.equal(flat(run(model, x)), ref)


@pytest.mark.parametrize("hq", [False, True], ids=["SamModel", "SamHQModel"])
def test_transformers_sam_model_embeddings_and_masks(hq):
    model, _ = transformers_sam("sdpa", hq=hq)
    x = pixels()
    points = torch.tensor([[[[40.0, 60.0]], [[200.0, 100.0]]]])  # (batch, point_batch, points, 2)
    with torch.no_grad():
        ref = model(pixel_values=x, input_points=points, multimask_output=False).pred_masks
        with sam_blocked.patched(model):
            out = model(pixel_values=x, input_points=points, multimask_output=False).pred_masks
    assert rel_error(out, ref) <= 1e-4
    assert torch.equal(out > 0, ref > 0)


def test_transformers_eager_gives_weights_from_the_stock_path_with_a_warning():
    model, _ = transformers_vision("eager")
    x = pixels()
    with torch.no_grad():
        ref = model(pixel_values=x, output_attentions=True)
        sam_blocked.patch_sam(model)
        with pytest.warns(UserWarning, match="attention weights were asked for"):
            out = model(pixel_values=x, output_attentions=True)
        plain = model(pixel_values=x)
    assert len(out.attentions) == len(ref.attentions) == 2
    assert all(torch.equal(a, b) for a, b in zip(out.attentions, ref.attentions))
    assert rel_error(plain.last_hidden_state, ref.last_hidden_state) <= FP32_RTOL


def test_transformers_sdpa_returns_no_weights_like_stock():
    model, _ = transformers_vision("sdpa")
    x = pixels()
    with torch.no_grad():
        ref = model(pixel_values=x, output_attentions=True)
        sam_blocked.patch_sam(model)
        out = model(pixel_values=x, output_attentions=True)
    assert out.attentions == ref.attentions == ()
    assert rel_error(out.last_hidden_state, ref.last_hidden_state) <= FP32_RTOL


def test_timm_rope_is_refused_with_the_reason():
    model, _ = timm_vit(use_rel_pos=False, use_rope=True)
    with pytest.raises(ValueError, match="rotary position embedding"):
        sam_blocked.patch_sam(model)
    assert not any(type(m).__name__.startswith("Blocked") for m in model.modules())


def test_attention_dropout_while_training_is_refused():
    from sam_libraries import _hf_vision_config
    from transformers import SamVisionModel

    model = SamVisionModel._from_config(_hf_vision_config(attention_dropout=0.1), attn_implementation="eager")
    with pytest.raises(ValueError, match="attention dropout p=0.1 in training mode"):
        sam_blocked.patch_sam(model.train())
    sam_blocked.patch_sam(model.eval())
    model.train()
    with pytest.raises(ValueError, match="call model.eval"):
        model(pixel_values=pixels())


@pytest.mark.parametrize("name", ["segment_anything", "transformers-eager", "timm"])
def test_verify_equivalence_on_each_library(name):
    model, _ = build(name)
    report = sam_blocked.verify_equivalence(model)
    assert report.passed, str(report)
    assert report.input_size == SIZE


@pytest.mark.slow
def test_verify_equivalence_compares_sam_hq_masks_through_its_predictor():
    from sam_libraries import sam_hq_sam

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = sam_blocked.verify_equivalence(sam_hq_sam())
    assert report.passed and len(report.mask_ious) == 3, str(report)


def test_registry_knows_only_imported_libraries_and_finds_every_attention():
    model, _ = transformers_sam("eager")
    names = [name for name, _ in sam_blocked.patch.sam_attentions(model)]
    assert names == ["vision_encoder.layers.0.attn", "vision_encoder.layers.1.attn"]
    assert {p.library for p in adapters.imported_patches()} >= {"segment_anything", "transformers"}
