"""Backend selection, refusals, plans, and the patched model on each backend (sam_blocked.attention.dispatch, .fused).

The math of every backend against stock is in test_attention.py; this file checks what
picks and runs them.
"""

from __future__ import annotations

import pytest
import torch
from segment_anything.modeling.image_encoder import Attention

import sam_blocked
from sam_blocked.attention.blocked import plan_blocks
from sam_blocked.attention.dispatch import (
    KERNELS as ATTENTION,
    auto_order,
    BACKEND_CHOICES,
    BACKENDS,
    backend_attention,
    check_backend_name,
    choose_backend,
    not_supported_reasons,
    plan_backend,
    resolve_backend,
)
from sam_blocked.attention.flashbias import augmented_head_dim
from sam_blocked.attention.flex import FLEX_CPU_REASON
from sam_blocked.models.registry import cast_image_encoder
from sam_blocked.patch import BlockConfig

CPU_BACKENDS = [b for b in BACKENDS if not not_supported_reasons(b, "cpu", torch.float32, (64, 64), 64)]


def encode(model, seed=0):
    x = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.image_encoder(x)


def rel_error(out, ref):
    return ((out - ref).abs().max() / ref.abs().max()).item()


def test_cpu_runs_every_backend_but_flex():
    assert CPU_BACKENDS == ["blocked", "sdpa", "bands", "flashbias"]
    assert not_supported_reasons("flex", "cpu", torch.float32, (64, 64), 64) == [FLEX_CPU_REASON]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["auto", *CPU_BACKENDS])
def test_patched_tiny_sam_matches_stock(tiny_sam, backend):
    ref = encode(tiny_sam)
    with sam_blocked.patched(tiny_sam, backend=backend):
        assert {m.blocked_config.backend for m in tiny_sam.modules() if isinstance(m, Attention)} == {backend}
        err = rel_error(encode(tiny_sam), ref)
    assert err < 1e-5, f"{backend}: max error {err:.2e} of max |stock|"


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sdpa", "bands", "flashbias"])
def test_patched_bfloat16_close_to_stock(tiny_sam, backend):
    ref = encode(tiny_sam)
    cast_image_encoder(tiny_sam, torch.bfloat16)
    low = encode(tiny_sam)
    with sam_blocked.patched(tiny_sam, backend=backend):
        ours = encode(tiny_sam)
    # no worse than twice stock's own bfloat16 error against float32 stock
    assert (ours - ref).abs().max() <= 2 * (low - ref).abs().max(), backend


def test_flex_on_cpu_refused_when_called(tiny_sam):
    sam_blocked.patch_sam(tiny_sam, backend="flex")  # the device is known only at forward
    with pytest.raises(ValueError, match=r"attention backend 'flex' cannot run \d+ x \d+ tokens.*flex on the CPU.*use 'sdpa'"):
        encode(tiny_sam)


def test_default_backend_is_auto(tiny_sam):
    sam_blocked.patch_sam(tiny_sam, chunks=4)
    configs = {m.blocked_config for m in tiny_sam.modules() if isinstance(m, Attention)}
    assert configs == {BlockConfig(4, None, "auto")} == {BlockConfig(4)}


@pytest.mark.parametrize("backend", ["fast", "", None, "SDPA"])
def test_unknown_backend_refused_before_anything_changes(tiny_sam, backend):
    with pytest.raises(ValueError, match="unknown attention backend.*choose one of auto, blocked, sdpa, bands, flashbias, flex"):
        sam_blocked.patch_sam(tiny_sam, backend=backend)
    assert all(type(m) is Attention for m in tiny_sam.modules() if isinstance(m, Attention))


def test_patched_restores_previous_backend(tiny_sam):
    sam_blocked.patch_sam(tiny_sam, backend="blocked")
    with sam_blocked.patched(tiny_sam, 4, None, "flashbias"):
        assert {m.blocked_config for m in tiny_sam.modules() if isinstance(m, Attention)} == {BlockConfig(4, None, "flashbias")}
    assert {m.blocked_config for m in tiny_sam.modules() if isinstance(m, Attention)} == {BlockConfig(16, None, "blocked")}


