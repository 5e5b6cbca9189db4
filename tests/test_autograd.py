"""Autograd through patched models: every patched layer runs its stock forward while autograd
records (the blocked steps write buffers in place, which backward cannot differentiate), so
outputs and gradients equal stock's exactly, with one warning; under no_grad the blocked
path runs as before."""

from __future__ import annotations

import warnings

import pytest
import torch
from sam_libraries import ENCODERS, flat, pixels

import sam_blocked
from sam_blocked import adapters, switch
from sam_blocked.adapters import base


def build(name: str):
    model, run = ENCODERS[name](seed=0)
    return model.train(False), run


def forward_backward(model, run, x):
    model.zero_grad(set_to_none=True)
    out = flat(run(model, x))
    out.square().sum().backward()  # a loss whose gradient depends on every output
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(got, ref):
    out, grads = got
    ref_out, ref_grads = ref
    assert torch.equal(out, ref_out)
    assert grads.keys() == ref_grads.keys() and len(grads) > 0
    for name, grad in grads.items():
        assert torch.equal(grad, ref_grads[name]), name


@pytest.fixture(autouse=True)
def _fresh_warning():
    base._warned.discard("autograd")
    yield
    base._warned.discard("autograd")


@pytest.mark.parametrize("name", ENCODERS)
def test_patched_model_trains_like_stock(name):
    model, run = build(name)
    x = pixels()
    ref = forward_backward(model, run, x)
    sam_blocked.patch_sam(model, backend="blocked" if name.startswith("timm") else "auto")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = forward_backward(model, run, x)
    assert_same(got, ref)
    assert sum("autograd is recording" in str(w.message) for w in caught) == 1
    assert all(type(m) is p.patched for _, m, p in adapters.find(model)[0])  # still patched: under no_grad it blocks


@pytest.mark.parametrize("backend", ["blocked", "sdpa", "bands", "flashbias"])
def test_every_backend_gives_stock_gradients(backend):
    model, run = build("segment_anything")
    x = pixels().requires_grad_()  # the input's gradient too, as for an adversarial or saliency map
    ref = forward_backward(model, run, x)
    ref_x = x.grad.clone()
    x.grad = None
    sam_blocked.patch_sam(model, backend=backend, max_block_mb=0.05)
    with pytest.warns(UserWarning, match="torch.no_grad"):
        got = forward_backward(model, run, x)
    assert_same(got, ref)
    assert torch.equal(x.grad, ref_x)


def test_the_switch_gives_stock_gradients_and_blocks_under_no_grad():
    model, run = build("segment_anything")
    x = pixels()
    ref = forward_backward(model, run, x)
    with torch.no_grad():
        ref_eval = flat(run(model, x))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with sam_blocked.enabled(max_block_mb=0.05):
            got = forward_backward(model, run, x)
            trained = sum(switch.report().calls.values())
            with torch.no_grad():
                out = flat(run(model, x))
            inferred = sum(switch.report().calls.values())
    assert_same(got, ref)
    assert (out - ref_eval).abs().max() <= 1e-5 * ref_eval.abs().max()
    assert trained == 0 and inferred > 0  # only the no_grad call ran blocked


def test_frozen_encoder_under_grad_mode_still_blocks():
    # Fine-tuning only the decoder: the encoder's parameters are frozen and its input needs no
    # grad, so autograd records nothing there and the blocked path runs, without a warning.
    model, run = build("segment_anything")
    model.requires_grad_(False)
    x = pixels()
    with torch.no_grad():
        ref = flat(run(model, x))
    sam_blocked.patch_sam(model, max_block_mb=0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = flat(run(model, x))
    assert not out.requires_grad
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()
