"""One BlockConfig (chunks, max_block_mb, backend) from the edges to the kernel: the planner's
figures, `sam-blocked plan`, `--tile auto` and the demo's memory panel describe the backend
that runs, not auto's."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from sam_blocked import build_sam, plan_memory
from sam_blocked.attention import dispatch
from sam_blocked.cli import main as cli_main
from sam_blocked.encoder.layer import BlockConfig
from sam_blocked.interactive import whole as interactive
from sam_blocked.memory.planner import largest_input_size, planned_encoder_bytes


def test_the_planner_follows_the_backend():
    # vit_b at 1024 px on the CPU: blocked's global layers hold a 4 x 4 score block, bands a query band against every key
    blocked, bands = (plan_memory("vit_b", 1024, backend=b) for b in ("blocked", "bands"))
    assert blocked.encoder_tensor_bytes != bands.encoder_tensor_bytes
    assert plan_memory("vit_b", 1024).encoder_tensor_bytes == bands.encoder_tensor_bytes  # auto takes bands here
    assert blocked.blocking == BlockConfig(16, None, "blocked") and blocked.as_dict()["backend"] == "blocked"
    assert largest_input_size("vit_b", 1000, points_per_batch=1, backend="blocked") != largest_input_size("vit_b", 1000, points_per_batch=1, backend="bands")
    with pytest.raises(ValueError, match="unknown attention backend 'flash'"):
        plan_memory("vit_b", 1024, backend="flash")
    with pytest.raises(ValueError, match="attention backend 'sdpa' cannot run"):  # as the patch would refuse it
        plan_memory("vit_b", 1024, max_block_mb=0.5, backend="sdpa")


def test_cli_plan_takes_the_backend(capsys):
    figures = {}
    for backend in ("blocked", "bands"):
        assert cli_main(["plan", "--model-type", "vit_b", "--img-size", "1024", "--backend", backend, "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["backend"] == backend
        figures[backend] = out["encoder_tensor_bytes"]
    assert figures["blocked"] != figures["bands"]
    assert cli_main(["plan", "--backend", "bands"]) == 0
    assert "backend bands" in capsys.readouterr().out


def test_tile_auto_plans_with_the_backend_that_runs(monkeypatch):
    from sam_blocked.cli import segment

    asked = {}

    def largest(*args, **kwargs):
        asked.update(kwargs)
        return 512

    monkeypatch.setattr(segment.planner, "largest_input_size", largest)
    args = argparse.Namespace(max_memory_mb=4000.0, dtype="float32", chunks=16, max_block_mb=None, backend="blocked", auto=False)
    loaded = argparse.Namespace(sam=build_sam("tiny", img_size=256), model_type="tiny")
    assert segment._auto_tile(args, loaded, {}) == 512
    assert asked["backend"] == "blocked"


def test_the_memory_panel_plans_the_backend_that_ran(monkeypatch):
    sam = build_sam("tiny", img_size=256)
    ran = []
    for name, kernel in list(dispatch.KERNELS.items()):
        monkeypatch.setitem(dispatch.KERNELS, name, lambda *a, _k=kernel, _n=name, **kw: ran.append(_n) or _k(*a, **kw))
    image = np.random.default_rng(0).integers(0, 255, (200, 256, 3), dtype=np.uint8)
    _, report = interactive.encode(sam, image, max_block_mb=1.0, backend="blocked")
    assert set(ran) == {"blocked"}
    planned = planned_encoder_bytes(sam.image_encoder, 16, 1.0, "blocked")
    assert (report.stock_planned_bytes, report.patched_planned_bytes) == planned
    assert planned != planned_encoder_bytes(sam.image_encoder, 16, 1.0, "auto")  # tiny at 256 px: auto's bands hold more
    assert report.blocking == "blocks <= 1 MiB, blocked"


def test_the_demo_carries_the_backend():
    pytest.importorskip("gradio", reason="the demo needs gradio: pip install 'sam-blocked[demo]'")
    from sam_blocked.cli import build_parser
    from sam_blocked.cli.demo import settings_from_args

    settings = settings_from_args(build_parser().parse_args(["demo", "--model-type", "tiny", "--device", "cpu", "--backend", "blocked"]))
    assert settings.backend == "blocked" and settings.blocking == BlockConfig(16, None, "blocked")
    assert settings.encode_key != settings_from_args(build_parser().parse_args(["demo", "--model-type", "tiny", "--device", "cpu"])).encode_key
