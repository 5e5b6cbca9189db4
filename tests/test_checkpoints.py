"""Checkpoints: the manifest, downloads from a local HTTP server, detection, loading, errors."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from sam_blocked.models import checkpoints
from sam_blocked.models.checkpoints import (
    CHECKPOINTS,
    WEIGHTS_ENV,
    CheckpointInfo,
    checkpoint_status,
    detect_model_type,
    download_checkpoint,
    find_checkpoint,
    load_sam,
)
from sam_blocked.cli import main as cli_main
from sam_blocked.models.registry import build_sam

REPO = Path(__file__).resolve().parent.parent
PAYLOAD = bytes(range(256)) * 4000 + b"tail"  # 1,024,004 bytes: a few read chunks


@pytest.fixture(autouse=True)
def _isolated_weights(tmp_path_factory, monkeypatch):
    """No test sees the developer's real weights folder or $SAM_BLOCKED_WEIGHTS."""
    default = tmp_path_factory.mktemp("default_weights")
    monkeypatch.setattr(checkpoints, "default_weights_dir", lambda: default)
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    return default


class _Handler(BaseHTTPRequestHandler):
    """Serves `files` by path, honours `Range: bytes=N-` unless `ignore_range`, logs what it sent."""

    files: dict[str, bytes] = {}
    log: list[dict] = []
    ignore_range = False
    cut_after: int | None = None  # send only this many bytes of the body once, then hang up

    def do_GET(self):
        data = self.files.get(self.path)
        entry = {"path": self.path, "range": self.headers.get("Range"), "sent": 0}
        self.log.append(entry)
        if data is None:
            self.send_error(404, "Not Found")
            return
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if match and not self.ignore_range:
            start = int(match.group(1))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.cut_after is not None:
            body, type(self).cut_after = body[: self.cut_after], None
            self.close_connection = True
        entry["sent"] = len(body)  # before the write: the client may have it all before write() returns here
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    handler = type("Handler", (_Handler,), {"files": {"/sam_test.pth": PAYLOAD}, "log": [], "ignore_range": False, "cut_after": None})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", handler
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def _entry(base_url: str, **change) -> CheckpointInfo:
    info = CheckpointInfo("vit_test", "sam_test.pth", f"{base_url}/sam_test.pth", len(PAYLOAD), hashlib.sha256(PAYLOAD).hexdigest())
    return dataclasses.replace(info, **change)


# ---------------------------------------------------------------------------- manifest


def test_manifest_json_matches_the_package_dict():
    on_disk = json.loads((REPO / "weights" / "checkpoints.json").read_text())
    in_package = {k: {f: v for f, v in dataclasses.asdict(c).items() if f != "model_type"} for k, c in CHECKPOINTS.items()}
    assert on_disk == in_package
    assert all(k == c.model_type and c.url.endswith("/segment_anything/" + c.file) for k, c in CHECKPOINTS.items())
    assert CHECKPOINTS["vit_h"].size == 2_564_550_879


def test_checkpoint_files_are_git_ignored():
    ignore = (REPO / ".gitignore").read_text().split()
    assert "*.pth" in ignore and "*.part" in ignore


# ---------------------------------------------------------------------------- download


def test_download_success(server, tmp_path):
    base, handler = server
    path = download_checkpoint(_entry(base), tmp_path / "w", progress=False)
    assert path == tmp_path / "w" / "sam_test.pth"
    assert path.read_bytes() == PAYLOAD
    assert not (tmp_path / "w" / "sam_test.pth.part").exists()
    assert [e["range"] for e in handler.log] == [None]


def test_download_resumes_a_partial_file(server, tmp_path):
    base, handler = server
    done = 300_001
    (tmp_path / "sam_test.pth.part").write_bytes(PAYLOAD[:done])
    path = download_checkpoint(_entry(base), tmp_path, progress=False)
    assert path.read_bytes() == PAYLOAD
    assert handler.log == [{"path": "/sam_test.pth", "range": f"bytes={done}-", "sent": len(PAYLOAD) - done}]


def test_download_interrupted_then_resumed(server, tmp_path):
    base, handler = server
    handler.cut_after = 400_000
    with pytest.raises(ConnectionError, match=r"download of .* stopped at 400,000 of 1,024,004 bytes.*sam_test\.pth\.part is kept, rerun the same command to resume"):
        download_checkpoint(_entry(base), tmp_path, progress=False)
    assert (tmp_path / "sam_test.pth.part").stat().st_size == 400_000
    assert download_checkpoint(_entry(base), tmp_path, progress=False).read_bytes() == PAYLOAD
    assert [(e["range"], e["sent"]) for e in handler.log] == [(None, 400_000), ("bytes=400000-", len(PAYLOAD) - 400_000)]


