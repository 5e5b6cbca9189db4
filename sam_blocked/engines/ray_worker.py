"""The Ray side of the Ray engine: one worker (a class-based map_batches UDF) per model.

A `SegmentWorker` loads its model once, in `__init__`, from ModelSettings and a BlockConfig,
on the GPU Ray gives it when it has one. Each call gets one unit of work, pickled: an
image (segmented and written here, under staging names unique to this attempt) or a
tile / a whole image written as huge images are (its masks go back to the driver as
packed crops). It returns the result, pickled: the summary entry or the crops, and which
worker did it, where, in how long. Only paths, boxes, settings and records travel.

An `Attempts` actor counts the attempts at each unit: Ray restarts a worker that died
and runs its units again, forever; a unit whose worker died `max_attempts` times (an
image that gets the worker killed for memory, a decoder that crashes) fails instead.
"""

from __future__ import annotations

import os
import pickle
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import ray
import torch

from sam_blocked.encoder.layer import BlockConfig
from sam_blocked.errors import SettingError, spell
from sam_blocked.models.load import ModelSettings, load_model
from sam_blocked.memory.measure import peak_bytes, reset_peak_memory
from sam_blocked.engines.options import SegmentOptions
from sam_blocked.outputs.images import ImageOutputs, unique_token
from sam_blocked.tiles.crops import MaskCrop
from sam_blocked.tiles.plan import TileTask
from sam_blocked.inputs.base import ImageSource
from sam_blocked.inputs.sources import open_image
from sam_blocked.engines.unit import Job, Segmenter, failure_reason, make_outputs, segment_image, tile_crops, whole_crops

# How the tests kill a worker in the middle of an image: the first worker to write a mask of
# image EXIT_AT (its name) exits at once, once: it creates the marker file EXIT_MARKER first.
EXIT_AT, EXIT_MARKER = "SAM_BLOCKED_TEST_EXIT_AT", "SAM_BLOCKED_TEST_EXIT_MARKER"


@dataclass(frozen=True)
class Unit:
    """One unit of work, as sent to a worker.

    Args:
        index: its index in the run's units.
        kind: "image" (segmented and written by the worker), "whole" (a huge-output image in
            one pass: crops back) or "tile" (crops back).
        job: the image: an absolute path, its name, its prompt sets.
        task: the tile's work, for kind "tile".
    """

    index: int
    kind: str
    job: Job
    task: Optional[TileTask] = None


@ray.remote(num_cpus=0)
class Attempts:
    """Counts the attempts at each unit, and the starts of each worker, across worker restarts."""

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.starts: dict[str, int] = {}

    def started(self, worker: str) -> int:
        """Count a worker's start (Ray restarts a dead one under the same id); returns its restarts."""
        self.starts[worker] = self.starts.get(worker, 0) + 1
        return self.starts[worker] - 1

    def start(self, index: int) -> int:
        self.counts[index] = self.counts.get(index, 0) + 1
        return self.counts[index]


def pack_crops(crops: list[MaskCrop]) -> list[tuple]:
    """MaskCrops as (bits, shape, x0, y0, record): 1 bit a pixel on the wire."""
    return [(np.packbits(c.mask), c.mask.shape, c.x0, c.y0, c.record) for c in crops]


def unpack_crops(packed: list[tuple]) -> list[MaskCrop]:
    return [MaskCrop(np.unpackbits(bits, count=h * w).reshape(h, w).view(bool), x0, y0, record) for bits, (h, w), x0, y0, record in packed]


