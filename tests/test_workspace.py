"""Each kernel states its own workspace (workspace_bytes beside its allocations), and the
memory planner adds up what the kernels say: attention.dispatch.WORKSPACE is the one copy."""

from __future__ import annotations

import pytest
import torch

from sam_blocked.attention.threads import steps_on_threads
from sam_blocked.attention.dispatch import BACKENDS, KERNELS, WORKSPACE, plan_backend, workspace_bytes
from sam_blocked.memory.measure import tensor_peak_bytes


def test_every_backend_states_its_workspace():
    assert set(WORKSPACE) == set(BACKENDS) == set(KERNELS)
    with pytest.raises(ValueError, match="backend must be one of"):
        workspace_bytes("auto", plan_backend("blocked", 1, (4, 4), 16), 1, (4, 4), 16, torch.float32)


@pytest.mark.parametrize("backend", ["blocked", "sdpa", "bands", "flashbias"])
def test_a_kernels_workspace_is_what_it_allocates(backend):
    # The tensors a CPU call allocates beyond q, k, v and out (torch's profiler), against the
    # kernel's own figure: within a factor 2 either way (the planner's encoder figure, a sum of
    # these and the layer's tensors, is held to 15% by test_embed; one call alone is coarser:
    # the allocator's view of a kernel's temporaries, e.g. SDPA's own, is not all counted).
    grid, bh, c = (32, 32), 4, 64
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(bh, grid[0] * grid[1], c, generator=gen) for _ in range(3))
    rel_h, rel_w = torch.randn(2 * grid[0] - 1, c, generator=gen), torch.randn(2 * grid[1] - 1, c, generator=gen)
    out = torch.empty_like(q)
    with steps_on_threads(1):  # as tensor_peak_bytes runs it: the steps one after the other in this thread
        plan = plan_backend(backend, bh, grid, c, 16, None, "cpu")
    _, measured = tensor_peak_bytes(lambda: KERNELS[backend](q, k, v, grid, rel_h, rel_w, plan=plan, out=out))
    predicted = workspace_bytes(backend, plan, bh, grid, c, torch.float32)
    assert predicted / 2 <= measured <= predicted * 2, f"{backend}: measured {measured / 2**20:.2f} MiB, workspace_bytes {predicted / 2**20:.2f} MiB"


def test_blocked_counts_the_rows_of_the_call_not_of_the_plan():
    # BlockedAttention plans for every head but projects a few at a time: the score buffer is
    # sized by the rows of the call (here 4 of a plan's group of 12), as the kernel allocates it
    grid, c = (32, 32), 64
    plan = plan_backend("blocked", 12, grid, c, max_block_mb=64.0)
    assert plan.group == 12
    q, k, v = (torch.randn(4, grid[0] * grid[1], c) for _ in range(3))
    rel = torch.randn(2 * grid[0] - 1, c)
    out = torch.empty_like(q)
    _, measured = tensor_peak_bytes(lambda: KERNELS["blocked"](q, k, v, grid, rel, rel, plan=plan, out=out))
    predicted = workspace_bytes("blocked", plan, 4, grid, c, torch.float32)
    assert predicted / 1.25 <= measured <= predicted * 1.25, f"measured {measured / 2**20:.2f} MiB, workspace_bytes {predicted / 2**20:.2f} MiB"