def test_download_restarts_when_the_server_ignores_range(server, tmp_path):
    base, handler = server
    handler.ignore_range = True
    (tmp_path / "sam_test.pth.part").write_bytes(b"x" * 1000)  # garbage that must not survive
    path = download_checkpoint(_entry(base), tmp_path, progress=False)
    assert path.read_bytes() == PAYLOAD
    assert handler.log[0]["sent"] == len(PAYLOAD)


def test_download_checksum_mismatch_installs_nothing(server, tmp_path):
    base, _ = server
    with pytest.raises(ValueError, match=r"sha256 of the downloaded sam_test\.pth is [0-9a-f]{64}, the manifest expects 0{64}: nothing was installed"):
        download_checkpoint(_entry(base, sha256="0" * 64), tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_download_size_mismatch_is_refused_before_downloading(server, tmp_path):
    base, _ = server
    with pytest.raises(ValueError, match=r"serves 1,024,004 bytes, the manifest expects 1,000 for sam_test\.pth: wrong address or mirror"):
        download_checkpoint(_entry(base, size=1000), tmp_path, progress=False)
    assert not (tmp_path / "sam_test.pth").exists()


def test_download_404(server, tmp_path):
    base, _ = server
    with pytest.raises(ConnectionError, match=r"download of http://127\.0\.0\.1:\d+/nothing\.pth failed: HTTP 404 Not Found; check the address"):
        download_checkpoint(_entry(base), tmp_path, url=f"{base}/nothing.pth", progress=False)
    assert not (tmp_path / "sam_test.pth").exists()


def test_download_connection_refused_keeps_the_partial_file(tmp_path):
    with socket.socket() as sock:  # bound, never listening: connections are refused
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/sam_test.pth"
        (tmp_path / "sam_test.pth.part").write_bytes(PAYLOAD[:10])
        with pytest.raises(ConnectionError, match=r"could not reach .*Connection refused.*sam_test\.pth\.part is kept, rerun"):
            download_checkpoint(_entry("unused", url=url), tmp_path, progress=False)
    assert (tmp_path / "sam_test.pth.part").read_bytes() == PAYLOAD[:10]


def test_download_keeps_a_verified_file_without_asking_the_server(server, tmp_path):
    base, handler = server
    (tmp_path / "sam_test.pth").write_bytes(PAYLOAD)
    assert download_checkpoint(_entry(base), tmp_path, progress=False) == tmp_path / "sam_test.pth"
    assert handler.log == []
    (tmp_path / "sam_test.pth").write_bytes(PAYLOAD[:-1] + b"X")
    with pytest.raises(ValueError, match=r"exists but is not the official sam_test\.pth .*: delete it and rerun"):
        download_checkpoint(_entry(base), tmp_path, progress=False)


def test_checkpoint_status_states(tmp_path):
    info = _entry("unused")
    assert checkpoint_status(info, tmp_path).state == "missing"
    (tmp_path / "sam_test.pth.part").write_bytes(PAYLOAD[:5])
    assert (checkpoint_status(info, tmp_path).state, checkpoint_status(info, tmp_path).size) == ("partial", 5)
    (tmp_path / "sam_test.pth").write_bytes(PAYLOAD)
    assert checkpoint_status(info, tmp_path).state == "present"
    assert checkpoint_status(info, tmp_path, verify=True).state == "verified"
    (tmp_path / "sam_test.pth").write_bytes(PAYLOAD[:-1] + b"X")
    assert checkpoint_status(info, tmp_path, verify=True).state == "wrong sha256"
    (tmp_path / "sam_test.pth").write_bytes(b"short")
    assert checkpoint_status(info, tmp_path).state == "wrong size"


def test_cli_weights_list(tmp_path, capsys):
    (tmp_path / "sam_vit_l_0b3195.pth.part").write_bytes(b"12345")
    assert cli_main(["weights", "list", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"vit_b  missing    sam_vit_b_01ec64.pth: `sam-blocked weights download vit_b --dir {tmp_path}`" in out
    assert "vit_l  partial" in out and "(5 of 1,249,524,607 bytes): resume with `sam-blocked weights download vit_l" in out
    (tmp_path / "sam_vit_h_4b8939.pth").write_bytes(b"not it")
    assert cli_main(["weights", "list", "--dir", str(tmp_path)]) == 1
    assert "vit_h  wrong size" in capsys.readouterr().out


def test_cli_weights_download_errors(server, tmp_path, capsys):
    base, _ = server
    # The local server's file is not vit_b: refused on its size, nothing written.
    assert cli_main(["weights", "download", "vit_b", "--dir", str(tmp_path), "--url", f"{base}/sam_test.pth"]) == 2
    assert "error: http://127.0.0.1" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    assert cli_main(["weights", "download", "vit_b", "--dir", str(tmp_path), "--url", f"{base}/missing"]) == 2
    assert "HTTP 404 Not Found" in capsys.readouterr().err


# ---------------------------------------------------------------------------- find


def test_find_checkpoint_places_and_order(tmp_path, monkeypatch, _isolated_weights):
    assert find_checkpoint("vit_b") is None
    assert find_checkpoint("tiny") is None
    default_b = _isolated_weights / "sam_vit_b_01ec64.pth"
    default_b.write_bytes(b"")
    assert find_checkpoint("vit_b") == default_b
    assert find_checkpoint("auto") == default_b
    assert find_checkpoint("vit_h") is None

    env_dir = tmp_path / "env"
    env_dir.mkdir()
    (env_dir / "sam_vit_h_4b8939.pth").write_bytes(b"")
    monkeypatch.setenv(WEIGHTS_ENV, str(env_dir))
    assert find_checkpoint("vit_h") == env_dir / "sam_vit_h_4b8939.pth"
    assert find_checkpoint("default") == env_dir / "sam_vit_h_4b8939.pth"
    assert find_checkpoint("auto") == env_dir / "sam_vit_h_4b8939.pth"  # the env folder comes first
    assert find_checkpoint("vit_b") == default_b

    explicit = tmp_path / "explicit"
    explicit.mkdir()
    (explicit / "sam_vit_h_4b8939.pth").write_bytes(b"")
    assert find_checkpoint("vit_h", explicit) == explicit / "sam_vit_h_4b8939.pth"

    env_file = tmp_path / "my_sam.pth"
    env_file.write_bytes(b"")
    monkeypatch.setenv(WEIGHTS_ENV, str(env_file))
    assert find_checkpoint("vit_l") == env_file


def test_find_checkpoint_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"unknown model type 'vit_x': choose one of auto, default, vit_b, vit_l, vit_h, tiny"):
        find_checkpoint("vit_x")
    with pytest.raises(FileNotFoundError, match=r"weights folder .*nowhere does not exist"):
        find_checkpoint("vit_b", tmp_path / "nowhere")
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path / "gone.pth"))
    with pytest.raises(FileNotFoundError, match=rf"{WEIGHTS_ENV}=.*gone\.pth names no existing file or folder: .*or unset it"):
        find_checkpoint("vit_b")


