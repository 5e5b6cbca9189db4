"""Every attention backend against stock segment_anything's attention math (the oracle).

The equivalence tests run each backend of sam_blocked.attention.dispatch: "blocked" (the reference
pure-PyTorch blocks), "sdpa", "flashbias" and "flex". Compiled flex is refused on the CPU
(fused.FLEX_CPU_REASON), so on the CPU flex runs eagerly here: that checks its
score_mod and layout exactly, though not the fused kernel; CUDA runs the compiled one.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from segment_anything.modeling.image_encoder import add_decomposed_rel_pos, get_rel_pos
from torch.utils._python_dispatch import TorchDispatchMode

from sam_blocked.attention.blocked import blocked_attention, plan_blocks
from sam_blocked.attention.common import band_rows, chunk_bands, resize_rel_pos
from sam_blocked.attention.dispatch import BACKENDS, not_supported_reasons, plan_backend
from sam_blocked.attention.dispatch import KERNELS as ATTENTION
from sam_blocked.attention.flex import flex_attention

# Largest error allowed in float32, relative to max |stock output|.
FP32_RTOL = 1e-5


def stock_attention(q, k, v, grid, rel_h, rel_w, scale):
    """Attention.forward's core, verbatim: (B*heads, N, C) -> (B*heads, N, C)."""
    attn = (q * scale) @ k.transpose(-2, -1)
    if rel_h is not None:
        attn = add_decomposed_rel_pos(attn, q, rel_h, rel_w, grid, grid)
    return attn.softmax(dim=-1) @ v


def make_inputs(grid, batch_heads=2, head_dim=16, *, peak=1.0, table_len=None, dtype=torch.float32, seed=0):
    """q, k, v and rel-pos tables; `peak` scales q and k so scores reach about |20 peak^2|."""
    g = torch.Generator().manual_seed(seed)
    H, W = grid
    n = H * W
    q = torch.randn(batch_heads, n, head_dim, generator=g) * peak
    k = torch.randn(batch_heads, n, head_dim, generator=g) * peak
    v = torch.randn(batch_heads, n, head_dim, generator=g)
    lh, lw = table_len or (2 * H - 1, 2 * W - 1)
    rel_h = torch.randn(lh, head_dim, generator=g) * peak
    rel_w = torch.randn(lw, head_dim, generator=g) * peak
    return [t.to(dtype) for t in (q, k, v, rel_h, rel_w)]


def attend(backend, q, k, v, grid, rel_h=None, rel_w=None, **settings):
    """Run one backend; flex on the CPU runs eagerly (see the module doc)."""
    if backend == "flex" and q.device.type == "cpu":
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "flex_attention called without torch.compile")
            return flex_attention(q, k, v, grid, rel_h, rel_w, compiled=False, **settings)
    return ATTENTION[backend](q, k, v, grid, rel_h, rel_w, **settings)


def assert_close(out, ref, rtol, what):
    err = (out.double() - ref.double()).abs()
    scale = ref.double().abs().max().clamp_min(1e-12)
    worst = err.max().item()
    where = tuple(int(i) for i in torch.unravel_index(err.argmax(), err.shape))
    assert torch.isfinite(out).all(), f"{what}: non-finite output"
    assert worst <= rtol * scale, (
        f"{what}: max abs error {worst:.3e} at {where} (out {out[where].item():.6g}, stock {ref[where].item():.6g}) "
        f"exceeds {rtol:.0e} x max|stock| = {rtol * scale.item():.3e}"
    )


LARGE = pytest.param((64, 64), marks=pytest.mark.slow, id="64x64")  # SAM's global grid: seconds per case on 2 cores
GRIDS = [(37, 53), (1, 1), (5, 128), (14, 14), (3, 7), LARGE]
# chunks change the blocking of blocked, sdpa and bands only; flashbias and flex run one band.
BACKEND_CHUNKS = [(b, c) for b in ("blocked", "sdpa", "bands") for c in (1, 3, 7, 16, 64)] + [("flashbias", 16), ("flex", 16)]


