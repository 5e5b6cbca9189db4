"""The token-chunked encoder Block (block.py, tokenwise.py) against stock segment_anything."""

from __future__ import annotations

import math

import pytest
import torch
from segment_anything.modeling.common import MLPBlock
from segment_anything.modeling.image_encoder import Block, ImageEncoderViT, window_partition, window_unpartition

from test_attention import LargestTensor  # the probe of the attention tests

import sam_blocked
from sam_blocked.patch import BlockedBlock, is_patched, patch_sam, patched, stock, unpatch_sam
from sam_blocked.encoder.tokenwise import (
    activate_,
    grid_parts,
    linear_residual_,
    mlp_residual_,
    window_parts,
    window_steps,
)

FP32_RTOL = 1e-5


def rel_error(out, ref):
    return ((out.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def make_block(dim=32, heads=2, window=0, grid=(9, 11), seed=0, rel_std=1.0):
    torch.manual_seed(seed)
    block = Block(dim, heads, use_rel_pos=True, window_size=window, input_size=grid).eval()
    with torch.no_grad():
        for name, p in block.named_parameters():
            if "rel_pos" in name:
                p.normal_(0, rel_std)  # peaked attention: the rel-pos terms matter
            elif p.dim() == 2:
                p.mul_(3.0)
    return block


def tokens(grid, dim=32, batch=1, seed=1, dtype=torch.float32):
    return torch.randn(batch, *grid, dim, generator=torch.Generator().manual_seed(seed)).to(dtype)


# --- the pure token-wise steps -------------------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 7, 64, 10**6])
def test_mlp_residual_is_stock_mlp_residual(chunk):
    torch.manual_seed(0)
    norm, mlp = torch.nn.LayerNorm(24), MLPBlock(24, 96)
    x = torch.randn(2, 5, 7, 24)
    with torch.no_grad():
        ref = x + mlp(norm(x))
        out = mlp_residual_(x.clone(), norm, mlp.lin1, mlp.act, mlp.lin2, chunk)
    assert torch.allclose(out, ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("chunk", [1, 5, 10**6])
def test_linear_residual_writes_into_the_heads(chunk):
    torch.manual_seed(0)
    proj = torch.nn.Linear(16, 16)
    x, o = torch.randn(3, 4, 16), torch.randn(3, 4, 16)
    with torch.no_grad():
        ref = x + proj(o)
        out = linear_residual_(x, o, proj, chunk)
    assert out.data_ptr() == o.data_ptr() and torch.allclose(out, ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_in_place_is_bitwise_stock(approximate):
    act, x = torch.nn.GELU(approximate), torch.randn(100, 37)
    assert torch.equal(activate_(act, x.clone()), act(x))
    relu = torch.nn.ReLU()
    assert torch.equal(activate_(relu, x), relu(x))  # other activations run as they are


@pytest.mark.parametrize("grid", [(14, 14), (1, 1), (13, 30), (15, 29), (28, 7)])
@pytest.mark.parametrize("per_step", [1, 2, 3, 100])
def test_window_steps_move_windows_as_window_partition(grid, per_step):
    ws, dim, batch = 7, 3, 2
    x = torch.randn(batch, *grid, dim)
    stock_windows, pad = window_partition(x, ws)  # (B * nh * nw, ws, ws, dim), zero padded
    nh, nw = math.ceil(grid[0] / ws), math.ceil(grid[1] / ws)
    stock_windows = stock_windows.view(batch, nh, nw, ws, ws, dim)
    seen = torch.zeros(grid, dtype=torch.int)
    back = torch.zeros_like(x)
    for step in window_steps(grid, ws, per_step):
        assert step.k <= per_step and step.r1 - step.r0 <= ws and step.c1 - step.c0 <= step.k * ws
        windows = torch.zeros(batch * step.k, ws, ws, dim)
        region = x[:, step.r0 : step.r1, step.c0 : step.c1]
        for window, part in zip(window_parts(windows, step, ws), grid_parts(region, step, ws)):
            window.copy_(part)
        j = step.c0 // ws
        expected = stock_windows[:, step.r0 // ws, j : j + step.k].reshape(batch * step.k, ws, ws, dim)
        assert torch.equal(windows, expected), f"grid {grid}, step {step}"
        for window, part in zip(window_parts(windows, step, ws), grid_parts(back[:, step.r0 : step.r1, step.c0 : step.c1], step, ws)):
            part.copy_(window)
        seen[step.r0 : step.r1, step.c0 : step.c1] += 1
    assert torch.equal(seen, torch.ones_like(seen)), "every token in exactly one step"
    assert torch.equal(back, window_unpartition(window_partition(x, ws)[0], ws, pad, grid))


# --- the patched Block ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "window, grid, batch, budget",
    [(0, (9, 11), 1, None), (0, (37, 53), 2, 0.05), (0, (1, 1), 1, None), (5, (9, 11), 2, None), (7, (37, 53), 1, 0.05), (4, (4, 4), 3, 0.01)],
)
def test_blocked_block_matches_stock(window, grid, batch, budget):
    block = make_block(window=window, grid=(window, window) if window else grid)
    x = tokens(grid, batch=batch)
    with torch.no_grad():
        ref = block(x)
        with patched(block, max_block_mb=budget):
            assert type(block) is BlockedBlock
            out = block(x)
    assert type(block) is Block
    err = rel_error(out, ref)
    assert err < FP32_RTOL, f"window {window}, grid {grid}, batch {batch}, budget {budget}: {err:.2e}"


def test_input_is_never_written():
    block = make_block(window=4)
    x = tokens((9, 11))
    before = x.clone()
    with torch.no_grad(), patched(block):
        y = block(x)
    assert torch.equal(x, before) and y.data_ptr() != x.data_ptr()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("window", [0, 5])
def test_half_precision_no_worse_than_twice_stock_error(dtype, window):
    grid = (12, 13)
    block = make_block(window=window, grid=(window, window) if window else grid, rel_std=0.5)
    x = tokens(grid, batch=2)
    with torch.no_grad():
        oracle = block.double()(x.double())
        low = block.to(dtype)
        stock_err = (low(x.to(dtype)).double() - oracle).abs().max().item()
        with patched(low, max_block_mb=0.01):
            out = low(x.to(dtype))
    assert out.dtype == dtype
    ours = (out.double() - oracle).abs().max().item()
    assert ours <= 2 * stock_err + 1e-6, f"{dtype}, window {window}: error {ours:.3e} vs stock's own {stock_err:.3e}"


def test_autograd_runs_stock_forward():
    # In-place token steps would overwrite what backward needs: with autograd recording the
    # patched Block and its attention run stock's forward (tests/test_autograd.py: every library).
    block = make_block(window=0)
    x = tokens((9, 11)).requires_grad_()
    ref = block(x)
    ref.sum().backward()
    grad_ref = x.grad.clone()
    x.grad = None
    with patched(block, backend="flashbias"):
        out = block(x)
        out.sum().backward()
    assert rel_error(out, ref) < FP32_RTOL and rel_error(x.grad, grad_ref) < 1e-4


@pytest.mark.parametrize("window", [0, 7])
def test_no_tensor_beyond_one_activation(window):
    # stock's MLP holds (tokens, 4 x dim) twice; the patched block nothing larger than (tokens, dim)
    grid, dim = (40, 40), 32
    block = make_block(dim=dim, heads=4, window=window, grid=(window, window) if window else grid)
    x = tokens(grid, dim=dim)
    with torch.no_grad(), patched(block, max_block_mb=0.05):
        with LargestTensor() as probe:
            block(x)
    assert probe.largest <= x.numel(), f"window {window}: largest tensor {probe.largest} > one activation {x.numel()}"
    with torch.no_grad(), LargestTensor() as probe:
        block(x)
    assert probe.largest >= 4 * x.numel()


# --- surgery -------------------------------------------------------------------------------


def test_patch_swaps_blocks_and_unpatch_restores(tiny_sam):
    state = {k: v.clone() for k, v in tiny_sam.state_dict().items()}
    patch_sam(tiny_sam)
    blocks = tiny_sam.image_encoder.blocks
    assert all(type(b) is BlockedBlock for b in blocks) and is_patched(tiny_sam)
    assert tiny_sam.state_dict().keys() == state.keys()
    with stock(tiny_sam):
        assert all(type(b) is Block for b in blocks) and not is_patched(tiny_sam)
    assert all(type(b) is BlockedBlock for b in blocks)
    blocks[0].__class__ = Block
    assert not is_patched(tiny_sam)  # every Block, not only every Attention
    unpatch_sam(tiny_sam)
    assert all(type(b) is Block for b in blocks)
    assert all(torch.equal(v, state[k]) for k, v in tiny_sam.state_dict().items())


def test_block_with_stock_attention_runs_stock(tiny_sam):
    patch_sam(tiny_sam)
    block = tiny_sam.image_encoder.blocks[0]
    unpatch_sam(block.attn)
    x = tokens((64, 64), dim=64)
    with torch.no_grad():
        out = block(x)
        block.__class__ = Block
        assert torch.equal(out, block(x))


def test_block_subclass_keeps_its_forward():
    class MyBlock(Block):
        def forward(self, x):
            return super().forward(x) * 2

    block = MyBlock(16, 2, window_size=0, use_rel_pos=True, input_size=(4, 4))
    patch_sam(block)
    assert type(block) is MyBlock and sam_blocked.is_patched(block)


@pytest.mark.slow
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, None)])
def test_encoder_at_high_resolution_matches_stock(dtype, tol):
    # A small encoder at 1280 px: an 80 x 80 grid (global blocks, several sdpa bands, many
    # token chunks) and 7 x 7 windows padded to 84 x 84, under a small budget.
    torch.manual_seed(0)
    encoder = ImageEncoderViT(img_size=1280, embed_dim=32, depth=2, num_heads=2, use_rel_pos=True, window_size=7, global_attn_indexes=(1,)).eval()
    with torch.no_grad():
        for name, p in encoder.named_parameters():
            if "rel_pos" in name:
                p.normal_(0, 0.5)
    x = torch.randn(1, 3, 1280, 1280, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        if dtype == torch.float32:
            ref = encoder(x)
            with patched(encoder, max_block_mb=0.5):
                out = encoder(x)
            assert rel_error(out, ref) < tol
        else:
            oracle = encoder.double()(x.double())
            low = encoder.to(dtype)
            stock_err = (low(x.to(dtype)).double() - oracle).abs().max().item()
            with patched(low, max_block_mb=0.5):
                ours = (low(x.to(dtype)).double() - oracle).abs().max().item()
            assert ours <= 2 * stock_err, f"bfloat16 at 1280 px: {ours:.3e} vs stock's {stock_err:.3e}"


# --- every library's encoder blocks, through patch_sam and the switch -----------------------


def _layers_of(model, kind):
    from sam_blocked import adapters

    return [m for _, m, p in adapters.find(model)[0] if p.kind == kind]


@pytest.mark.parametrize("name", ["segment_anything_hq", "transformers-sdpa", "transformers-eager", "transformers-hq-sdpa", "timm", "timm-qk-norm"])
def test_every_library_block_is_patched_and_restored(name):
    from sam_libraries import ENCODERS, flat, pixels

    from sam_blocked.adapters.base import ATTENTION, EMBED

    model, run = ENCODERS[name](seed=0)
    x = pixels()
    with torch.no_grad():
        ref = flat(run(model, x))
        blocks = [m for _, m, p in sam_blocked.adapters.find(model)[0] if p.kind not in (ATTENTION, EMBED)]
        assert len(_layers_of(model, EMBED)) == (1 if name == "segment_anything_hq" else 0)  # its PatchEmbed rides along
        assert len(blocks) == len(_layers_of(model, ATTENTION)), f"{name}: a block patch per attention"
        stock_classes = [type(b) for b in blocks]
        with patched(model, max_block_mb=0.01):  # several token chunks
            assert all(type(b) is not c and isinstance(b, c) for b, c in zip(blocks, stock_classes))
            out = flat(run(model, x))
        assert [type(b) for b in blocks] == stock_classes
        with sam_blocked.enabled(max_block_mb=0.01):
            assert sam_blocked.is_patched(model)
            switched = flat(run(model, x))
            with stock(model):
                assert torch.equal(flat(run(model, x)), ref)
    assert rel_error(out, ref) < FP32_RTOL and rel_error(switched, ref) < FP32_RTOL, name


def test_transformers_layer_holds_no_whole_hidden_layer():
    # stock's MLP holds (tokens, mlp_dim); the patched layer's MLP only a chunk of it
    from sam_libraries import transformers_vision

    model, _ = transformers_vision("sdpa")
    layer = model.vision_encoder.layers[1]  # the global one
    grid, dim = 40, layer.layer_norm1.normalized_shape[0]
    x = tokens((grid, grid), dim=dim)
    assert_no_whole_hidden_layer(model, layer, x, grid * grid * layer.mlp.lin1.out_features)


def assert_no_whole_hidden_layer(model, layer, x, mlp_numel):
    """Stock's `layer` holds a tensor of mlp_numel elements or more; patched (several token chunks), none, and the same output."""
    with torch.no_grad():
        with LargestTensor() as probe:
            ref = layer(x)
        assert probe.largest >= mlp_numel
        with patched(model, max_block_mb=0.05), LargestTensor() as probe:
            out = layer(x)
    assert probe.largest < mlp_numel and rel_error(out, ref) < FP32_RTOL


def timm_block_model(**overrides):
    from sam_libraries import timm_vit

    model, _ = timm_vit(**overrides)
    block = model.blocks[1]  # the global one
    grid, dim = 40, block.norm1.normalized_shape[0]
    return model, block, tokens((grid, grid), dim=dim), grid * grid * block.mlp.fc1.out_features


@pytest.mark.parametrize("init_values", [None, 0.5])  # 0.5: LayerScale on both halves
def test_timm_block_holds_no_whole_hidden_layer(init_values):
    model, block, x, mlp_numel = timm_block_model(init_values=init_values)
    if init_values:
        assert type(block.ls2).__name__ == "LayerScale"
        with torch.no_grad():
            block.ls2.gamma.uniform_(0.5, 2.0)  # a scale per channel, not one number
    assert_no_whole_hidden_layer(model, block, x, mlp_numel)


def test_timm_block_with_drop_path_while_training_runs_stock():
    # drop_path drops whole samples at random: not a token-wise step, so the block runs stock's forward
    model, block, x, mlp_numel = timm_block_model(drop_path_rate=0.5)
    model.train()
    for m in model.modules():
        if hasattr(m, "attn_drop"):
            m.attn_drop.p = 0.0  # attention dropout while training is refused outright
    with torch.no_grad(), patched(model, max_block_mb=0.05):
        torch.manual_seed(0)
        with LargestTensor() as probe:
            out = block(x)
        torch.manual_seed(0)
        with stock(model):
            ref = block(x)
    assert probe.largest >= mlp_numel and rel_error(out, ref) < FP32_RTOL


def test_switch_reports_blocks_as_their_attention():
    from sam_blocked import switch
    from sam_blocked.models.registry import build_sam

    model = build_sam("tiny", seed=0, img_size=256)
    try:
        sam_blocked.enable(chunks=4)
        with torch.no_grad():
            model.image_encoder(torch.randn(1, 3, 256, 256))
        assert switch.report().layers["segment_anything"] == len(model.image_encoder.blocks)
        assert switch.report().calls["segment_anything"] == len(model.image_encoder.blocks)
    finally:
        sam_blocked.disable()
