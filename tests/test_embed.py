"""The patch embedding in bands of rows (tokenwise.patch_embedding, kind EMBED), the tensors'
peak measurement (memory.tensor_peak_bytes) and the planner's count against it."""

from __future__ import annotations

import pytest
import torch
from segment_anything.modeling.image_encoder import ImageEncoderViT, PatchEmbed

import sam_blocked
from sam_blocked.memory.encoder import EncoderShape, encoder_phases
from sam_blocked.memory.measure import tensor_peak_bytes
from sam_blocked.models.registry import build_sam
from sam_blocked.patch import BlockedPatchEmbed, is_patched, patch_sam, stock, unpatch_sam
from sam_blocked.resolution import set_image_size
from sam_blocked.encoder.tokenwise import patch_embedding

MIB = 2**20


def image(height, width, batch=1, dtype=torch.float32, seed=0):
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("kernel, stride", [(16, 16), (7, 4)])
@pytest.mark.parametrize("chunk", [1, 37, 10**6])
def test_bands_equal_the_whole_convolution(kernel, stride, chunk):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 24, kernel, stride)
    x = image(203, 117, batch=2)  # sizes that are not multiples of the stride: trailing pixels unused
    with torch.no_grad():
        out = patch_embedding(x, conv, chunk)
        ref = conv(x).permute(0, 2, 3, 1)
    assert out.shape == ref.shape and out.is_contiguous()
    assert torch.equal(out, ref)  # the same kernel on fewer rows


def test_a_padded_convolution_is_refused():
    with pytest.raises(ValueError, match="padding"):
        patch_embedding(image(32, 32), torch.nn.Conv2d(3, 8, 3, 1, padding=1), 16)


def encoder(size=256, dim=48, **kwargs):
    torch.manual_seed(0)
    return ImageEncoderViT(img_size=size, embed_dim=dim, depth=1, num_heads=2, use_rel_pos=True, global_attn_indexes=(0,), **kwargs).eval()


def test_patched_embedding_is_stocks_and_unpatch_restores():
    model = encoder()
    embed = model.patch_embed
    x = image(256, 192)
    with torch.no_grad():
        ref = embed(x)
        patch_sam(model, max_block_mb=0.05)  # bands of a few rows
        assert type(embed) is BlockedPatchEmbed and is_patched(model)
        assert torch.equal(embed(x), ref)
        with stock(model):
            assert type(embed) is PatchEmbed
        embed.__class__ = PatchEmbed
        assert not is_patched(model)  # the embedding too, not only every Attention
        embed.__class__ = BlockedPatchEmbed
    x.requires_grad_(True)
    out = embed(x)  # autograd recording: stock's forward
    out.sum().backward()
    assert x.grad is not None and torch.equal(out.detach(), ref)
    unpatch_sam(model)
    assert type(embed) is PatchEmbed


def test_a_padded_patch_embed_runs_stock_when_patched():
    model = encoder(size=64)
    model.patch_embed = PatchEmbed(kernel_size=(16, 16), stride=(16, 16), padding=(2, 2), embed_dim=48).eval()
    x = image(64, 64)
    with torch.no_grad():
        ref = model.patch_embed(x)
        patch_sam(model)
        assert type(model.patch_embed) is BlockedPatchEmbed
        assert torch.equal(model.patch_embed(x), ref)


def test_switch_runs_the_embedding_in_bands(monkeypatch):
    model = encoder()
    calls = []
    monkeypatch.setattr("sam_blocked.adapters.segment_anything.patch_embedding", lambda *a: calls.append(1) or patch_embedding(*a))
    x = image(256, 256)
    with torch.no_grad():
        ref = model.patch_embed(x)
        with sam_blocked.enabled(max_block_mb=1):
            out = model.patch_embed(x)
    assert calls == [1] and torch.equal(out, ref)


def test_embedding_holds_a_band_not_the_workspace():
    # oneDNN's bfloat16 convolution of a whole 1024 px image takes a workspace beside its
    # output; in bands only the output (and a band) exists.
    model = encoder(size=1024, dim=1280).to(torch.bfloat16)
    embed = model.patch_embed
    x = image(1024, 1024, dtype=torch.bfloat16)
    output = 64 * 64 * 1280 * 2
    with torch.inference_mode():
        _, stock_peak = tensor_peak_bytes(lambda: embed(x))
        patch_sam(model, max_block_mb=32)
        _, patched_peak = tensor_peak_bytes(lambda: embed(x))
    # a band is 9 of the 64 rows (8 MiB of float32 per step on the CPU), with its own workspace
    assert patched_peak <= 1.6 * output, (
        f"patched {patched_peak / MIB:.1f} MiB for a {output / MIB:.1f} MiB output (stock {stock_peak / MIB:.1f} MiB)"
    )


def test_tensor_peak_counts_tensors_alive_at_once():
    def run():
        a = torch.empty(MIB // 4)  # 1 MiB
        b = torch.empty(MIB // 4)
        del a
        c = torch.empty(3 * MIB // 4)  # b and c: 4 MiB at once
        return c.numel() + b.numel()

    result, peak = tensor_peak_bytes(run)
    assert result == MIB and peak == 4 * MIB


@pytest.mark.slow
@pytest.mark.parametrize("dtype, size", [("float32", 256), ("float32", 512), ("float32", 1024), ("bfloat16", 1024), ("float32", 1536)])
def test_planner_counts_the_tensors_the_patched_encoder_holds(dtype, size):
    # vit_b's first three blocks (two windowed, one global) and the neck, patched under a
    # 32 MiB budget: the planner's count within 15% of the tensors alive at the peak. At
    # 256 and 512 px the windowed blocks hold the peak (the count once summed the window
    # projection, its copy and the kernel's workspace: 1.45-1.5x the tensors there).
    sam = set_image_size(build_sam("vit_b"), size)
    encoder = sam.image_encoder
    encoder.blocks = encoder.blocks[:3]
    patch_sam(sam, max_block_mb=32)
    encoder = encoder.to(getattr(torch, dtype))
    x = image(size, size, dtype=getattr(torch, dtype))
    with torch.inference_mode():
        _, measured = tensor_peak_bytes(lambda: encoder(x))
    # threads=1: the measurement runs the steps in its own thread (tensor_peak_bytes)
    phases = encoder_phases(EncoderShape.from_encoder(encoder), size, getattr(torch, dtype), "cpu", 1, 16, 32, threads=1)
    planned = max(phases.values())
    assert 0.85 <= measured / planned <= 1.15, f"measured {measured / MIB:.1f} MiB, planned {planned / MIB:.1f} MiB ({phases})"
    assert planned == sam_blocked.plan_memory("vit_b", size, dtype, max_block_mb=32, threads=1).encoder_tensor_bytes
