"""What every engine shares: the Engine protocol, the RunContext it is given, the UnitRecords it returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Protocol, Sequence

from sam_blocked.engines.options import SegmentOptions
from sam_blocked.engines.unit import Job


@dataclass(frozen=True)
class UnitRecord:
    """A unit of work done: an image or a tile, by which worker, where, in how many seconds.

    Args:
        worker: the worker's id ("local" for the local engine, a Ray actor id).
        node: the node's id (the host name for the local engine).
        kind: "image" or "tile".
        seconds: the worker's time on it.
        node_ip: the node's address, where known.
        pid: the worker's process.
        device: the device of its model.
        model: its model, as load_model describes it, where the worker loaded one itself.
        random_weights: whether that model has seeded random weights.
        restarts: how many times the worker had been restarted (it died) when it did this unit.
        threads: the worker's torch threads (intra-op) when it did this unit.
    """

    worker: str
    node: str
    kind: str
    seconds: float
    node_ip: Optional[str] = None
    pid: Optional[int] = None
    device: Optional[str] = None
    model: Optional[str] = None
    random_weights: Optional[bool] = None
    restarts: int = 0
    threads: Optional[int] = None


@dataclass
class RunContext:
    """What an engine needs to know of the run.

    Args:
        output: the output folder.
        options: the run's options.
        prompt_mode: prompt sets (SamPredictor), else automatic masks.
        log: takes a line for the run log (echo=True: also to the terminal).
        on_tile: called with (image name, tiles done, tiles to do) as tiles finish.
        names: how the front end spells a setting in failure reasons (the CLI: max_pixels is
            --max-pixels; sam_blocked.errors); settings a message names, as they are, where absent.
    """

    output: Path
    options: SegmentOptions
    prompt_mode: bool
    log: Callable[..., None]
    on_tile: Callable[[str, int, int], None]
    names: Mapping[str, str] = field(default_factory=dict)


class Engine(Protocol):
    """Runs jobs; see the module docstring."""

    name: str

    def prepare(self, options: SegmentOptions, prompt_mode: bool) -> str:
        """Check that it can run these options, start what it needs; returns one line for the
        log (where the work runs). Raises ValueError before anything is written."""
        ...

    def run(self, jobs: Sequence[Job], context: RunContext) -> Iterator[tuple[Job, dict[str, Any], list[UnitRecord]]]:
        """Yield (job, summary entry, units) for each job as it finishes, in any order; an
        entry with a "reason" failed. Every job is yielded once."""
        ...

    def close(self) -> None:
        """Release what prepare started (also after an interrupt)."""
        ...