class SegmentWorker:
    """A Ray Data map_batches worker: one model, loaded once; one unit per call (batch_size=1).

    Args:
        settings: the model to load (an absolute checkpoint path, or None: seeded random weights).
        blocking: the patch; None leaves the model stock.
        options: the run's options.
        prompt_mode: prompt sets, else automatic masks.
        output: the run's output folder, absolute, on storage every node sees.
        attempts: the Attempts actor.
        max_attempts: attempts at one unit before it fails.
        threads: torch threads (the CPUs Ray reserved for the worker).
        names: how the front end spells settings in failure reasons (RunContext.names).
    """

    def __init__(
        self,
        settings: ModelSettings,
        blocking: Optional[BlockConfig],
        options: SegmentOptions,
        prompt_mode: bool,
        output: str,
        attempts: Any,
        max_attempts: int,
        threads: int,
        names: Optional[Mapping[str, str]] = None,
    ) -> None:
        _exit_mid_image_for_tests()
        torch.set_num_threads(threads)
        loaded = load_model(settings, blocking)
        if settings.checkpoint is None and not loaded.random_weights:
            refusal = SettingError(
                f"this worker found weights ({loaded.description}) that the driver did not: give {{checkpoint}}, a path every node sees", "checkpoint"
            )
            # It reaches the driver as text (in Ray's ActorDiedError), so it is spelled here, as the front end spells settings.
            raise SettingError(spell(refusal, names))
        self.segmenter = Segmenter(loaded.sam, options, prompt_mode)
        self.output, self.attempts, self.max_attempts, self.names = Path(output), attempts, max_attempts, names
        context = ray.get_runtime_context()
        worker = context.get_actor_id()[:12]
        self.identity = {
            "worker": worker,
            "restarts": ray.get(attempts.started.remote(worker)),
            "node": context.get_node_id()[:12],
            "node_ip": ray.util.get_node_ip_address(),
            "pid": os.getpid(),
            "device": str(self.segmenter.device),
            "model": loaded.description,
            "random_weights": loaded.random_weights,
            "threads": torch.get_num_threads(),
        }
        self._source: Optional[tuple[Path, ImageSource]] = None  # the image of the last tile, kept open

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        unit: Unit = pickle.loads(batch["unit"][0])
        attempt = ray.get(self.attempts.start.remote(unit.index))
        started = time.perf_counter()
        if attempt > self.max_attempts:
            result: dict[str, Any] = {"reason": spell(_died(attempt - 1), self.names)}
        else:
            result = self._run(unit)
        result.update(index=unit.index, seconds=time.perf_counter() - started, attempt=attempt, **self.identity)
        return {"result": [pickle.dumps(result)]}

    def _run(self, unit: Unit) -> dict[str, Any]:
        lines: list[str] = []
        if unit.kind == "image":
            outputs = make_outputs(self.output, unit.job.item, self.segmenter.options, token=unique_token())
            try:
                entry = segment_image(self.segmenter, unit.job, outputs, lines.append, names=self.names)
            finally:
                outputs.clean()
            return {"entry": entry, "log": lines}
        device = self.segmenter.device
        try:
            peak = reset_peak_memory(device)
            source = self._open(unit.job)
            crops = whole_crops(self.segmenter, source, unit.job.prompts) if unit.kind == "whole" else tile_crops(self.segmenter, source, unit.task)
            return {"crops": pack_crops(crops), "peak_memory_bytes": peak_bytes(device) if peak else None}
        except Exception as error:
            return {"reason": failure_reason(error, unit.job.item.name, device, self.segmenter.options, lines.append, self.names), "log": lines}

    def _open(self, job: Job) -> ImageSource:
        """The job's image, opened once for the tiles of it this worker gets in a row."""
        if self._source is None or self._source[0] != job.item.path:
            if self._source is not None:
                self._source[1].close()
                self._source = None
            self._source = (job.item.path, open_image(job.item.path, self.segmenter.options.max_pixels, self.segmenter.options.read))
        return self._source[1]


def _died(times: int) -> SettingError:
    return SettingError(
        f"the Ray worker segmenting it died {times} time(s) (killed for using too much memory, or a crash in a decoder?): "
        "see the Ray logs of its node; try a smaller {tile}, {points_per_batch} or fewer {workers} per node",
        "tile", "points_per_batch", "workers",
    )  # fmt: skip


def _exit_mid_image_for_tests() -> None:
    """With EXIT_AT and EXIT_MARKER set (tests only), exit after the first mask of that image is written."""
    name, marker = os.environ.get(EXIT_AT), os.environ.get(EXIT_MARKER)
    if not name or not marker:
        return
    add = ImageOutputs.add

    def add_then_exit(self: ImageOutputs, record: dict, mask: np.ndarray) -> None:
        add(self, record, mask)
        if self.item.name == name:
            try:
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return  # died once already: this attempt lives
            os._exit(1)

    ImageOutputs.add = add_then_exit