def test_auto_rule_on_cpu():
    grids = ((14, 14), (16, 16), (1, 1), (3, 7), (64, 64), (20, 20), (37, 53), (128, 128), (5, 128))
    # float32: bands everywhere
    for grid in grids:
        assert choose_backend("cpu", torch.float32, grid, 64) == "bands", grid
    assert auto_order("cpu", (64, 64), 64) == auto_order("cpu", (14, 14), 64, torch.float32) == ("bands", "sdpa", "blocked")
    # half precision: flashbias where its augmented head dim is at most 1.5 x C (SAM's windows), else sdpa
    for dtype in (torch.bfloat16, torch.float16):
        for grid in grids[:4]:
            assert choose_backend("cpu", dtype, grid, 64) == "flashbias", grid
        for grid in grids[4:]:
            assert choose_backend("cpu", dtype, grid, 64) == "sdpa", grid
        assert choose_backend("cpu", dtype, (20, 20), 80) == "flashbias"  # vit_l / vit_h heads: 120 <= 1.5 x 80
    assert auto_order("cpu", (64, 64), 64, torch.bfloat16) == ("sdpa", "blocked")
    assert auto_order("cuda", (64, 64), 64) == ("flashbias", "sdpa", "blocked")
    assert auto_order("mps", (14, 14), 64)[-1] == "blocked"
    assert choose_backend("meta", torch.float32, (64, 64), 64) == "sdpa"
    # a budget below one token row against all keys: bands and sdpa cannot meet it, blocked can
    assert choose_backend("cpu", torch.float32, (128, 128), 64, max_block_mb=4) == "blocked"
    assert choose_backend("cpu", torch.float32, (128, 128), 64, max_block_mb=8) == "bands"
    assert choose_backend("cpu", torch.bfloat16, (128, 128), 64, max_block_mb=8) == "sdpa"
    assert resolve_backend("auto", "cpu", torch.float32, (64, 64), 64) == "bands"


def test_named_backend_that_cannot_run_says_why_and_what_to_do():
    with pytest.raises(ValueError) as error:
        resolve_backend("sdpa", "cpu", torch.float32, (128, 128), 64, max_block_mb=4)
    message = str(error.value)
    assert "'sdpa' cannot run 128 x 128 tokens, head dim 64, float32 on cpu" in message
    assert "one token row of queries against all 16384 keys (8.000 MiB as float32), over max_block_mb=4" in message
    assert "backend='auto'" in message
    q = torch.zeros(1, 128 * 128, 8)
    with pytest.raises(ValueError, match="raise max_block_mb or use backend 'blocked'"):
        plan_backend("sdpa", 1, (128, 128), 8, max_block_mb=4)
    with pytest.raises(ValueError, match="'bands' cannot run 128 x 128 tokens.*one token row of queries against all 16384 keys"):
        resolve_backend("bands", "cpu", torch.float32, (128, 128), 64, max_block_mb=4)
    with pytest.raises(ValueError, match="'flex' cannot run"):
        backend_attention("flex", q, q, q, (128, 128))


def test_check_backend_name():
    assert [check_backend_name(b) for b in BACKEND_CHOICES] == list(BACKEND_CHOICES)
    with pytest.raises(ValueError, match="unknown attention backend 'flash'"):
        check_backend_name("flash")


