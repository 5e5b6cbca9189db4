"""Model options shared by every command that loads a model (amg.py's flag names)."""

from __future__ import annotations

import argparse
import os
from typing import Optional

from sam_blocked.attention.common import DEFAULT_CHUNKS
from sam_blocked.attention.dispatch import BACKEND_CHOICES
from sam_blocked.attention.threads import shares_steps
from sam_blocked.encoder.layer import check_config
from sam_blocked.models.load import DTYPES, MODEL_TYPE_CHOICES, LoadedModel, ModelSettings, load_model, resolve_device

__all__ = ["DTYPES", "LoadedModel", "add_model_args", "apply_threads", "blocking_from_args", "busy_cpu_note", "device_from_args", "model_from_args", "settings_from_args"]


def add_read_args(parser: argparse.ArgumentParser, title: str) -> None:
    """--level / --mpp (one or the other) and --channels: what is read of each image (ReadSettings)."""
    read = parser.add_argument_group(title)
    levels = read.add_mutually_exclusive_group()
    levels.add_argument("--level", type=int, default=None, metavar="N", help="read pyramid level N (0: full resolution, the default)")
    levels.add_argument(
        "--mpp",
        type=float,
        default=None,
        metavar="M",
        help="read at M microns per pixel: the level nearest M, resampled to exactly M (the image must state its mpp)",
    )
    read.add_argument(
        "--channels",
        default=None,
        metavar="R,G,B|C",
        help="channels shown: three as R,G,B (e.g. 2,1,0) or one as gray (e.g. 1); default: the image's RGB, or its first channel(s)",
    )


def add_model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model-type",
        default="auto",
        choices=list(MODEL_TYPE_CHOICES),
        help="SAM architecture; 'auto' detects it from the checkpoint (vit_b without one). "
        "'tiny' is a 2-block test architecture with random weights.",
    )
    group.add_argument(
        "--checkpoint",
        default=None,
        help="SAM checkpoint (.pth) or a folder of them. Without it: $SAM_BLOCKED_WEIGHTS, then the weights "
        "folder (`sam-blocked weights list`), else seeded random weights.",
    )
    group.add_argument("--device", default=None, help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda when available)")
    group.add_argument("--dtype", default="float32", choices=list(DTYPES), help="model dtype")
    group.add_argument("--img-size", type=int, default=None, help="square input size in pixels, a multiple of 16 (default 1024)")
    group.add_argument("--seed", type=int, default=0, help="seed of the random weights when no checkpoint is given")
    group.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads of this process (default: torch's, one per core). Beside other busy processes the "
        "patched encoder is faster on fewer threads (--threads 1), or with OMP_WAIT_POLICY=PASSIVE set before starting",
    )
    blocks = parser.add_argument_group("blocked attention")
    blocks.add_argument("--chunks", type=int, default=DEFAULT_CHUNKS, help="blocks per attention matrix (default %(default)s = 4 x 4)")
    blocks.add_argument(
        "--max-block-mb",
        type=float,
        default=None,
        help="memory budget in MiB for the largest attention block; chosen per layer, overrides --chunks",
    )
    blocks.add_argument(
        "--backend",
        default="auto",
        choices=list(BACKEND_CHOICES),
        help="attention kernel: auto (default: chosen per device and layer shape, see README), "
        "blocked (pure PyTorch), sdpa, bands (plain GEMMs), flashbias, flex (CUDA only)",
    )


def apply_threads(args: argparse.Namespace) -> None:
    """--threads: this process's torch threads (the user's choice; nothing is changed without
    it). The command line's main applies it before any command runs."""
    threads = getattr(args, "threads", None)
    if threads is None:
        return
    if threads < 1:
        raise ValueError(f"--threads {threads}: give a whole number of threads >= 1")
    import torch

    torch.set_num_threads(threads)


def busy_cpu_note(device: object, threads: Optional[int] = None, load: Optional[float] = None, cores: Optional[int] = None) -> Optional[str]:
    """A line for stderr when other processes already use the CPU this run is about to use
    with all its threads, and this torch cannot give the patched steps threads of their own;
    else None.

    With one core taken by another process, every parallel operator's threads wait at its
    end for the thread that shares that core. Where attention.threads shares the patched
    steps out among threads (torch's OpenMP reachable: Linux), a slowed thread just takes
    fewer steps, and nothing needs saying. Elsewhere the patched encoder, many small
    operators, loses its lead over stock there (docs/benchmarks/contention.md). The user
    chooses: --threads, or OMP_WAIT_POLICY=PASSIVE before starting; nothing is changed for them.

    Args:
        device: the run's device; only "cpu" gets a note.
        threads: torch threads (default torch.get_num_threads()); load: the 1-minute load
            average before the run starts (default os.getloadavg()); cores: os.cpu_count().
    """
    import torch

    if torch.device(str(device)).type != "cpu" or os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE" or shares_steps():
        return None
    threads = torch.get_num_threads() if threads is None else threads
    cores = cores or os.cpu_count() or 1
    if load is None:
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):  # Windows has no load average
            return None
    if threads < 2 or load + threads <= cores + 0.5:
        return None
    return (
        f"note: other processes are using the CPU (load average {load:.1f} on {cores} cores) and this run uses {threads} threads: "
        "beside them the patched encoder runs faster with --threads 1 (or fewer), or with OMP_WAIT_POLICY=PASSIVE set before "
        "starting (docs/benchmarks/contention.md)"
    )


def device_from_args(args: argparse.Namespace):
    return resolve_device(args.device)


def settings_from_args(args: argparse.Namespace) -> ModelSettings:
    """The model the flags name (sam_blocked.models.load.ModelSettings)."""
    return ModelSettings(args.model_type, args.checkpoint, args.device, args.dtype, args.img_size, args.seed)


def blocking_from_args(args: argparse.Namespace):
    """The patch the flags name (sam_blocked.encoder.layer.BlockConfig), checked."""
    return check_config(args.chunks, args.max_block_mb, args.backend)


def model_from_args(args: argparse.Namespace, *, patch: bool = True) -> LoadedModel:
    """Build or load the model the flags describe, resized, moved, cast and (by default) patched."""
    return load_model(settings_from_args(args), blocking_from_args(args) if patch else None)
