"""Official SAM checkpoints: the manifest, finding, downloading, verifying, detecting, loading.

Where checkpoints are looked for, first hit wins:
  1. an explicit path (`load_sam(checkpoint=...)`, `--checkpoint`) or folder (`weights_dir=`);
  2. $SAM_BLOCKED_WEIGHTS: a checkpoint file (used for every model type) or a folder;
  3. the weights folder: the repository's `weights/` when running from a checkout,
     else `$XDG_CACHE_HOME/sam_blocked` (default `~/.cache/sam_blocked`).
In a folder a checkpoint is found under its official file name (sam_vit_b_01ec64.pth, ...).
Downloads go to `--dir`, else $SAM_BLOCKED_WEIGHTS when it names a folder, else the weights
folder. `weights/checkpoints.json` mirrors `CHECKPOINTS` for people and other tools; the
package reads the dict below, so an installed wheel needs no data file.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import pickle
import re
import sys
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Mapping, Union

import torch
from segment_anything.modeling import Sam
from tqdm import tqdm

from sam_blocked.models.registry import ENCODER_CONFIGS, MODEL_TYPE_CHOICES, MODEL_TYPES, PATCH_SIZE, build_sam, cast_image_encoder, check_model_type

WEIGHTS_ENV = "SAM_BLOCKED_WEIGHTS"
_REPO_WEIGHTS = Path(__file__).resolve().parents[2] / "weights"
_READ_BYTES = 1 << 20


@dataclass(frozen=True)
class CheckpointInfo:
    """One downloadable checkpoint: its registry name, file name, address, size and sha256."""

    model_type: str
    file: str
    url: str
    size: int
    sha256: str


# From segment-anything's README; sizes and sha256 of the files it links.
CHECKPOINTS: dict[str, CheckpointInfo] = {
    "vit_b": CheckpointInfo(
        "vit_b",
        "sam_vit_b_01ec64.pth",
        "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
        375_042_383,
        "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
    ),
    "vit_l": CheckpointInfo(
        "vit_l",
        "sam_vit_l_0b3195.pth",
        "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth",
        1_249_524_607,
        "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
    ),
    "vit_h": CheckpointInfo(
        "vit_h",
        "sam_vit_h_4b8939.pth",
        "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth",
        2_564_550_879,
        "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
    ),
}

PathLike = Union[str, os.PathLike]
State = Literal["verified", "present", "wrong size", "wrong sha256", "partial", "missing"]


@dataclass(frozen=True)
class CheckpointStatus:
    """What is on disk for one checkpoint. `size` is the bytes of the file or partial download."""

    info: CheckpointInfo
    path: Path
    state: State
    size: int | None = None


# ---------------------------------------------------------------------------- where


def checkpoint_info(model_type: str) -> CheckpointInfo:
    """The manifest entry of an official checkpoint ("vit_b", "vit_l", "vit_h"; "default" = vit_h)."""
    name = _canonical_type(model_type)
    if name not in CHECKPOINTS:
        raise ValueError(f"model type {model_type!r} has no official checkpoint: choose one of {', '.join(CHECKPOINTS)}")
    return CHECKPOINTS[name]


def default_weights_dir() -> Path:
    """The repository's weights/ in a checkout, else $XDG_CACHE_HOME/sam_blocked (~/.cache/sam_blocked)."""
    if (_REPO_WEIGHTS / "checkpoints.json").is_file():
        return _REPO_WEIGHTS
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sam_blocked"


def resolve_weights_dir(weights_dir: PathLike | None = None) -> Path:
    """Where downloads go: `weights_dir`, else $SAM_BLOCKED_WEIGHTS if it names a folder, else the default."""
    if weights_dir is not None:
        return Path(weights_dir).expanduser()
    env = os.environ.get(WEIGHTS_ENV)
    if env and not _names_a_file(Path(env).expanduser()):
        return Path(env).expanduser()
    return default_weights_dir()


