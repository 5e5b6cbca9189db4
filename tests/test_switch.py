"""sam_blocked.enable / disable / enabled: every supported class at once, no model object."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from sam_libraries import flat, pixels, timm_vit, transformers_sam, transformers_vision
from segment_anything.modeling.image_encoder import Attention

import sam_blocked
from sam_blocked import adapters, switch
from sam_blocked.encoder.layer import BlockConfig
from sam_blocked.models.registry import build_sam
from sam_blocked.patch import BlockedAttention

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _switch_off():
    yield
    sam_blocked.disable()


def own_forwards():
    """Each supported class's own `forward` entry, as it is now."""
    return {p.stock: p.stock.__dict__.get("forward") for p in adapters.imported_patches()}


def encode(model, x):
    with torch.no_grad():
        return model.image_encoder(x) if hasattr(model, "image_encoder") else flat(model(pixel_values=x).values())


def test_enable_covers_models_built_before_and_after():
    x = pixels()
    before = build_sam("tiny", seed=0, img_size=256)
    ref = encode(before, x)
    sam_blocked.enable(chunks=4)
    after = build_sam("tiny", seed=0, img_size=256)
    assert sam_blocked.is_patched(before) and sam_blocked.is_patched(after)
    assert all(type(m) is Attention for m in before.modules() if isinstance(m, Attention))  # instances untouched
    for model in (before, after):
        err = ((encode(model, x) - ref).abs().max() / ref.abs().max()).item()
        assert 0 < err <= 1e-5
    assert switch.report().layers["segment_anything"] == 4
    assert "4 segment_anything attention layers" in str(switch.report())


@pytest.mark.slow
def test_disable_restores_every_class_exactly():
    transformers_vision("eager"), timm_vit()  # their modules imported, so their classes are switched too
    stock_forwards = own_forwards()
    model = build_sam("tiny", seed=0, img_size=256)
    x = pixels()
    ref = encode(model, x)
    sam_blocked.enable()
    switched = own_forwards()
    assert all(switched[cls] is not stock_forwards[cls] for cls in stock_forwards)
    sam_blocked.disable()
    assert own_forwards() == stock_forwards
    assert not sam_blocked.is_enabled() and not sam_blocked.is_patched(model)
    assert torch.equal(encode(model, x), ref)
    sam_blocked.disable()  # twice is harmless
    assert own_forwards() == stock_forwards


def test_stock_and_verify_give_true_stock_while_enabled():
    model = build_sam("tiny", seed=0, img_size=256)
    x = pixels()
    ref = encode(model, x)
    with sam_blocked.enabled():
        assert not torch.equal(encode(model, x), ref)
        with sam_blocked.stock(model):
            assert not sam_blocked.is_patched(model)
            assert torch.equal(encode(model, x), ref)
        assert sam_blocked.is_patched(model)
        report = sam_blocked.verify_equivalence(model.image_encoder)
        assert report.passed and report.max_rel_error > 0, str(report)  # a stock run was compared, not blocked twice


def test_instances_patched_by_patch_sam_keep_their_settings():
    model = sam_blocked.patch_sam(build_sam("tiny", seed=0, img_size=256), max_block_mb=2)
    with sam_blocked.enabled(chunks=9):
        assert {m.blocked_config for m in model.modules() if isinstance(m, BlockedAttention)} == {BlockConfig(16, 2.0)}
        encode(model, pixels())
        assert not switch.report().layers  # they ran through their own patched class
    assert all(type(m) is BlockedAttention for m in model.modules() if isinstance(m, Attention))


def test_enabled_restores_the_previous_settings():
    sam_blocked.enable(chunks=4)
    with sam_blocked.enabled(max_block_mb=8, backend="blocked") as config:
        assert config == BlockConfig(16, 8.0, "blocked") == switch._config
    assert switch._config == BlockConfig(4)
    with pytest.raises(RuntimeError, match="boom"):
        with sam_blocked.enabled(chunks=2):
            raise RuntimeError("boom")
    assert switch._config == BlockConfig(4)
    sam_blocked.disable()
    with sam_blocked.enabled():
        pass
    assert not sam_blocked.is_enabled()


def test_bad_settings_are_refused_before_anything_changes():
    before = own_forwards()
    with pytest.raises(ValueError, match="chunks"):
        sam_blocked.enable(chunks=0)
    with pytest.raises(ValueError, match="unknown attention backend"):
        sam_blocked.enable(backend="fast")
    assert own_forwards() == before and not sam_blocked.is_enabled()


