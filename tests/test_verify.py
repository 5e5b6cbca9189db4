"""verify_equivalence and `sam-blocked verify`."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from segment_anything.modeling.image_encoder import Attention

import sam_blocked
from sam_blocked.cli import main
from sam_blocked.verify import verify_equivalence


def test_report_on_sam_with_photo(tiny_sam, photo):
    report = verify_equivalence(tiny_sam, photo, chunks=16, points=3)
    assert report.passed, str(report)
    assert report.max_rel_error < 1e-5 and report.tolerance == 1e-4
    assert len(report.mask_ious) == 3 and min(report.mask_ious) >= 0.99
    assert report.dtype == "float32" and report.input_size == 1024
    assert "PASS" in str(report) and "mask IoU" in str(report)


def test_model_left_as_it_came(tiny_sam):
    verify_equivalence(tiny_sam, points=1)
    assert all(type(m) is Attention for m in tiny_sam.modules() if isinstance(m, Attention))
    sam_blocked.patch_sam(tiny_sam, chunks=4)
    verify_equivalence(tiny_sam, points=1, max_block_mb=2)
    assert {m.blocked_config.chunks for m in tiny_sam.modules() if isinstance(m, Attention)} == {4}


def test_encoder_only_has_no_mask_ious(tiny_sam):
    report = verify_equivalence(tiny_sam.image_encoder)
    assert report.passed and report.mask_ious == []


def test_detects_a_wrong_result(tiny_sam, monkeypatch):
    # A patched forward that is off by a little must fail the check, whatever the backend.
    from sam_blocked.attention import dispatch as backends

    for name, attend in list(backends.KERNELS.items()):
        monkeypatch.setitem(backends.KERNELS, name, lambda *a, _attend=attend, **kw: _attend(*a, **kw) * 1.01)
    report = verify_equivalence(tiny_sam, points=1)
    assert not report.passed and report.max_rel_error > 1e-3
    assert "FAIL" in str(report)


def test_bad_inputs():
    with pytest.raises(ValueError, match="verify_equivalence takes a SAM model or image encoder of segment_anything"):
        verify_equivalence(torch.nn.Linear(2, 2))
    from sam_blocked.models.registry import build_sam

    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        verify_equivalence(build_sam("tiny"), np.zeros((10, 10), np.uint8))


def test_cli_prints_report_and_exit_code(capsys, tmp_path, photo):
    from PIL import Image

    path = tmp_path / "astronaut.png"
    Image.fromarray(photo).save(path)
    assert main(["verify", "--model-type", "tiny", "--image", str(path), "--chunks", "7"]) == 0
    out = capsys.readouterr().out
    assert "random weights" in out and "PASS" in out and "chunks=7" in out and "backend auto" in out
    assert main(["verify", "--model-type", "tiny", "--backend", "blocked", "--points", "1"]) == 0
    assert "backend blocked" in capsys.readouterr().out
    assert main(["verify", "--model-type", "tiny", "--max-block-mb", "1", "--json", "--points", "1"]) == 0
    report = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert report["passed"] and report["max_block_mb"] == 1.0


def test_cli_bad_image_is_a_message_not_a_traceback(tmp_path, capsys):
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    assert main(["verify", "--model-type", "tiny", "--image", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "notes.png: not an image PIL can read" in err and "Traceback" not in err
    assert main(["verify", "--model-type", "tiny", "--image", str(tmp_path / "missing.jpg")]) == 2
    assert "missing.jpg: no such file" in capsys.readouterr().err
    assert main(["verify", "--model-type", "tiny", "--chunks", "0"]) == 2
    assert "chunks must be a whole number >= 1" in capsys.readouterr().err


@pytest.mark.slow
def test_console_script_runs():
    done = subprocess.run(
        [sys.executable, "-m", "sam_blocked", "verify", "--model-type", "tiny", "--points", "1"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    assert "PASS" in done.stdout