def find_checkpoint(model_type: str, weights_dir: PathLike | None = None) -> Path | None:
    """Path of a checkpoint for `model_type`, or None when there is none (always None for "tiny").

    Args:
        model_type: "vit_b", "vit_l", "vit_h", "default" (= vit_h) or "auto" (the first
            of vit_b, vit_l, vit_h found in a place).
        weights_dir: a folder searched first; then $SAM_BLOCKED_WEIGHTS, then the default
            weights folder (see the module docstring).
    """
    name = _canonical_type(model_type)
    if name == "tiny":
        return None
    types = MODEL_TYPES if name == "auto" else (name,)
    for place, is_file in _search_places(weights_dir):
        if is_file:
            return place
        for t in types:
            candidate = place / CHECKPOINTS[t].file
            if candidate.is_file():
                return candidate
    return None


def _search_places(weights_dir: PathLike | None) -> list[tuple[Path, bool]]:
    places: list[tuple[Path, bool]] = []
    if weights_dir is not None:
        folder = Path(weights_dir).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"weights folder {folder} does not exist: pass an existing folder")
        places.append((folder, False))
    env = os.environ.get(WEIGHTS_ENV)
    if env:
        path = Path(env).expanduser()
        if not path.exists():
            raise FileNotFoundError(
                f"{WEIGHTS_ENV}={env} names no existing file or folder: point it at a checkpoint or a folder, or unset it"
            )
        places.append((path, path.is_file()))
    places.append((default_weights_dir(), False))
    return places


def _names_a_file(path: Path) -> bool:
    return path.is_file() or (not path.exists() and path.suffix in (".pth", ".pt"))


def _canonical_type(model_type: str) -> str:
    if model_type == "default":
        return "vit_h"
    return check_model_type(model_type, MODEL_TYPE_CHOICES)


# ---------------------------------------------------------------------------- download and verify


def sha256_file(path: PathLike, *, progress: bool = False) -> str:
    """Hex sha256 of a file, read 1 MiB at a time (a 2.5 GB checkpoint takes seconds)."""
    digest = hashlib.sha256()
    buffer = bytearray(_READ_BYTES)
    view = memoryview(buffer)
    with open(path, "rb") as f, _bar(os.path.getsize(path), f"sha256 {Path(path).name}", progress) as bar:
        while n := f.readinto(buffer):
            digest.update(view[:n])
            bar.update(n)
    return digest.hexdigest()


def checkpoint_status(checkpoint: str | CheckpointInfo, weights_dir: PathLike | None = None, *, verify: bool = False) -> CheckpointStatus:
    """What `weights_dir` (see `resolve_weights_dir`) holds for one checkpoint.

    Args:
        checkpoint: a model type with an official checkpoint, or a manifest entry.
        verify: hash a file of the right size ("verified" / "wrong sha256"); without it
            a file of the right size is "present".
    """
    info = checkpoint if isinstance(checkpoint, CheckpointInfo) else checkpoint_info(checkpoint)
    path = resolve_weights_dir(weights_dir) / info.file
    part = _part_path(path)
    if path.is_file():
        size = path.stat().st_size
        if size != info.size:
            return CheckpointStatus(info, path, "wrong size", size)
        if not verify:
            return CheckpointStatus(info, path, "present", size)
        return CheckpointStatus(info, path, "verified" if sha256_file(path) == info.sha256 else "wrong sha256", size)
    if part.is_file():
        return CheckpointStatus(info, part, "partial", part.stat().st_size)
    return CheckpointStatus(info, path, "missing")