# ---------------------------------------------------------------------------- detect


@pytest.mark.parametrize("model_type", ["vit_b", "vit_l", "vit_h", "tiny"])
def test_detect_model_type_from_builder_shapes(model_type):
    with torch.device("meta"):  # shapes without memory: vit_h would be 2.5 GB of float32
        state_dict = build_sam(model_type, seed=None).state_dict()
    assert state_dict["image_encoder.patch_embed.proj.weight"].is_meta
    assert detect_model_type(state_dict) == model_type


def test_detect_model_type_refuses_other_state_dicts():
    resnet_like = {"conv1.weight": torch.zeros(64, 3, 7, 7), "bn1.weight": torch.zeros(64), "fc.weight": torch.zeros(10, 512)}
    with pytest.raises(ValueError, match=r"not a segment-anything SAM state_dict: .*\(its first keys: conv1\.weight, bn1\.weight, fc\.weight\)"):
        detect_model_type(resnet_like)
    with pytest.raises(ValueError, match=r"\(it is empty\)"):
        detect_model_type({})
    with torch.device("meta"):
        state_dict = build_sam("vit_b", seed=None).state_dict()
    del state_dict["image_encoder.blocks.11.attn.qkv.weight"]
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith("image_encoder.blocks.11.")}
    with pytest.raises(ValueError, match=r"embed dim 768 with 11 blocks is no SAM architecture known here: vit_b \(768, 12 blocks\)"):
        detect_model_type(state_dict)


# ---------------------------------------------------------------------------- load


@pytest.fixture
def tiny_file(tiny_sam, tmp_path) -> Path:
    path = tmp_path / "tiny.pth"
    torch.save(tiny_sam.state_dict(), path)
    return path


def _assert_same_weights(sam, reference):
    expected = reference.state_dict()
    got = sam.state_dict()
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    assert torch.equal(sam.pixel_mean, reference.pixel_mean) and torch.equal(sam.pixel_std, reference.pixel_std)


