"""The images of a batch run: finding them (files, folders, globs) and reading them robustly.

`collect_images` expands what the user named into `ImageItem`s, each file once, named
after its path relative to the folder or glob root it was found in (amg.py's naming).
`read_image` turns one file into (H, W, 3) uint8 RGB, in the orientation a viewer shows,
or raises `InputError`, the error that makes one image fail while the run goes on.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from glob import glob
from pathlib import Path, PurePosixPath
from typing import Mapping, Optional, Sequence

import numpy as np
from PIL import Image, ImageFile, ImageOps

from sam_blocked.errors import InputError, SettingError

DEFAULT_MAX_PIXELS = 16384 * 16384  # PIL's own bomb limit (89.5 MPix) is below a 12000 x 9000 scan
_HIGH_BITS_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
ZARR_MARKERS = ("zarr.json", ".zattrs", ".zgroup", ".zarray")  # zarr v3; v2 attributes, group, array
WSI_SUFFIXES = frozenset({".svs", ".ndpi", ".mrxs", ".scn", ".bif", ".vms", ".vmu", ".svslide"})  # whole-slide formats


@dataclass(frozen=True)
class ImageItem:
    """One image to segment.

    Args:
        path: the file, as found (joined onto the INPUT given).
        name: its path relative to the folder or glob root it was found in (POSIX), or
            its file name when it was given as a file. Outputs are named after it.
    """

    path: Path
    name: str

    @property
    def stem(self) -> str:
        """`name` without its extension: the output name (amg.py's convention)."""
        return str(PurePosixPath(self.name).with_suffix(""))


def image_extensions() -> frozenset[str]:
    """File extensions PIL can open and whole-slide formats, lower case with the dot: a folder's default filter."""
    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN) | WSI_SUFFIXES


def is_zarr(path: str | os.PathLike) -> bool:
    """A folder holding a zarr store (v2 or v3: OME-Zarr or a plain array), or a URL ending in .zarr.
    A zarr folder is one image: collected as a file is, never scanned."""
    text = os.fspath(path)
    if "://" in text:
        return text.rstrip("/").endswith(".zarr")
    folder = Path(text)
    return folder.is_dir() and any((folder / marker).is_file() for marker in ZARR_MARKERS)


def collect_images(
    inputs: Sequence[str | os.PathLike],
    pattern: Optional[str] = None,
    exclude: Optional[Path] = None,
    names: Optional[Mapping[str, str]] = None,
) -> tuple[list[ImageItem], list[tuple[str, str]]]:
    """Expand files, folders and globs into images, in input order, each file once.

    Args:
        inputs: image files, folders, or glob patterns (`photos/*.tif`, `**` recurses); a zarr
            store folder is one image, and a folder's zarr stores named *.zarr are collected
            with its files (URLs are opened by open_image in Python, not collected).
        pattern: for folders, a pathlib glob relative to the folder (`*.tif`, `**/*.png`);
            default: the files directly in the folder with an extension PIL can open.
            Hidden files and folders are left out.
        exclude: a folder whose files are never collected (the output folder).
        names: how the front end spells the settings a problem names (the CLI: pattern as
            --pattern; sam_blocked.errors); default the settings' own names.

    Returns:
        (images, problems): problems are (input, reason) for inputs that named nothing.
    """
    if pattern is not None and (not pattern or os.path.isabs(pattern)):
        raise SettingError(f"{{pattern}} {pattern!r}: give a glob relative to each folder, e.g. '*.tif' or '**/*.png'", "pattern")
    images: list[ImageItem] = []
    problems: list[tuple[str, str]] = []
    seen: set[Path] = set()
    excluded = exclude.resolve() if exclude is not None else None

    def add(path: Path, name: str) -> None:
        key = path.resolve()
        if key not in seen and not (excluded is not None and key.is_relative_to(excluded)):
            seen.add(key)
            images.append(ImageItem(path, name))

    for arg in map(str, inputs):
        path = Path(arg)
        before = len(images)
        try:
            if is_zarr(path):
                add(path, path.name)
                continue
            if path.is_dir():
                for file in _scan_folder(path, pattern):
                    add(file, file.relative_to(path).as_posix())
            elif path.exists():
                add(path, path.name)
            elif any(c in arg for c in "*?["):
                root = _glob_root(arg)
                for match in map(Path, sorted(glob(arg, recursive=True))):
                    if match.is_dir() and not is_zarr(match):  # a zarr store is one image
                        for file in _scan_folder(match, pattern):
                            add(file, file.relative_to(root).as_posix())
                    else:
                        add(match, match.relative_to(root).as_posix())
            else:
                problems.append((arg, "no such file or folder"))
                continue
        except OSError as error:
            problems.append((arg, f"cannot list it: {error.strerror or error}"))
            continue
        if len(images) == before and not path.is_file():
            what = SettingError(f"{{pattern}} {pattern!r}", "pattern").spelled(names) if pattern else "an image extension"
            problems.append((arg, f"the folder has no new file with {what}" if path.is_dir() else "the glob matched no new file"))
    return images, problems


def _scan_folder(folder: Path, pattern: Optional[str]) -> list[Path]:
    if pattern is None:
        extensions = image_extensions()
        files = [p for p in folder.iterdir() if p.suffix.lower() in extensions or (p.suffix.lower() == ".zarr" and is_zarr(p))]
    else:
        files = list(folder.glob(pattern))
    stores: dict[Path, bool] = {}  # folder -> is a zarr store: one image, whose chunk files are not images

    def store(path: Path) -> bool:
        if path not in stores:
            stores[path] = is_zarr(path)
        return stores[path]

    def inside_store(path: Path) -> bool:
        return any(store(parent) for parent in path.parents if parent != folder and parent.is_relative_to(folder))

    return sorted(
        p
        for p in files
        if (p.is_file() or store(p))
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
        and not inside_store(p)
    )