def download_checkpoint(
    checkpoint: str | CheckpointInfo,
    weights_dir: PathLike | None = None,
    *,
    url: str | None = None,
    progress: bool = True,
    timeout: float = 60.0,
) -> Path:
    """Download a checkpoint into `weights_dir`, resuming a partial one; returns its path.

    Bytes stream into `<file>.part` (HTTP Range resumes it after an interruption); the
    file is moved to its name only once its size and sha256 match the manifest, so a file
    under an official name is always a verified one. A file already in place is verified
    and kept.

    Args:
        checkpoint: a model type with an official checkpoint, or a manifest entry.
        weights_dir: target folder (see `resolve_weights_dir`), created if needed.
        url: another address of the same file (a mirror); size and sha256 still must match.
        progress: show tqdm bars and notes on stderr.
        timeout: seconds to wait for the server before giving up (the partial file is kept).
    """
    info = checkpoint if isinstance(checkpoint, CheckpointInfo) else checkpoint_info(checkpoint)
    url = url or info.url
    folder = resolve_weights_dir(weights_dir)
    folder.mkdir(parents=True, exist_ok=True)
    dest = folder / info.file
    part = _part_path(dest)
    if dest.is_file():
        _check_in_place(dest, info, progress)
        return dest
    offset = part.stat().st_size if part.is_file() else 0
    if offset > info.size:
        _note(progress, f"{part} is larger than {info.file} should be: starting over")
        part.unlink()
        offset = 0
    if offset < info.size:
        _fetch(url, part, offset, info, progress, timeout)
    size = part.stat().st_size
    if size != info.size:
        part.unlink()
        raise ValueError(f"{url} sent {size:,} bytes, the manifest expects {info.size:,}: the partial file was deleted; check url")
    digest = sha256_file(part, progress=progress)
    if digest != info.sha256:
        part.unlink()
        raise ValueError(
            f"sha256 of the downloaded {info.file} is {digest}, the manifest expects {info.sha256}: "
            f"nothing was installed and the download was deleted; rerun, or check that {url} serves the official file"
        )
    os.replace(part, dest)
    return dest