def test_load_sam_round_trip(tiny_sam, tiny_file):
    sam = load_sam("auto", tiny_file)
    assert sam.model_type == "tiny" and not sam.training
    _assert_same_weights(sam, tiny_sam)
    assert load_sam("tiny", str(tiny_file)).model_type == "tiny"


def test_load_sam_unwraps_model_and_module_prefix(tiny_sam, tmp_path):
    state_dict = tiny_sam.state_dict()
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"model": {f"module.{k}": v for k, v in state_dict.items()}}, wrapped)
    _assert_same_weights(load_sam("auto", wrapped), tiny_sam)


def test_load_sam_dtype_and_search(tiny_sam, tiny_file, monkeypatch):
    monkeypatch.setenv(WEIGHTS_ENV, str(tiny_file))
    sam = load_sam("auto", dtype=torch.bfloat16)  # found through the environment variable
    assert sam.image_encoder.patch_embed.proj.weight.dtype == torch.bfloat16
    assert sam.mask_decoder.iou_token.weight.dtype == torch.float32


def test_load_sam_missing_files(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"checkpoint .*nope\.pth does not exist: check the path, or get the official one with `sam-blocked weights download vit_b`"):
        load_sam("auto", tmp_path / "nope.pth")
    with pytest.raises(FileNotFoundError, match=r"no vit_l checkpoint found \(looked for sam_vit_l_0b3195\.pth in .*default_weights\d*\): download it with `sam-blocked weights download vit_l`, set SAM_BLOCKED_WEIGHTS"):
        load_sam("vit_l")
    with pytest.raises(FileNotFoundError, match=r"no vit_h checkpoint under its official name in .*: pass the file itself, or run `sam-blocked weights download vit_h` --dir"):
        load_sam("vit_h", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"'tiny' has no official checkpoint"):
        load_sam("tiny")


def test_load_sam_corrupt_files(tiny_file, tmp_path):
    data = tiny_file.read_bytes()
    truncated = tmp_path / "sam_vit_b_01ec64.pth"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"sam_vit_b_01ec64\.pth is not a readable PyTorch checkpoint \([\d,]+ bytes; the official file has 375,042,383\): .*corrupt or truncated: delete it and download it again \(`sam-blocked weights download vit_b`\)"):
        load_sam("auto", truncated)
    for name, content in [("empty.pth", b""), ("text.pth", b"hello, not a checkpoint\n" * 10)]:
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=rf"{name} is not a readable PyTorch checkpoint \([\d,]+ bytes\): .*corrupt or truncated"):
            load_sam("auto", tmp_path / name)


def test_load_sam_refuses_a_pickled_model(tiny_sam, tmp_path):
    whole = tmp_path / "whole.pth"
    torch.save(tiny_sam, whole)
    with pytest.raises(ValueError, match=r"holds a pickled Python object \(segment_anything\.modeling\.sam\.Sam\), not a state_dict; .*If you trust the file, re-save it"):
        load_sam("auto", whole)
    tensor = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), tensor)
    with pytest.raises(ValueError, match=r"tensor\.pth holds a Tensor, not a SAM state_dict"):
        load_sam("auto", tensor)


def test_load_sam_refuses_other_models_and_types(tiny_sam, tiny_file, tmp_path):
    with pytest.raises(ValueError, match=r"tiny\.pth is a tiny checkpoint, not vit_b: pass model type tiny \(or auto\), or a vit_b checkpoint"):
        load_sam("vit_b", tiny_file)
    resnet = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(10, 512)}, resnet)
    with pytest.raises(ValueError, match=r"resnet\.pth: not a segment-anything SAM state_dict: .*\(its first keys: conv1\.weight, fc\.weight\)"):
        load_sam("auto", resnet)
    state_dict = tiny_sam.state_dict()
    del state_dict["mask_decoder.iou_token.weight"]
    state_dict["mask_decoder.hq_token.weight"] = torch.zeros(1, 256)  # e.g. HQ-SAM
    broken = tmp_path / "broken.pth"
    torch.save(state_dict, broken)
    with pytest.raises(ValueError, match=r"broken\.pth does not fit segment_anything's tiny architecture: Missing key\(s\) .*iou_token.*Unexpected key\(s\) .*hq_token.*\. Only segment-anything's own"):
        load_sam("auto", broken)
    with pytest.raises(ValueError, match=r"unknown model type 'vit_x'"):
        load_sam("vit_x", tiny_file)
