"""Channels to RGB: which channels of a multichannel input are shown, and the contrast rule.

The rule is the one 16-bit TIFFs have always had (sam_blocked.inputs.tiff): values that are not
8-bit are stretched linearly from a min..max read over the whole level to 0..255. By default
the shown channels share one range (colours keep their balance, as for an RGB image); with
`channels` asked for, each picked channel is stretched from its own min..max (fluorescence
channels differ by orders of magnitude, as Fiji's per-channel display ranges). One channel is
shown as gray (copied to R, G and B).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np

from sam_blocked.errors import InputError
from sam_blocked.inputs.images import stretch_to_uint8

Range = tuple[float, float]
SCAN_BYTES = 64 * 2**20  # raw bytes per band while scanning a level for its min..max


def pick_channels(count: int, channels: Optional[tuple[int, ...]], what: str) -> tuple[tuple[int, ...], list[str]]:
    """The channel indices shown, three (R, G, B) or one (gray), and a note on what was left out.

    Args:
        count: the input's channels (1 for an image without a channel axis).
        channels: ReadSettings.channels, or None for the default: 0, 1, 2 as RGB, or 0 as gray
            when there are fewer than 3.
        what: how the input is named in an error (e.g. "OME-Zarr image (c=4)").

    Raises:
        InputError: an index at or past `count`, naming the setting channels.
    """
    if channels is not None:
        bad = [c for c in channels if c >= count]
        if bad:
            raise InputError(
                f"{what} has {count} channel(s), indices 0..{count - 1}: {{channels}} {','.join(map(str, channels))} asks for "
                f"{', '.join(map(str, bad))}: pick indices below {count}",
                "channels",
            )
        shown = "as R, G, B" if len(channels) == 3 else "as gray"
        return channels, [f"channel(s) {','.join(map(str, channels))} of {count} shown {shown}"]
    picked = (0, 1, 2) if count >= 3 else (0,)
    if count <= len(picked):
        return picked, []
    used = "channels 0, 1, 2 as RGB" if len(picked) == 3 else "channel 0 as gray"
    return picked, [f"{count} channels: using {used}; choose others with the channels setting (e.g. 2,1,0, or 1 for gray)"]


def scan_ranges(read_rows: Callable[[int, int], np.ndarray], height: int, row_bytes: int, per_channel: bool, rows_multiple: int = 1) -> list[Range]:
    """min..max of a level read in full-width bands of about SCAN_BYTES: one range, or one per channel.

    Args:
        read_rows: (y0, y1) -> (y1 - y0, W, k) stored values of the channels shown.
        height: rows of the level.
        row_bytes: bytes of one full-width row of what read_rows returns.
        per_channel: one range per channel, else one for all.
        rows_multiple: bands are a multiple of this many rows (a chunk's height: each chunk read once).
    """
    step = max(1, SCAN_BYTES // max(1, row_bytes))
    step = max(rows_multiple, step // rows_multiple * rows_multiple)
    lo: Optional[np.ndarray] = None
    hi: Optional[np.ndarray] = None
    for y0 in range(0, height, step):
        values = read_rows(y0, min(height, y0 + step))  # (h, W, k)
        values = values.reshape(-1, values.shape[-1]).astype(np.float64) if values.dtype.kind == "f" else values.reshape(-1, values.shape[-1])
        if values.dtype.kind == "f":
            values = np.where(np.isfinite(values), values, np.nan)
            band_lo, band_hi = np.nanmin(values, axis=0), np.nanmax(values, axis=0)
        else:
            band_lo, band_hi = values.min(axis=0).astype(np.float64), values.max(axis=0).astype(np.float64)
        lo = band_lo if lo is None else np.fmin(lo, band_lo)
        hi = band_hi if hi is None else np.fmax(hi, band_hi)
    if lo is None:
        return [(0.0, 0.0)]
    if not per_channel:
        lo, hi = np.array([np.nanmin(lo)]), np.array([np.nanmax(hi)])
    return [(float(a), float(b)) if np.isfinite(a) and np.isfinite(b) else (0.0, 0.0) for a, b in zip(lo, hi)]


def range_note(dtype: np.dtype, ranges: Sequence[Range]) -> str:
    if len(ranges) == 1:
        lo, hi = ranges[0]
        return f"{dtype} image stretched from [{lo:g}, {hi:g}] to [0, 255] (range read over the whole level)"
    spans = ", ".join(f"[{lo:g}, {hi:g}]" for lo, hi in ranges)
    return f"{dtype} channels each stretched from their own range, {spans}, to [0, 255] (read over the whole level)"


def needs_stretch(dtype: np.dtype) -> bool:
    return np.dtype(dtype) not in (np.uint8, np.bool_)


def to_rgb(values: np.ndarray, ranges: Optional[Sequence[Range]]) -> np.ndarray:
    """(h, w, k) stored values of the shown channels (k = 3 or 1) -> (h, w, 3) uint8 RGB.

    Args:
        ranges: None for uint8 / bool values (copied; bool as 0 / 255); else one (lo, hi) for
            all channels or one per channel.
    """
    if values.dtype == np.bool_:
        out = values.view(np.uint8) * np.uint8(255)
    elif ranges is None:
        out = values.astype(np.uint8, copy=False)
    elif len(ranges) == 1:
        out = stretch_to_uint8(values, *ranges[0])
    else:
        out = np.stack([stretch_to_uint8(values[:, :, i], *ranges[i]) for i in range(values.shape[2])], axis=2)  # (h, w, k)
    if out.shape[2] == 1:
        return np.repeat(out, 3, axis=2)  # (h, w, 3)
    return np.ascontiguousarray(out)