def test_flashbias_device_refusal():
    reasons = not_supported_reasons("flashbias", "meta", torch.float32, (64, 64), 64)
    assert reasons and "cpu and cuda only, not meta" in reasons[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_backends_refused_without_cuda():
    for backend in ("flashbias", "flex"):
        assert not_supported_reasons(backend, "cuda", torch.bfloat16, (64, 64), 64) == ["CUDA is not available on this machine"]
    assert choose_backend("cuda", torch.bfloat16, (64, 64), 64) == "sdpa"


def test_augmented_head_dim():
    assert augmented_head_dim((64, 64), 64) == 192  # vit_b at 1024 px: 64 + 64 + 64
    assert augmented_head_dim((64, 64), 80) == 208  # vit_l / vit_h
    assert augmented_head_dim((14, 14), 64) == 96  # windows: 92 padded to 96
    assert augmented_head_dim((37, 53), 16) == 112  # 106 padded


def test_bands_steps_are_sdpas():
    for args in ((12, (64, 64), 64), (300, (14, 14), 64), (2, (37, 53), 16, 16, 0.5), (1, (5, 128), 16, 64)):
        assert plan_backend("bands", *args) == plan_backend("sdpa", *args)


def test_sdpa_plan_holds_as_many_bias_elements_as_blocked():
    # 16 chunks: blocked's 4 x 4 blocks of (N/4, N/4) and sdpa's 16 bands of (N/16, N) are the same size
    for grid in ((64, 64), (128, 128)):
        sdpa, blocked = plan_backend("sdpa", 12, grid, 64), plan_blocks(12, grid)
        assert (sdpa.q_bands, sdpa.k_bands) == (16, 1)
        assert sdpa.block_bytes == blocked.block_bytes and sdpa.group == blocked.group
    assert plan_backend("sdpa", 1, (5, 128), 16, chunks=64).q_bands == 5  # clamped to one row per band
    budget = plan_backend("sdpa", 12, (64, 64), 64, max_block_mb=8)
    assert budget.block_bytes <= 8 * 2**20 and budget.q_bands == 8


def test_fused_plans_bound_the_working_set():
    plan = plan_backend("flashbias", 12, (64, 64), 64)
    assert (plan.q_bands, plan.k_bands, plan.group) == (1, 1, 1)  # one head: q', k', v' of 4096 x 192
    windows = plan_backend("flashbias", 25 * 12, (14, 14), 64)
    assert 1 < windows.group < 300 and windows.block_bytes <= 16 * 2**20
    assert plan_backend("flex", 300, (14, 14), 64, max_block_mb=1000).group == 300
    with pytest.raises(ValueError, match="max_block_mb must be > 0"):
        plan_backend("flashbias", 1, (4, 4), 16, max_block_mb=0)


def test_flex_score_mod_traces_as_one_graph():
    # The CUDA path compiles _flex_call with fullgraph=True; dynamo's "eager" backend checks
    # here that it traces without a graph break (inductor's CPU kernel is refused anyway).
    from test_attention import make_inputs, stock_attention

    from sam_blocked.attention.common import decomposed_rel_pos, rel_pos_rows
    from sam_blocked.attention.flex import _flex_call

    grid = (5, 7)
    q, k, v, rh, rw = make_inputs(grid, batch_heads=2)
    rel_h, rel_w = decomposed_rel_pos(q.view(2, 5, 7, 16), rh, rel_pos_rows(rw, 7, 0, 7), 0)
    traced = torch.compile(_flex_call, fullgraph=True, dynamic=False, backend="eager")
    out = traced(q[None], k[None], v[None], rel_h.reshape(2, 35, 5), rel_w.reshape(2, 35, 7), 7, 0.25)[0]
    ref = stock_attention(q, k, v, grid, rh, rw, 0.25)
    assert ((out - ref).abs().max() / ref.abs().max()).item() < 1e-5


def test_sdpa_with_cuda_row_padding_matches_stock(monkeypatch):
    # On CUDA each band's bias rows are padded to 16 elements and SDPA gets a strided view;
    # the same layout, forced on the CPU, must give stock's result (37 x 53 = 1961 tokens, not a multiple of 16).
    from test_attention import make_inputs, stock_attention

    from sam_blocked.attention import bands as fused

    grid = (37, 53)
    q, k, v, rh, rw = make_inputs(grid, batch_heads=3, peak=2.0)  # scores up to about |80|
    unpadded = fused.sdpa_attention(q, k, v, grid, rh, rw, scale=0.25, chunks=5)
    monkeypatch.setattr(fused, "_bias_row_alignment", lambda device: 16)
    out = fused.sdpa_attention(q, k, v, grid, rh, rw, scale=0.25, chunks=5)
    ref = stock_attention(q, k, v, grid, rh, rw, 0.25)
    assert ((out - ref).abs().max() / ref.abs().max()).item() < 1e-5
    assert torch.equal(out, unpadded)


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_plan_refuses_a_bad_budget_or_grid(backend):
    # plan_backend and the plan each kernel makes for itself when called directly check alike
    q = torch.zeros(1, 16, 16)
    with pytest.raises(ValueError, match="max_block_mb must be > 0"):
        plan_backend(backend, 1, (4, 4), 16, max_block_mb=0)
    with pytest.raises(ValueError, match="token grid must be at least 1 x 1, got 0 x 4"):
        plan_backend(backend, 1, (0, 4), 16)
    with pytest.raises(ValueError, match="max_block_mb must be > 0"):
        ATTENTION[backend](q, q, q, (4, 4), max_block_mb=-1.0)