@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"{g[0]}x{g[1]}")
@pytest.mark.parametrize("backend,chunks", BACKEND_CHUNKS)
def test_matches_stock_fp32(backend, grid, chunks):
    q, k, v, rh, rw = make_inputs(grid, batch_heads=3)
    scale = q.shape[-1] ** -0.5
    out = attend(backend, q, k, v, grid, rh, rw, scale=scale, chunks=chunks)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_close(out, stock_attention(q, k, v, grid, rh, rw, scale), FP32_RTOL, f"{backend}, grid {grid}, chunks {chunks}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grid", [(37, 53), LARGE, (14, 14)], ids=lambda g: f"{g[0]}x{g[1]}")
def test_peaked_attention_stays_exact_and_finite(backend, grid):
    # Tables and q/k scaled so that scores reach |80| and beyond: exp() would overflow
    # without the running max, and near-one-hot rows expose any rescaling error.
    q, k, v, rh, rw = make_inputs(grid, batch_heads=2, head_dim=64, peak=2.2)
    scale = 64**-0.5
    ref_scores = add_decomposed_rel_pos((q * scale) @ k.transpose(-2, -1), q, rh, rw, grid, grid)
    assert ref_scores.abs().max() > 80
    out = attend(backend, q, k, v, grid, rh, rw, scale=scale, chunks=16)
    assert_close(out, stock_attention(q, k, v, grid, rh, rw, scale), FP32_RTOL, f"{backend}, peaked {grid}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_rel_pos(backend):
    q, k, v, _, _ = make_inputs((9, 11))
    out = attend(backend, q, k, v, (9, 11), scale=0.3, chunks=16)
    assert_close(out, stock_attention(q, k, v, (9, 11), None, None, 0.3), FP32_RTOL, f"{backend}, no rel-pos")


@pytest.mark.parametrize("backend", BACKENDS)
def test_default_scale_is_head_dim_inverse_sqrt(backend):
    q, k, v, rh, rw = make_inputs((6, 6), head_dim=16)
    out = attend(backend, q, k, v, (6, 6), rh, rw)
    assert_close(out, stock_attention(q, k, v, (6, 6), rh, rw, 0.25), FP32_RTOL, f"{backend}, default scale")


@pytest.mark.parametrize("backend", BACKENDS)
def test_value_head_dim_may_differ(backend):
    # flashbias pads v to q's augmented width for the fused kernels; the others take it as is.
    grid = (7, 9)
    q, k, _, rh, rw = make_inputs(grid, head_dim=16)
    v = torch.randn(q.shape[0], q.shape[1], 24, generator=torch.Generator().manual_seed(1))
    out = attend(backend, q, k, v, grid, rh, rw, scale=0.25)
    assert out.shape == v.shape
    assert_close(out, stock_attention(q, k, v, grid, rh, rw, 0.25), FP32_RTOL, f"{backend}, v head dim 24")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("table_len", [(27, 27), (127, 127), (5, 40)])
def test_rel_pos_tables_are_resized_like_get_rel_pos(backend, table_len):
    # SAM's global tables are sized for 64 x 64 tokens; other grids interpolate them.
    grid = (20, 31)
    q, k, v, rh, rw = make_inputs(grid, table_len=table_len)
    out = attend(backend, q, k, v, grid, rh, rw, scale=0.25, chunks=16)
    assert_close(out, stock_attention(q, k, v, grid, rh, rw, 0.25), FP32_RTOL, f"{backend}, tables {table_len}")
    # And the resized table, indexed by offset, is get_rel_pos's exactly.
    table = resize_rel_pos(rh, grid[0])
    idx = torch.arange(grid[0])[:, None] - torch.arange(grid[0])[None, :] + grid[0] - 1
    assert torch.equal(table[idx], get_rel_pos(grid[0], grid[0], rh))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_no_worse_than_twice_stock_error(backend, dtype):
    # flash-attn's criterion: the error against a float64 oracle is at most twice the
    # error of PyTorch's own stock computation in the same dtype.
    grid = (24, 20)
    q, k, v, rh, rw = make_inputs(grid, batch_heads=4, head_dim=32, peak=1.5)
    scale = 32**-0.5
    oracle = stock_attention(*(t.double() for t in (q, k, v)), grid, rh.double(), rw.double(), scale)
    low = [t.to(dtype) for t in (q, k, v, rh, rw)]
    stock_err = (stock_attention(*low[:3], grid, *low[3:], scale).double() - oracle).abs().max().item()
    out = attend(backend, *low[:3], grid, *low[3:], scale=scale, chunks=16)
    assert out.dtype == dtype
    ours_err = (out.double() - oracle).abs().max().item()
    assert ours_err <= 2 * stock_err + 1e-6, f"{backend}, {dtype}: error {ours_err:.3e} vs stock's own {stock_err:.3e}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_rows_are_independent(backend):
    q, k, v, rh, rw = make_inputs((10, 12), batch_heads=5)
    # a budget small enough that every backend takes the rows a few at a time
    full = attend(backend, q, k, v, (10, 12), rh, rw, max_block_mb=0.1)
    for i in range(5):
        single = attend(backend, q[i : i + 1], k[i : i + 1], v[i : i + 1], (10, 12), rh, rw, max_block_mb=0.1)
        assert torch.allclose(full[i : i + 1], single, atol=1e-6), f"{backend}: row {i}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("budget_mb", [0.05, 0.5, 4.0])
def test_memory_budget_matches_stock_and_bounds_blocks(backend, budget_mb):
    grid = (40, 48)
    q, k, v, rh, rw = make_inputs(grid, batch_heads=6)
    if backend in ("sdpa", "bands") and budget_mb < 0.35:
        # their smallest query band is one token row against all keys: 48 x 1920 float32 = 0.35 MiB
        with pytest.raises(ValueError, match="smallest query band is one token row"):
            attend(backend, q, k, v, grid, rh, rw, max_block_mb=budget_mb)
        return
    plan = plan_backend(backend, 6, grid, 16, max_block_mb=budget_mb)
    if backend in ("blocked", "sdpa", "bands"):
        assert plan.block_bytes <= budget_mb * 2**20
    else:  # no score block: the budget bounds the rows per step, at least one
        assert plan.block_bytes <= budget_mb * 2**20 or plan.group == 1
    out = attend(backend, q, k, v, grid, rh, rw, scale=0.25, max_block_mb=budget_mb)
    assert_close(out, stock_attention(q, k, v, grid, rh, rw, 0.25), FP32_RTOL, f"{backend}, budget {budget_mb} MiB")


def test_budget_keeps_blocks_flat_as_grid_grows():
    sizes = [plan_blocks(16, (n, n), max_block_mb=16).block_bytes for n in (64, 96, 128, 192, 256)]
    assert max(sizes) <= 16 * 2**20
    fixed = [plan_blocks(16, (n, n), chunks=16).block_bytes for n in (64, 128, 256)]
    assert fixed[-1] > 64 * 2**20  # sixteen fixed chunks grow with the square of the tokens


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize(
    "backend",
    [*BACKENDS[:3], pytest.param("flex", marks=pytest.mark.skip(reason="compiled flex runs on CUDA only; eager flex "
                                                                     "builds the scores by design: see test_cuda_backend_memory"))],
)
def test_never_builds_an_n_by_n_tensor(backend):
    # 48 x 48: large enough that flashbias's (N, C + H + W) q' and k' are below N*N/16.
    grid = (48, 48)
    n = grid[0] * grid[1]
    q, k, v, rh, rw = make_inputs(grid, batch_heads=1, head_dim=16)
    with LargestTensor() as probe:
        attend(backend, q, k, v, grid, rh, rw, chunks=16)
    assert probe.largest <= n * n // 16, f"{backend}: largest tensor {probe.largest} elements for N = {n}"
    with LargestTensor() as probe:
        stock_attention(q, k, v, grid, rh, rw, 0.25)
    assert probe.largest >= n * n  # the probe sees stock's full matrix


def test_chunk_rule():
    assert chunk_bands(16) == (4, 4)
    assert chunk_bands(8) == (4, 2)
    assert chunk_bands(7) == (7, 1)
    assert chunk_bands(1) == (1, 1)
    # more bands than token rows: clamped to one row per band
    plan = plan_blocks(1, (5, 128), chunks=64)
    assert (plan.q_bands, plan.k_bands) == (5, 5)
    assert band_rows(37, 4) == [(0, 10), (10, 19), (19, 28), (28, 37)]


@pytest.mark.parametrize("chunks", [0, -3, 2.5, True, "16"])
def test_bad_chunks_refused(chunks):
    q, k, v, rh, rw = make_inputs((4, 4))
    with pytest.raises(ValueError, match="chunks"):
        blocked_attention(q, k, v, (4, 4), rh, rw, chunks=chunks)


def test_errors_name_the_problem():
    q, k, v, rh, rw = make_inputs((4, 4))
    with pytest.raises(ValueError, match="grid 4 x 5 has 20 tokens"):
        blocked_attention(q, k, v, (4, 5), rh, rw)
    with pytest.raises(ValueError, match="both rel_pos_h and rel_pos_w"):
        blocked_attention(q, k, v, (4, 4), rh, None)
    with pytest.raises(ValueError, match=r"\(B\*heads, H\*W, C\)"):
        blocked_attention(q[0], k[0], v[0], (4, 4), rh, rw)
    with pytest.raises(ValueError, match="below the smallest block"):
        blocked_attention(q, k, v, (4, 4), rh, rw, max_block_mb=1e-6)
    with pytest.raises(ValueError, match="max_block_mb must be > 0"):
        blocked_attention(q, k, v, (4, 4), rh, rw, max_block_mb=0)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (CI has none; run on a GPU machine)")


def skip_if_refused(backend, device, dtype, grid, head_dim):
    reasons = not_supported_reasons(backend, device, dtype, grid, head_dim)
    if reasons:
        pytest.skip(f"{backend} refuses {dtype} on this GPU: {'; '.join(reasons)}")


@needs_cuda
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_matches_stock(backend, dtype):
    grid = (37, 53)
    skip_if_refused(backend, "cuda", dtype, grid, 64)
    q, k, v, rh, rw = (t.cuda() for t in make_inputs(grid, batch_heads=4, head_dim=64, peak=1.5))
    scale = 0.125
    oracle = stock_attention(q.double(), k.double(), v.double(), grid, rh.double(), rw.double(), scale)
    low = [t.to(dtype) for t in (q, k, v, rh, rw)]
    stock_err = (stock_attention(*low[:3], grid, *low[3:], scale).double() - oracle).abs().max().item()
    ours_err = (attend(backend, *low[:3], grid, *low[3:], scale=scale).double() - oracle).abs().max().item()
    assert ours_err <= 2 * stock_err + 1e-6, f"{backend}, {dtype}: error {ours_err:.3e} vs stock's own {stock_err:.3e}"


@needs_cuda
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_backend_memory(backend, dtype):
    # The allocator's peak during the call stays far below one (N, N) float32 matrix.
    grid = (64, 64)
    n = grid[0] * grid[1]
    skip_if_refused(backend, "cuda", dtype, grid, 64)
    q, k, v, rh, rw = (t.cuda().to(dtype) for t in make_inputs(grid, batch_heads=2, head_dim=64))
    attend(backend, q, k, v, grid, rh, rw)  # warm-up: compiles flex, loads kernels
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    attend(backend, q, k, v, grid, rh, rw)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    assert extra <= n * n * 4 // 4, f"{backend}, {dtype}: extra peak {extra / 2**20:.1f} MiB for N = {n}"