def test_subclasses_and_uncovered_layers_run_stock():
    class Mine(Attention):  # no forward of its own, but may change what it relies on
        pass

    layer = Mine(32, num_heads=2, use_rel_pos=True, input_size=(6, 6)).eval()
    rope_model, run = timm_vit(use_rel_pos=False, use_rope=True)
    x = torch.randn(1, 6, 6, 32)
    with torch.no_grad():
        ref_layer, ref_rope = layer(x), flat(run(rope_model, pixels()))
        with sam_blocked.enabled(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert torch.equal(layer(x), ref_layer)
            assert torch.equal(flat(run(rope_model, pixels())), ref_rope)
            assert switch.report().stock_layers["timm"] == 2
    assert any("rotary position embedding" in str(w.message) for w in caught)


@pytest.mark.slow
def test_mask_generation_pipeline_under_enable(photo, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from PIL import Image
    from transformers import SamImageProcessor, pipeline

    model, _ = transformers_sam("sdpa")
    processor = SamImageProcessor(size={"longest_edge": 256}, pad_size={"height": 256, "width": 256})
    generator = pipeline("mask-generation", model=model, image_processor=processor, device="cpu")
    image = Image.fromarray(photo).resize((200, 160))
    settings = dict(points_per_batch=16, points_per_crop=4, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    ref = generator(image, **settings)
    with sam_blocked.enabled():
        out = generator(image, **settings)
        assert switch.report().layers["transformers"] == 2
    assert len(out["masks"]) == len(ref["masks"]) >= 1
    assert all((a == b).all() for a, b in zip(out["masks"], ref["masks"]))
    assert torch.allclose(torch.as_tensor(out["scores"]), torch.as_tensor(ref["scores"]), atol=1e-4)


def run_python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.slow
def test_libraries_imported_later_are_patched_on_import_and_on_reload():
    done = run_python(
        """
        import importlib, sys
        import sam_blocked
        optional = ("transformers", "timm", "segment_anything_hq")
        assert not [m for m in optional if m in sys.modules], "imported by sam_blocked"
        sam_blocked.enable()
        assert not [m for m in optional if m in sys.modules], "imported by enable()"
        from transformers import SamVisionModel
        import transformers.models.sam.modeling_sam as modeling
        import timm.models.vision_transformer_sam as timm_sam
        assert modeling.__loader__ is modeling.__spec__.loader and type(modeling.__loader__).__name__ == "SourceFileLoader"
        mark = "_sam_blocked_stock_forward"
        old = modeling.SamVisionAttention
        stock_forward = getattr(old.__dict__["forward"], mark)
        assert hasattr(timm_sam.Attention.forward, mark) and hasattr(modeling.SamVisionSdpaAttention.forward, mark)
        importlib.reload(modeling)
        assert modeling.SamVisionAttention is not old and hasattr(modeling.SamVisionAttention.forward, mark)
        sam_blocked.disable()
        assert old.__dict__["forward"] is stock_forward
        assert not hasattr(modeling.SamVisionAttention.forward, mark) and not hasattr(timm_sam.Attention.forward, mark)
        assert not [f for f in sys.meta_path if type(f).__name__ == "PostImportFinder"]
        print("ok")
        """
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def test_report_counts_what_ran_weights_asked_for_run_stock():
    model, _ = transformers_vision("eager")
    x = pixels()
    with torch.no_grad(), sam_blocked.enabled(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = model(pixel_values=x, output_attentions=True)
        assert len(out.attentions) == 2
        assert switch.report().stock_layers["transformers"] == 2
        assert switch.report().layers["transformers"] == 0 and switch.report().calls["transformers"] == 0
        model(pixel_values=x)  # no weights wanted: the same layers run blocked
        assert switch.report().layers["transformers"] == 2 and switch.report().calls["transformers"] == 2
        assert "2 transformers attention layers (2 calls) ran blocked; left stock (see the warning): 2 transformers" in str(switch.report())
    assert any("attention weights were asked for" in str(w.message) for w in caught)


def test_report_counts_a_layer_built_where_a_freed_one_was():
    x = torch.randn(1, 6, 6, 32)
    with torch.no_grad(), sam_blocked.enabled():
        for _ in range(3):  # each freed before the next is built: CPython may give it the same id()
            layer = Attention(32, num_heads=2, use_rel_pos=True, input_size=(6, 6)).eval()
            layer(x)
            layer(x)
            del layer
            gc.collect()
        assert switch.report().layers["segment_anything"] == 3
        assert switch.report().calls["segment_anything"] == 6