def _fetch(url: str, part: Path, offset: int, info: CheckpointInfo, progress: bool, timeout: float) -> None:
    """Append bytes [offset, size) of `url` to `part`, or rewrite it if the server ignores Range."""
    headers = {"User-Agent": "sam-blocked"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
        _note(progress, f"resuming {info.file} at {offset / 2**20:.1f} of {info.size / 2**20:.1f} MiB")
    keep = f"; {part} is kept, rerun the same command to resume" if offset else ""
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as error:
        raise ConnectionError(f"download of {url} failed: HTTP {error.code} {error.reason}; check the address (url){keep}") from None
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise ConnectionError(f"could not reach {url}: {reason}; check the network, or give url a mirror{keep}") from None
    with response:
        if offset and response.status != 206:
            _note(progress, f"{url} ignores Range requests: downloading {info.file} from the start")
            offset = 0
        elif offset:
            start = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
            if not start or int(start.group(1)) != offset:
                raise ConnectionError(f"{url} answered a resume from byte {offset} with {response.headers.get('Content-Range')!r}; delete {part} and rerun")
        length = response.headers.get("Content-Length")
        if length is not None and offset + int(length) != info.size:
            raise ValueError(
                f"{url} serves {offset + int(length):,} bytes, the manifest expects {info.size:,} for {info.file}: "
                "wrong address or mirror (url); nothing was downloaded"
            )
        with open(part, "ab" if offset else "wb") as f, _bar(info.size, info.file, progress, initial=offset) as bar:
            try:
                while chunk := response.read(_READ_BYTES):
                    f.write(chunk)
                    bar.update(len(chunk))
            except (OSError, http.client.HTTPException) as error:
                f.flush()
                raise ConnectionError(
                    f"download of {url} stopped at {f.tell():,} of {info.size:,} bytes ({error!r}); "
                    f"{part} is kept, rerun the same command to resume"
                ) from None
    size = part.stat().st_size
    if size < info.size:
        raise ConnectionError(f"download of {url} stopped at {size:,} of {info.size:,} bytes; {part} is kept, rerun the same command to resume")


def _check_in_place(dest: Path, info: CheckpointInfo, progress: bool) -> None:
    size = dest.stat().st_size
    if size == info.size:
        _note(progress, f"{dest} is already there: verifying it")
        if sha256_file(dest, progress=progress) == info.sha256:
            return
    raise ValueError(f"{dest} exists but is not the official {info.file} (size or sha256 differ): delete it and rerun to download it again")


def _part_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


def _bar(total: int, desc: str, progress: bool, initial: int = 0) -> tqdm:
    return tqdm(total=total, initial=initial, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not progress)


def _note(progress: bool, message: str) -> None:
    if progress:
        print(message, file=sys.stderr)


# ---------------------------------------------------------------------------- detect and load


def detect_model_type(state_dict: Mapping[str, torch.Tensor]) -> str:
    """"vit_b", "vit_l", "vit_h" or "tiny", from the image encoder's shapes (works on meta tensors).

    Args:
        state_dict: a SAM state_dict; only `image_encoder.patch_embed.proj.weight`
            (embed_dim, 3, 16, 16) and the `image_encoder.blocks.<i>.` keys are read.
    """
    proj = state_dict.get("image_encoder.patch_embed.proj.weight") if isinstance(state_dict, Mapping) else None
    if not isinstance(proj, torch.Tensor):
        keys = list(state_dict)[:4] if isinstance(state_dict, Mapping) else []
        raise ValueError(
            "not a segment-anything SAM state_dict: it has no 'image_encoder.patch_embed.proj.weight'"
            + (f" (its first keys: {', '.join(map(str, keys))})" if keys else " (it is empty)")
        )
    embed_dim = proj.shape[0]
    blocks = {int(m.group(1)) for key in state_dict if (m := re.match(r"image_encoder\.blocks\.(\d+)\.", key))}
    depth = max(blocks) + 1 if blocks else 0
    for name, (dim, n_blocks, *_) in ENCODER_CONFIGS.items():
        if (dim, n_blocks) == (embed_dim, depth):
            return name
    known = ", ".join(f"{n} ({c[0]}, {c[1]} blocks)" for n, c in ENCODER_CONFIGS.items())
    raise ValueError(f"image encoder of embed dim {embed_dim} with {depth} blocks is no SAM architecture known here: {known}")


def load_sam(
    model_type: str = "auto",
    checkpoint: PathLike | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Sam:
    """Load a SAM checkpoint into segment_anything's `Sam`, in eval mode; sets `sam.model_type`.

    Args:
        model_type: "auto" (detected from the shapes), "vit_b", "vit_l", "vit_h", "default"
            (= vit_h) or "tiny"; a checkpoint of another type is refused.
        checkpoint: a .pth state_dict (also accepted: wrapped in {"model": ...} or
            {"state_dict": ...}, keys prefixed "module."), or a folder to search; None
            searches as `find_checkpoint` does.
        device: where the model goes; the file is read on the CPU (map_location) first.
        dtype: dtype of the image encoder; the prompt encoder and mask decoder stay
            float32 (see `cast_image_encoder`).
    """
    asked = _canonical_type(model_type)
    path = _checkpoint_path(asked, checkpoint)
    state_dict = _read_state_dict(path, asked)
    try:
        found = detect_model_type(state_dict)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    if asked not in ("auto", found):
        raise ValueError(f"{path} is a {found} checkpoint, not {asked}: pass model type {found} (or auto), or a {asked} checkpoint")
    pos_embed = state_dict.get("image_encoder.pos_embed")
    img_size = pos_embed.shape[1] * PATCH_SIZE if isinstance(pos_embed, torch.Tensor) and pos_embed.dim() == 4 else 1024
    # Built on the meta device and given the file's tensors (assign=True): no random
    # init and no second copy of the weights in memory.
    with torch.device("meta"):
        sam = build_sam(found, img_size=img_size, seed=None)
    state_dict = {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}
    try:
        sam.load_state_dict(state_dict, strict=True, assign=True)
    except RuntimeError as error:
        detail = " ".join(str(error).split()).removeprefix("Error(s) in loading state_dict for Sam: ")[:600]
        raise ValueError(
            f"{path} does not fit segment_anything's {found} architecture: {detail}. Only segment-anything's own "
            "checkpoints load (not HQ-SAM, MobileSAM, SAM 2 or fine-tunes that change the layers)"
        ) from None
    leftover = [n for n, t in [*sam.named_parameters(), *sam.named_buffers()] if t.is_meta]
    assert not leftover, f"load_sam left tensors unset: {leftover}"
    sam.model_type = found
    return cast_image_encoder(sam.to(torch.device(device)), dtype).eval()


def _checkpoint_path(asked: str, checkpoint: PathLike | None) -> Path:
    download = f"`sam-blocked weights download {asked if asked in CHECKPOINTS else 'vit_b'}`"
    if checkpoint is not None:
        path = Path(checkpoint).expanduser()
        if path.is_file():
            return path
        if not path.is_dir():
            raise FileNotFoundError(f"checkpoint {path} does not exist: check the path, or get the official one with {download}")
        found = find_checkpoint(asked, path)
        if found is None or found.parent != path:
            raise FileNotFoundError(f"no {asked} checkpoint under its official name in {path}: pass the file itself, or run {download} --dir {path}")
        return found
    if asked == "tiny":
        raise FileNotFoundError("'tiny' has no official checkpoint: pass the path of a saved tiny state_dict, or use build_sam('tiny')")
    found = find_checkpoint(asked)
    if found is None:
        names = ", ".join(CHECKPOINTS[t].file for t in (MODEL_TYPES if asked == "auto" else (asked,)))
        places = ", ".join(str(p) for p, _ in _search_places(None))
        raise FileNotFoundError(
            f"no {'SAM' if asked == 'auto' else asked} checkpoint found (looked for {names} in {places}): "
            f"download it with {download}, set {WEIGHTS_ENV} to a checkpoint or folder, or pass a checkpoint path"
        )
    return found


def _read_state_dict(path: Path, asked: str) -> dict[str, torch.Tensor]:
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, MemoryError):
        raise
    except pickle.UnpicklingError as error:
        pickled = re.search(r"GLOBAL ([\w.]+)", str(error))
        if pickled:
            raise ValueError(
                f"{path} holds a pickled Python object ({pickled.group(1)}), not a state_dict; load_sam reads "
                "state_dicts only (torch.load weights_only=True). If you trust the file, re-save it with "
                f"torch.save(torch.load({str(path)!r}, weights_only=False).state_dict(), 'sam_state_dict.pth')"
            ) from None
        raise ValueError(_corrupt_message(path, asked, error)) from None
    except (RuntimeError, EOFError, KeyError, ValueError, zipfile.BadZipFile, UnicodeDecodeError, IndexError, TypeError) as error:
        raise ValueError(_corrupt_message(path, asked, error)) from None
    if isinstance(loaded, Mapping) and len(loaded) == 1 and isinstance(next(iter(loaded.values())), Mapping):
        key = next(iter(loaded))
        if key in ("model", "state_dict"):
            loaded = loaded[key]
    if not isinstance(loaded, Mapping) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        what = type(loaded).__name__ if not isinstance(loaded, Mapping) else "dict holding non-tensors"
        raise ValueError(f"{path} holds a {what}, not a SAM state_dict (a dict of tensors): save it with torch.save(sam.state_dict(), path)")
    if loaded and all(str(k).startswith("module.") for k in loaded):
        loaded = {k[len("module.") :]: v for k, v in loaded.items()}
    return dict(loaded)


def _corrupt_message(path: Path, asked: str, error: BaseException) -> str:
    reason = " ".join(str(error).split()).split(". ")[0][:200] or type(error).__name__
    size = path.stat().st_size
    official = next((c for c in CHECKPOINTS.values() if c.file == path.name), None)
    sizes = f" ({size:,} bytes; the official file has {official.size:,})" if official and official.size != size else f" ({size:,} bytes)"
    model = official.model_type if official else (asked if asked in CHECKPOINTS else "vit_b")
    return (
        f"{path} is not a readable PyTorch checkpoint{sizes}: {reason}. The file is corrupt or truncated: "
        f"delete it and download it again (`sam-blocked weights download {model}`)"
    )
