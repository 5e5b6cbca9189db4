"""`sam-blocked run`: unmodified scripts and modules, with blocked attention switched on."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
USER_SCRIPT = Path(__file__).resolve().parent / "data" / "user_sam_script.py"

# A small user script: builds segment_anything's encoder itself, prints what it computed.
SCRIPT = """
import sys
import torch
from segment_anything.modeling import ImageEncoderViT

print("argv", sys.argv[1:], __name__)
torch.manual_seed(0)
encoder = ImageEncoderViT(img_size=128, embed_dim=32, depth=2, num_heads=2, window_size=4, global_attn_indexes=(1,),
                          use_rel_pos=True, out_chans=8).eval()
with torch.no_grad():
    for blk in encoder.blocks:
        blk.attn.rel_pos_h.normal_(0, 0.5)
        blk.attn.rel_pos_w.normal_(0, 0.5)
    out = encoder(torch.randn(1, 3, 128, 128))
print(f"sum {out.double().sum().item():.4f}")
if "--fail" in sys.argv:
    raise RuntimeError("the script failed")
if "--exit" in sys.argv:
    sys.exit(int(sys.argv[-1]))
"""


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


@pytest.fixture
def script(tmp_path: Path) -> Path:
    path = tmp_path / "user_script.py"
    path.write_text(SCRIPT)
    return path


@pytest.mark.slow  # python subprocesses
def test_script_runs_blocked_with_its_own_argv_and_stdout(script):
    stock = run(str(script), "--flag", "x", cwd=script.parent)
    blocked = run("-m", "sam_blocked", "run", "--chunks", "4", str(script), "--flag", "x", cwd=script.parent)
    assert stock.returncode == blocked.returncode == 0, blocked.stderr
    assert blocked.stdout.splitlines()[0] == f"argv ['--flag', 'x'] __main__"
    stock_sum, blocked_sum = (float(p.stdout.split("sum ")[1]) for p in (stock, blocked))
    assert abs(blocked_sum - stock_sum) <= 1e-4 * abs(stock_sum)
    report = blocked.stderr.strip().splitlines()[-1]
    assert report == "sam-blocked run: blocked attention (backend auto, chunks=4): 2 segment_anything attention layers (2 calls) ran blocked"


@pytest.mark.slow  # python subprocesses
def test_exit_codes_and_exceptions_as_python_gives_them(script):
    assert run("-m", "sam_blocked", "run", str(script), "--exit", "3", cwd=script.parent).returncode == 3
    failed = run("-m", "sam_blocked", "run", str(script), "--fail", cwd=script.parent)
    plain = run(str(script), "--fail", cwd=script.parent)
    assert failed.returncode == plain.returncode == 1
    traceback = failed.stderr[failed.stderr.index("Traceback") :].splitlines()
    assert traceback[:-1] == plain.stderr[plain.stderr.index("Traceback") :].splitlines()  # then sam-blocked's line
    assert traceback[1].startswith(f'  File "{script}", line')
    assert traceback[-1].startswith("sam-blocked run: blocked attention")


@pytest.mark.slow  # python subprocesses
def test_module_and_bad_targets(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "tool.py").write_text("import sys\nprint(sys.argv[1:], __name__)\n")
    done = run("-m", "sam_blocked", "run", "--max-block-mb", "4", "-m", "pkg.tool", "--chunks", "-m", "x", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "['--chunks', '-m', 'x'] __main__\n"
    assert "(backend auto, max_block_mb=4), but no SAM image-encoder attention ran" in done.stderr
    missing = run("-m", "sam_blocked", "run", "-m", "pkg.nothing", cwd=tmp_path)
    assert missing.returncode == 2 and "no module named pkg.nothing" in missing.stderr
    assert run("-m", "sam_blocked", "run", "nothing.py", cwd=tmp_path).returncode == 2
    both = run("-m", "sam_blocked", "run", "--chunks", "4", "--max-block-mb", "2", "x.py", cwd=tmp_path)
    assert both.returncode == 2 and "not allowed with argument" in both.stderr


@pytest.fixture(scope="module")
def vit_b_checkpoint(tmp_path_factory) -> Path:
    """A vit_b checkpoint of seeded random weights (sam_blocked.models.registry), as sam_model_registry loads them."""
    import torch

    from sam_blocked.models.registry import build_sam

    path = tmp_path_factory.mktemp("weights") / "sam_vit_b_random.pth"
    torch.save(build_sam("vit_b", seed=0).state_dict(), path)
    return path


@pytest.mark.slow
def test_unmodified_registry_script_gives_stock_masks(vit_b_checkpoint, tmp_path):
    image = ROOT / "examples" / "chelsea.jpg"
    common = ["--model-type", "vit_b", "--checkpoint", str(vit_b_checkpoint), "--image", str(image)]
    stock = run(str(USER_SCRIPT), *common, "--out", str(tmp_path / "stock.npz"), cwd=tmp_path)
    blocked = run("-m", "sam_blocked", "run", str(USER_SCRIPT), *common, "--out", str(tmp_path / "blocked.npz"), cwd=tmp_path)
    assert stock.returncode == 0 and blocked.returncode == 0, blocked.stderr[-2000:]
    assert "12 segment_anything attention layers (12 calls) ran blocked" in blocked.stderr
    assert len(blocked.stdout.splitlines()) == len(stock.stdout.splitlines()) == 3  # the script's lines only
    ref, out = np.load(tmp_path / "stock.npz"), np.load(tmp_path / "blocked.npz")
    scale = np.abs(ref["embedding"]).max()
    assert np.abs(out["embedding"] - ref["embedding"]).max() <= 1e-4 * scale
    for a, b in zip(ref["masks"], out["masks"]):
        assert (a & b).sum() / max((a | b).sum(), 1) >= 0.99
    assert np.allclose(out["scores"], ref["scores"], atol=1e-3)


@pytest.mark.slow  # python subprocesses
def test_script_gets_its_own_copy_of_segment_anything(tmp_path):
    # MedSAM's repository ships its own segment_anything next to its scripts: python imports that
    # one, so sam-blocked run must too (and patch it), although sam_blocked imported the installed one.
    import shutil

    import segment_anything

    shutil.copytree(Path(segment_anything.__file__).parent, tmp_path / "segment_anything")
    script = tmp_path / "which.py"
    script.write_text(
        "import segment_anything.modeling.image_encoder as ie\n"
        "print(ie.__file__, hasattr(ie.Attention.forward, '_sam_blocked_stock_forward'))\n"
    )
    done = run("-m", "sam_blocked", "run", str(script), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(tmp_path / "segment_anything" / "modeling" / "image_encoder.py"), "True"]
