"""patch_sam / unpatch_sam / patched on real segment_anything modules."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from segment_anything.modeling.image_encoder import Attention, ImageEncoderViT

import sam_blocked
from sam_blocked.models.registry import build_sam
from sam_blocked.patch import BlockedAttention, BlockConfig


def attentions(model):
    return [m for m in model.modules() if isinstance(m, Attention)]


def encode(model, seed=0, size=None):
    encoder = model.image_encoder if hasattr(model, "image_encoder") else model
    size = size or encoder.img_size
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return encoder(x)


def rel_error(out, ref):
    return ((out - ref).abs().max() / ref.abs().max()).item()


def test_tiny_sam_patched_matches_stock(tiny_sam):
    ref = encode(tiny_sam)
    sam_blocked.patch_sam(tiny_sam)
    assert all(isinstance(m, BlockedAttention) for m in attentions(tiny_sam))
    assert rel_error(encode(tiny_sam), ref) < 1e-5


@pytest.mark.parametrize("settings", [dict(chunks=1), dict(chunks=5), dict(chunks=64), dict(max_block_mb=0.5)])
def test_settings_match_stock(tiny_sam, settings):
    ref = encode(tiny_sam)
    with sam_blocked.patched(tiny_sam, **settings):
        assert rel_error(encode(tiny_sam), ref) < 1e-5


def test_batch_of_two_images(tiny_sam):
    x = torch.randn(2, 3, 1024, 1024, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = tiny_sam.image_encoder(x)
        with sam_blocked.patched(tiny_sam):
            out = tiny_sam.image_encoder(x)
    assert rel_error(out, ref) < 1e-5


def test_patches_global_and_windowed_blocks(tiny_sam):
    sam_blocked.patch_sam(tiny_sam)
    windows = [blk.window_size for blk in tiny_sam.image_encoder.blocks]
    assert 0 in windows and any(w > 0 for w in windows)
    assert all(type(blk.attn) is BlockedAttention for blk in tiny_sam.image_encoder.blocks)


def test_accepts_sam_encoder_attention_and_containers(tiny_sam):
    encoder = tiny_sam.image_encoder
    attn = encoder.blocks[0].attn
    assert sam_blocked.patch_sam(attn) is attn and type(attn) is BlockedAttention
    container = torch.nn.Sequential(torch.nn.Identity(), encoder)
    assert sam_blocked.patch_sam(container, chunks=4) is container
    assert all(m.blocked_config == BlockConfig(4) for m in attentions(encoder))


def test_patching_twice_updates_settings(tiny_sam):
    sam_blocked.patch_sam(tiny_sam, chunks=16)
    sam_blocked.patch_sam(tiny_sam, max_block_mb=8)
    configs = {m.blocked_config for m in attentions(tiny_sam)}
    assert configs == {BlockConfig(16, 8.0)}
    assert all(type(m) is BlockedAttention for m in attentions(tiny_sam))


def test_state_dict_unchanged_and_loads_either_way(tiny_sam):
    before = {k: v.clone() for k, v in tiny_sam.state_dict().items()}
    params_before = [name for name, _ in tiny_sam.named_parameters()]
    sam_blocked.patch_sam(tiny_sam)
    after = tiny_sam.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [name for name, _ in tiny_sam.named_parameters()] == params_before

    # A checkpoint saved by a stock model loads into a patched one and vice versa.
    buffer = io.BytesIO()
    torch.save(before, buffer)
    other = sam_blocked.patch_sam(build_sam("tiny", seed=5))
    other.load_state_dict(torch.load(io.BytesIO(buffer.getvalue())))
    assert rel_error(encode(other), encode(tiny_sam)) == 0
    stock = build_sam("tiny", seed=7)
    stock.load_state_dict(other.state_dict())
    assert torch.equal(encode(stock), encode(sam_blocked.unpatch_sam(other)))


def test_unpatch_restores_stock_exactly(tiny_sam):
    ref = encode(tiny_sam)
    sam_blocked.patch_sam(tiny_sam)
    assert sam_blocked.is_patched(tiny_sam)
    sam_blocked.unpatch_sam(tiny_sam)
    assert all(type(m) is Attention and "blocked_config" not in m.__dict__ for m in attentions(tiny_sam))
    assert not sam_blocked.is_patched(tiny_sam)
    assert torch.equal(encode(tiny_sam), ref)


def test_context_manager_restores_on_exception(tiny_sam):
    with pytest.raises(RuntimeError, match="boom"):
        with sam_blocked.patched(tiny_sam, chunks=4):
            assert sam_blocked.is_patched(tiny_sam)
            raise RuntimeError("boom")
    assert all(type(m) is Attention for m in attentions(tiny_sam))


def test_context_manager_restores_previous_settings(tiny_sam):
    sam_blocked.patch_sam(tiny_sam, chunks=9)
    with sam_blocked.patched(tiny_sam, max_block_mb=2):
        assert {m.blocked_config for m in attentions(tiny_sam)} == {BlockConfig(16, 2.0)}
    assert {m.blocked_config for m in attentions(tiny_sam)} == {BlockConfig(9)}
    with sam_blocked.stock(tiny_sam):
        assert all(type(m) is Attention for m in attentions(tiny_sam))
    assert {m.blocked_config for m in attentions(tiny_sam)} == {BlockConfig(9)}


def test_patched_model_deepcopies_and_pickles(tiny_sam):
    sam_blocked.patch_sam(tiny_sam, chunks=4)
    ref = encode(tiny_sam)
    for clone in (copy.deepcopy(tiny_sam), pickle.loads(pickle.dumps(tiny_sam))):
        assert {m.blocked_config for m in attentions(clone)} == {BlockConfig(4)}
        assert torch.equal(encode(clone), ref)


def test_model_without_sam_attention_refused():
    with pytest.raises(ValueError, match="no SAM image-encoder attention found in Linear"):
        sam_blocked.patch_sam(torch.nn.Linear(3, 3))


def test_subclass_with_its_own_forward_refused():
    class MyAttention(Attention):
        def forward(self, x):
            return x

    with pytest.raises(ValueError, match="only patches the stock class"):
        sam_blocked.patch_sam(torch.nn.Sequential(MyAttention(16, num_heads=2)))


@pytest.mark.parametrize("settings", [dict(chunks=0), dict(chunks=1.5), dict(max_block_mb=-1), dict(max_block_mb="8")])
def test_bad_settings_refused_before_anything_changes(tiny_sam, settings):
    with pytest.raises(ValueError):
        sam_blocked.patch_sam(tiny_sam, **settings)
    assert all(type(m) is Attention for m in attentions(tiny_sam))


def test_attention_without_rel_pos():
    encoder = ImageEncoderViT(img_size=128, embed_dim=32, depth=2, num_heads=2, use_rel_pos=False, window_size=4, global_attn_indexes=(1,))
    ref = encode(encoder, size=128)
    with sam_blocked.patched(encoder):
        assert rel_error(encode(encoder, size=128), ref) < 1e-5


@pytest.mark.slow
def test_vit_b_encoder_end_to_end_1024():
    sam = build_sam("vit_b", seed=0)
    ref = encode(sam)
    sam_blocked.patch_sam(sam)
    err = rel_error(encode(sam), ref)
    assert err < 1e-4, f"vit_b at 1024 px: max error {err:.2e} of max |stock|"
