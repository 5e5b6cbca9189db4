"""attention.threads: a call's CPU steps shared out among threads (issue 23, a busy machine).

run_steps' contract (every item once, a slot per running step, errors raised, nesting runs
inline, the caller's autograd state carried), each worker's operators on its own thread
while the caller's settings stay, and the patched encoder on step threads against stock."""

from __future__ import annotations

import multiprocessing
import threading
import time

import pytest
import torch

from sam_blocked.attention import threads as steps
from sam_blocked.attention.threads import run_steps, step_threads, steps_on_threads

needs_openmp = pytest.mark.skipif(steps._runtime() is None, reason="this torch's CPU operators do not run through a reachable OpenMP")


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@needs_openmp
def test_every_item_runs_once_and_no_two_running_steps_share_a_slot(two_threads):
    assert step_threads("cpu") == 2
    seen, running, lock = [], set(), threading.Lock()
    clash = []

    def step(item, slot):
        with lock:
            clash.append(slot in running)
            running.add(slot)
        time.sleep(0.002)
        with lock:
            running.discard(slot)
            seen.append((item, slot, threading.current_thread().name))

    run_steps(step, range(40), step_threads("cpu"))
    assert sorted(i for i, _, _ in seen) == list(range(40))
    assert not any(clash)
    assert {s for _, s, _ in seen} <= {0, 1}
    assert all(name.startswith("sam_blocked-step-") for _, _, name in seen)


@needs_openmp
def test_a_step_runs_its_operators_on_its_own_thread_and_the_caller_keeps_its_threads(two_threads):
    omp = steps._runtime()
    inside = []

    def step(item, slot):
        torch.ones(1 << 16).sum()  # a parallel loop: torch sets a new thread's counts to its own at the first
        inside.append((omp.omp_get_max_threads(), step_threads("cpu")))
        # a step's own steps run inline, in this thread
        run_steps(lambda i, s: inside.append(("nested", threading.current_thread().name, s)), range(3), step_threads("cpu"))

    steps._workers.clear()  # new worker threads, after torch.set_num_threads(2) (two_threads)
    run_steps(step, range(4), 2)
    assert [x for x in inside if x[0] != "nested"] == [(1, 1)] * 4
    nested = [x for x in inside if x[0] == "nested"]
    assert len(nested) == 12 and all(name.startswith("sam_blocked-step-") and slot == 0 for _, name, slot in nested)
    assert omp.omp_get_max_threads() == 2 and torch.get_num_threads() == 2  # the caller's threads untouched


def test_one_thread_runs_the_steps_here_in_order():
    order = []
    with steps_on_threads(1):
        assert step_threads("cpu") == 1
        run_steps(lambda i, s: order.append((i, s, threading.current_thread())), range(5), step_threads("cpu"))
    assert order == [(i, 0, threading.current_thread()) for i in range(5)]
    assert step_threads("cuda") == 1 and step_threads(None) == 1
    with pytest.raises(ValueError, match="threads must be a whole number >= 1"):
        with steps_on_threads(0):
            pass


@needs_openmp
def test_torch_set_num_threads_1_means_no_step_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert step_threads("cpu") == 1
    finally:
        torch.set_num_threads(before)


@needs_openmp
def test_the_first_error_is_raised_and_later_steps_are_dropped(two_threads):
    ran = []

    def step(item, slot):
        if item == 3:
            raise RuntimeError("step 3 failed")
        time.sleep(0.001)
        ran.append(item)

    with pytest.raises(RuntimeError, match="step 3 failed"):
        run_steps(step, range(200), 2)
    assert len(ran) < 199
    run_steps(lambda i, s: ran.append(-1), range(4), 2)  # the workers still serve
    assert ran.count(-1) == 4


@needs_openmp
def test_the_callers_autograd_and_autocast_state_is_carried_into_the_steps(two_threads):
    made = []

    def step(item, slot):
        made.append((torch.is_grad_enabled(), torch.is_inference_mode_enabled(), torch.ones(1).is_inference()))

    with torch.inference_mode():
        run_steps(step, range(4), 2)
    with torch.no_grad():
        run_steps(step, range(4), 2)
    assert made[:4] == [(False, True, True)] * 4
    assert made[4:] == [(False, False, False)] * 4
    dtypes = []
    a = torch.ones(4, 4)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        run_steps(lambda i, s: dtypes.append((a @ a).dtype), range(4), 2)
    run_steps(lambda i, s: dtypes.append((a @ a).dtype), range(4), 2)
    assert dtypes == [torch.bfloat16] * 4 + [torch.float32] * 4


def _child_runs_steps(queue):
    out = []
    run_steps(lambda i, s: out.append(i), range(8), 2)
    queue.put(sorted(out))


@needs_openmp
def test_a_forked_child_gets_workers_of_its_own(two_threads):
    run_steps(lambda i, s: None, range(4), 2)  # the parent's workers exist
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child_runs_steps, args=(queue,))
    child.start()
    try:
        assert queue.get(timeout=60) == list(range(8))
    finally:
        child.join(60)
    assert child.exitcode == 0


@needs_openmp
def test_patched_encoder_on_step_threads_matches_stock(two_threads):
    # vit_b's first blocks (windowed and global) at 256 px with seeded weights: with 2 step
    # threads and on 1 the same to float rounding, and both stock's to the tolerance the other
    # encoder tests use (float32 sums in another order: 1e-4 relative to the output's scale).
    from sam_blocked import build_sam, patch_sam, unpatch_sam

    sam = build_sam("vit_b", img_size=256, seed=0)
    encoder = sam.image_encoder.eval()
    encoder.blocks = encoder.blocks[:3]
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        unpatch_sam(sam)
        stock = encoder(x)
        patch_sam(sam)
        threaded = encoder(x)
        with steps_on_threads(1):
            one = encoder(x)
    assert any(t.name.startswith("sam_blocked-step-") for t in threading.enumerate())
    scale = stock.abs().max().item()
    assert (threaded - one).abs().max().item() <= 1e-5 * scale, "2 step threads vs 1"
    assert (threaded - stock).abs().max().item() <= 1e-4 * scale, "2 step threads vs stock"


@needs_openmp
def test_windows_on_step_threads_leave_sdpas_kernel_flags_alone(two_threads):
    # flashbias (auto's CPU half-precision windows) limits SDPA to its fused kernels; torch's
    # sdpa_kernel does that with process-wide flags, so two window steps inside it at once
    # once left SDPA's math kernel off for the rest of the process. The flags stay as found,
    # and each step's output is the one-thread output.
    from sam_blocked.attention.flashbias import flashbias_attention

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(4, 14 * 14, 64, generator=gen).bfloat16() for _ in range(3))
    rel = torch.randn(27, 64, generator=gen).bfloat16()
    want = flashbias_attention(q, k, v, (14, 14), rel, rel)
    outs = [None] * 40

    def step(i, slot):
        outs[i] = flashbias_attention(q, k, v, (14, 14), rel, rel)

    flags = [torch.backends.cuda.math_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled()]
    run_steps(step, range(40), 2)
    assert [torch.backends.cuda.math_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled()] == flags
    assert all(torch.equal(o, want) for o in outs)