def _glob_root(pattern: str) -> Path:
    parts = Path(pattern).parts
    fixed = [p for p in parts[: next(i for i, p in enumerate(parts) if any(c in p for c in "*?["))]]
    return Path(*fixed) if fixed else Path(".")


def read_image(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, list[str]]:
    """Read an image file as SAM wants it, in the orientation a viewer shows.

    EXIF orientation is applied; grayscale, palette, RGBA, CMYK and 1-bit images are
    converted to RGB (alpha dropped); 16-bit, 32-bit and float images are stretched
    linearly from their minimum..maximum to 0..255. Multi-frame files use frame 0.

    Args:
        path: the image file.
        max_pixels: refuse images with more pixels than this before decoding them
            (the decompression-bomb guard; it takes the place of PIL's own limit, which
            is never changed: PIL's `Image.MAX_IMAGE_PIXELS` is process-wide).

    Returns:
        (image, notes): image is (H, W, 3) uint8 RGB; notes say what was converted.

    Raises:
        InputError: the file cannot be read, is not an image, is truncated, or is too big
            (naming the setting max_pixels).
    """
    notes: list[str] = []
    try:
        with open_header(path) as opened:
            width, height = opened.size
            if width * height > max_pixels:
                raise InputError(
                    f"{width} x {height} = {width * height:,} pixels is above {{max_pixels}} {max_pixels:,} "
                    "(a guard against decompression bombs): raise {max_pixels} if you trust this file",
                    "max_pixels",
                )
            if getattr(opened, "n_frames", 1) > 1:
                notes.append(f"has {opened.n_frames} frames; using the first")
            orientation = opened.getexif().get(0x0112, 1)
            img = ImageOps.exif_transpose(opened)  # decodes: a truncated file fails here
            if orientation not in (1, None):
                notes.append(f"EXIF orientation {orientation} applied: masks and prompts are in the rotated {img.width} x {img.height} frame")
            return _to_rgb(img, notes), notes
    except InputError:
        raise
    except Image.DecompressionBombError as error:  # a decoder that checks PIL's own limit again while decoding (TIFF, GIF)
        raise InputError(
            f"PIL's decoder for this format refuses it while decoding ({error}): PIL's own limit, "
            "Image.MAX_IMAGE_PIXELS, applies to it; segment it tile by tile ({tile}: a TIFF is then read window by window)",
            "tile",
        ) from error
    except Exception as error:  # decoders raise OSError, SyntaxError, ValueError, EOFError, ...
        raise InputError(_read_error(error)) from error


def open_header(path: str | os.PathLike) -> ImageFile.ImageFile:
    """The image file opened as `PIL.Image.open` opens it (the header only, nothing decoded), minus
    its decompression-bomb check: that check reads PIL's process-wide `Image.MAX_IMAGE_PIXELS`,
    which a caller with its own limit would otherwise have to change for every thread. Check
    `.size` against your limit before decoding. Close it (or use `with`).

    Raises:
        UnidentifiedImageError: no format PIL knows accepts the file; OSError: it cannot be read.
    """
    filename = os.fspath(path)
    with open(filename, "rb") as f:
        prefix = f.read(16)
    for load_plugins in (Image.preinit, Image.init):  # the common formats first, then all: as Image.open
        load_plugins()
        for fmt in list(Image.ID):
            factory, accept = Image.OPEN[fmt]
            accepted = True if accept is None else accept(prefix)
            if not accepted or isinstance(accepted, str):  # a str: "this format, but unsupported" (Image.open warns)
                continue
            try:
                return factory(filename, filename)  # ImageFile opens the path and closes it with the image
            except (SyntaxError, IndexError, TypeError, struct.error):
                continue
    raise Image.UnidentifiedImageError(f"cannot identify image file {filename!r}")


def _read_error(error: Exception) -> str:
    if isinstance(error, FileNotFoundError):
        return "no such file"
    if isinstance(error, PermissionError):
        return "cannot read it: permission denied"
    if isinstance(error, Image.UnidentifiedImageError):
        return "not an image PIL can read (unknown or corrupt format)"
    if "truncated" in str(error).lower():
        return f"truncated image file ({error}): the file is incomplete; copy it again"
    return f"cannot decode it ({type(error).__name__}: {error})"


def _to_rgb(img: Image.Image, notes: list[str]) -> np.ndarray:
    if img.mode in _HIGH_BITS_MODES:
        values = np.asarray(img).astype(np.float32)  # (H, W)
        finite = values[np.isfinite(values)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        gray = stretch_to_uint8(values, lo, hi)
        notes.append(f"{img.mode} image stretched from [{lo:g}, {hi:g}] to [0, 255] and copied to RGB")
        return np.repeat(gray[:, :, None], 3, axis=2)  # (H, W, 3)
    if img.mode != "RGB":
        dropped = " (alpha dropped)" if "A" in img.getbands() or "transparency" in img.info else ""
        notes.append(f"converted from mode {img.mode} to RGB{dropped}")
        img = img.convert("RGB")
    return np.asarray(img)  # (H, W, 3) uint8


def stretch_to_uint8(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Map lo..hi linearly onto 0..255, clipping outside and NaN to 0: how 16-bit, 32-bit
    and float images become 8-bit (lo, hi: the image's finite minimum and maximum).

    Args:
        values: any shape, any real dtype.
    """
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    return np.clip(np.nan_to_num((values.astype(np.float32) - lo) * scale), 0, 255).round().astype(np.uint8)
