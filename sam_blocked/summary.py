"""The record of a segment run: OUT/segment-summary.json and the log OUT/segment.log."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

from tqdm import tqdm

SUMMARY_NAME = "segment-summary.json"
LOG_NAME = "segment.log"


@dataclass
class RunSummary:
    """What a run did, written as OUT/segment-summary.json.

    Args:
        done/skipped/failed: one dict per image (image, and reason or masks, seconds, notes,
            peak_memory_bytes; when written as a huge image also tiles, encoder_passes and
            truncated: the masks that touch a tile edge inside the image).
        images: how many images the run was given.
        not_finished: images left, the current one included, when the run was interrupted.
        peak_memory_bytes: the largest per-image peak (sam_blocked.memory.measure.peak_bytes), None
            where it cannot be measured.
        engine: where the work ran: "local" or "ray" (sam_blocked.engines).
        workers: per worker (by id): its node, processes, restarts, images and tiles done, busy
            seconds (add_units).
    """

    output: Path
    mode: str
    settings: dict[str, Any]
    done: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    failed: list[dict] = field(default_factory=list)
    images: int = 0
    not_finished: int = 0
    interrupted: bool = False
    seconds: float = 0.0
    device: str = "cpu"
    peak_memory_bytes: Optional[int] = None
    engine: str = "local"
    workers: dict[str, dict[str, Any]] = field(default_factory=dict)

    def add_units(self, units: Iterable[Any]) -> None:
        """Count units of work (sam_blocked.engines.UnitRecord) against their workers."""
        for unit in units:
            worker = self.workers.setdefault(
                unit.worker,
                {"worker": unit.worker, "node": unit.node, "node_ip": unit.node_ip, "pids": [], "restarts": 0, "device": unit.device, "threads": unit.threads, "images": 0, "tiles": 0, "busy_seconds": 0.0},
            )
            if unit.pid is not None and unit.pid not in worker["pids"]:
                worker["pids"].append(unit.pid)  # more than one: the worker died and was restarted
            worker["restarts"] = max(worker["restarts"], unit.restarts)
            if unit.model is not None:
                worker["model"] = unit.model
            worker["images" if unit.kind == "image" else "tiles"] += 1
            worker["busy_seconds"] += unit.seconds

    def worker_table(self) -> list[dict[str, Any]]:
        """Per worker: what add_units counted, with its throughput (images or tiles per busy second)."""
        table = []
        for worker in self.workers.values():
            busy = worker["busy_seconds"]
            rates = {f"{kind}_per_second": round(worker[kind] / busy, 3) if busy > 0 else None for kind in ("images", "tiles") if worker[kind]}
            table.append({**worker, "busy_seconds": round(busy, 3), **rates})
        return table

    def to_dict(self) -> dict[str, Any]:
        counts = {
            "images": self.images,
            "done": len(self.done),
            "skipped": len(self.skipped),
            "failed": len(self.failed),
            "not_finished": self.not_finished,
            **self.tile_totals(),
        }
        return {
            "output": str(self.output),
            "mode": self.mode,
            "interrupted": self.interrupted,
            "counts": counts,
            "seconds": round(self.seconds, 3),
            "device": self.device,
            "peak_memory_bytes": self.peak_memory_bytes,
            "engine": self.engine,
            "workers": self.worker_table(),
            "settings": self.settings,
            "done": self.done,
            "skipped": self.skipped,
            "failed": self.failed,
        }

    def tile_totals(self) -> dict[str, int]:
        """Tiles and encoder passes over the images done, when the run tiled (else empty)."""
        tiled = [d for d in self.done if "tiles" in d]
        if not tiled:
            return {}
        return {"tiles": sum(d["tiles"] for d in tiled), "encoder_passes": sum(d["encoder_passes"] for d in tiled)}

    def line(self) -> str:
        """One line for the terminal."""
        state = "interrupted" if self.interrupted else "finished"
        totals = self.tile_totals()
        tiles = f" ({totals['tiles']} tiles, {totals['encoder_passes']} encoder passes)" if totals else ""
        peak = f", peak memory {self.peak_memory_bytes / 2**20:.0f} MiB on {self.device}" if self.peak_memory_bytes else ""
        return (
            f"segment {state}: {len(self.done)} done{tiles}, {len(self.skipped)} skipped, {len(self.failed)} failed"
            f" in {self.seconds:.1f} s{peak}; summary: {self.output / SUMMARY_NAME}"
        )


class RunLog:
    """Appends timestamped lines to OUT/segment.log; echo=True lines also go to stderr above the bar."""

    def __init__(self, path: Path, echo: bool) -> None:
        self.file = open(path, "a", encoding="utf-8")
        self.echo = echo

    def __call__(self, message: str, *, echo: bool = False) -> None:
        self.file.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")
        self.file.flush()
        if echo and self.echo:
            tqdm.write(message, file=sys.stderr)
