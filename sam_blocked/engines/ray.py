"""The Ray engine: a run's images, or their tiles, spread over a Ray cluster with Ray Data.

    engine = RayEngine(ModelSettings("vit_b", "/shared/sam_vit_b_01ec64.pth"), address="auto", workers=8, gpus_per_worker=1)
    segment_images(engine, images, "/shared/masks")

This process is the driver. It connects to the cluster (`address`), turns the jobs the run
loop gives it into units of work, and sends them as one Ray Data dataset through a pool of
`workers` SegmentWorkers (sam_blocked.engines.ray_worker: a class-based map_batches UDF,
batch_size=1, one model each, loaded once) as results come back, in any order:

- an image written as png / coco is one unit: a worker reads it from storage every node
  sees, segments it and writes its outputs there, atomically, under staging names of its
  own (`.NAME.partial.<token>`): an image run twice after a worker died is never
  half-written or clobbered, and what the dead attempt left is removed by the run loop.
- an image written as huge images are (label TIFF, COCO RLE, table) is opened and planned
  here (a TIFF's header is read; other formats are decoded once), and each of its tiles is
  a unit (or the whole image, when it fits one tile): the masks come back as packed crops,
  and the driver stitches and writes them exactly as the local engine does.

Ray restarts a worker that died and runs its units again; a unit whose worker died
`max_attempts` times fails with a message instead of looping. Ray is imported only here,
when a RayEngine is made: `pip install 'sam-blocked[ray]'`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import pickle
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch

from sam_blocked.engines.base import RunContext, UnitRecord
from sam_blocked.errors import SettingError
from sam_blocked.inputs.images import ImageItem
from sam_blocked.encoder.layer import BlockConfig
from sam_blocked.models.load import ModelSettings
from sam_blocked.engines.options import SegmentOptions
from sam_blocked.tiles.crops import MaskCrop
from sam_blocked.inputs.sources import open_image
from sam_blocked.outputs.writer import OutputWriter
from sam_blocked.tiles.loop import stitch_tiles
from sam_blocked.tiles.tile import DecodeSettings
from sam_blocked.engines.unit import HugeImage, Job, failure_reason, finish_huge, make_outputs, plan_huge

INSTALL = "pip install 'sam-blocked[ray]'"
DEFAULT_IMG_SIZE = 1024  # every SAM model's input size unless ModelSettings.img_size says otherwise
# Ray Data settings for the run: no bars of its own (the run loop shows one), and a block
# whose worker failed is dropped rather than stopping the run (its unit then fails alone).
DATA_SETTINGS = {"enable_progress_bars": False, "print_on_execution_start": False, "max_errored_blocks": -1}


def import_ray() -> Any:
    """The ray module with Ray Data, or a SettingError (a ValueError) saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as error:
        raise SettingError(f"{{engine}} ray needs Ray Data, which is not installed ({error}): {INSTALL}", "engine") from None
    return ray


def worker_threads(cpus_per_worker: float) -> int:
    """A Ray worker's torch threads: the whole CPUs Ray reserves for it, at least one.

    Ray places workers on a node only while their num_cpus fit its CPUs, so with whole
    CPUs per worker the workers of a node together run at most as many threads as the node
    has CPUs: none of them waits at a parallel barrier on a thread that another worker's
    thread has descheduled. A fraction (--cpus-per-worker 0.5) still gets one thread, so
    such workers do share cores; give whole CPUs on a busy node."""
    return max(1, math.floor(cpus_per_worker))


class RayEngine:
    """Segment on a Ray cluster: one model per worker, images (or tiles) spread over the workers.

    Args:
        settings: the model each worker loads. The checkpoint is found here (as load_model
            finds it) and sent as an absolute path, which every node must see; without
            one, every worker builds the same seeded random weights.
        blocking: the patch (chunks or max_block_mb, backend); None leaves the models stock.
        address: "auto" (the cluster this node belongs to, or $RAY_ADDRESS), HOST:PORT, or
            None: the Ray instance this process is already connected to, else a new local
            one, never another cluster that runs on this machine (but $RAY_ADDRESS, as
            inside a Ray job, wins: Ray's rule).
        workers: workers, one model each; None: one per GPU of the cluster when workers
            get GPUs, else 1.
        gpus_per_worker: GPUs Ray gives each worker (0.5: two share one); None: 1 when the
            cluster has GPUs and settings.device is not "cpu", else 0.
        cpus_per_worker: CPUs Ray reserves for each worker; also its torch threads.
        max_attempts: a unit whose worker died this many times fails instead of being retried.
    """

    name = "ray"

    def __init__(
        self,
        settings: ModelSettings,
        blocking: Optional[BlockConfig] = BlockConfig(),
        *,
        address: Optional[str] = None,
        workers: Optional[int] = None,
        gpus_per_worker: Optional[float] = None,
        cpus_per_worker: float = 1.0,
        max_attempts: int = 3,
    ) -> None:
        import_ray()
        if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
            raise SettingError(f"{{workers}} {workers!r} must be a whole number >= 1", "workers")
        if gpus_per_worker is not None and not (_number(gpus_per_worker) and gpus_per_worker >= 0):
            raise SettingError(f"{{gpus_per_worker}} {gpus_per_worker!r} must be a number >= 0 (0.5: two workers share a GPU)", "gpus_per_worker")
        if not (_number(cpus_per_worker) and cpus_per_worker > 0):
            raise SettingError(f"{{cpus_per_worker}} {cpus_per_worker!r} must be a number > 0", "cpus_per_worker")
        if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1:
            raise ValueError(f"max_attempts {max_attempts!r} must be a whole number >= 1")
        if settings.device not in (None, "cpu", "cuda"):
            raise SettingError(
                f"{{device}} {settings.device}: each Ray worker sees only the GPUs Ray gives it ({{gpus_per_worker}}): give {{device}} cuda, or leave it out",
                "device", "gpus_per_worker",
            )  # fmt: skip
        if settings.device == "cpu" and gpus_per_worker:
            raise SettingError(
                f"{{device}} cpu with {{gpus_per_worker}} {gpus_per_worker}: the workers would hold GPUs they do not use; drop one", "device", "gpus_per_worker"
            )
        if settings.device == "cuda" and gpus_per_worker == 0:
            raise SettingError(
                "{device} cuda with {gpus_per_worker} 0: give each worker a GPU ({gpus_per_worker} 1, or 0.5 to share)", "device", "gpus_per_worker"
            )
        from sam_blocked.models.checkpoints import find_checkpoint

        checkpoint = settings.checkpoint or find_checkpoint("vit_h" if settings.model_type == "default" else settings.model_type)
        self.settings = dataclasses.replace(settings, checkpoint=None if checkpoint is None else os.path.abspath(os.path.expanduser(checkpoint)))
        self.blocking = blocking
        self.address = address
        self.workers, self.gpus_per_worker, self.cpus_per_worker = workers, gpus_per_worker, float(cpus_per_worker)
        self.max_attempts = max_attempts
        self._connected = False  # whether ray.init was called here (then close() shuts it down)
        self._attempts: Any = None
        self._options: Optional[SegmentOptions] = None
        self._prompt_mode = False

    def prepare(self, options: SegmentOptions, prompt_mode: bool) -> str:
        size = self.settings.img_size or DEFAULT_IMG_SIZE
        if options.tiling is not None and size != options.tiling.tile:
            raise SettingError(
                f"{{tile}} {options.tiling.tile} must be the model's input size ({{img_size}} {size}): set {{img_size}} to {options.tiling.tile}", "tile", "img_size"
            )
        ray = import_ray()
        if not ray.is_initialized():
            # "local": a new instance; Ray's None would join any cluster started on this machine
            ray.init(address=self.address or "local", logging_level=logging.WARNING)
            self._connected = True
        try:
            where = self._resources(ray)
        except BaseException:
            self.close()
            raise
        self._options, self._prompt_mode = options, prompt_mode
        return where

    def _resources(self, ray: Any) -> str:
        """Settle workers and GPUs per worker against the cluster; refuse what it cannot hold."""
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        cpus, gpus = (sum(n.get(k, 0.0) for n in nodes) for k in ("CPU", "GPU"))
        if self.gpus_per_worker is None:
            self.gpus_per_worker = 1.0 if gpus > 0 and self.settings.device != "cpu" else 0.0
        per_gpu = self.gpus_per_worker
        if self.workers is None:
            self.workers = max(1, int(gpus // per_gpu)) if per_gpu > 0 else 1
        need = f"{{workers}} {self.workers} x ({{cpus_per_worker}} {self.cpus_per_worker:g}, {{gpus_per_worker}} {per_gpu:g})"
        have = f"the cluster has {cpus:g} CPU(s) and {gpus:g} GPU(s) on {len(nodes)} node(s) (see `ray status`)"
        fits_a_node = any(n.get("CPU", 0.0) >= self.cpus_per_worker and n.get("GPU", 0.0) >= per_gpu for n in nodes)
        if not fits_a_node or self.workers * self.cpus_per_worker > cpus + 1e-9 or self.workers * per_gpu > gpus + 1e-9:
            raise SettingError(f"{need} does not fit: {have}; ask for fewer workers or resources, or add nodes", "workers", "cpus_per_worker", "gpus_per_worker")
        device = "cuda" if per_gpu > 0 else "cpu"
        self.settings = dataclasses.replace(self.settings, device=device)
        model = self.settings.checkpoint or "seeded random weights (no checkpoint found)"
        return f"ray engine: {self.workers} worker(s), {self.cpus_per_worker:g} CPU and {per_gpu:g} GPU each ({device}), model {model}; {have}"

    def run(self, jobs: Sequence[Job], context: RunContext) -> Iterator[tuple[Job, dict[str, Any], list[UnitRecord]]]:
        if self._options is None:
            raise RuntimeError("RayEngine.run before prepare")
        ray = import_ray()
        units, images, failed = self._plan_units(jobs, context)
        yield from failed
        if not units:
            return
        by_position = {job.position: job for job in jobs}
        seen: set[int] = set()
        with _data_settings(ray):
            rows = iter(self._dataset(ray, units, context).iter_rows())
            try:
                for row in _rows(rows):
                    result = pickle.loads(row["result"])
                    unit = units[result["index"]]
                    if unit.index in seen:  # a unit that came back twice counts once
                        continue
                    seen.add(unit.index)
                    for line in result.get("log", ()):
                        context.log(line)
                    yield from self._arrived(unit, by_position[unit.job.position], result, images, context)
            finally:
                getattr(rows, "close", lambda: None)()
        lost = "no result came back from the Ray workers (Ray Data dropped its block after an error: see the error above)"
        for unit in units:
            if unit.index not in seen:
                seen.add(unit.index)
                yield from self._arrived(unit, by_position[unit.job.position], {"reason": lost}, images, context)

    def _plan_units(self, jobs: Sequence[Job], context: RunContext) -> tuple[list, dict[int, "_HugeImage"], list[tuple[Job, dict[str, Any], list[UnitRecord]]]]:
        """The units of work: an image each, or a huge-output image's tiles (opened and planned here).
        Returns (units, the huge-output images by position, the jobs that failed planning as results)."""
        from sam_blocked.engines.ray_worker import Unit

        options = context.options
        units: list[Unit] = []
        images: dict[int, _HugeImage] = {}
        failed: list[tuple[Job, dict[str, Any], list[UnitRecord]]] = []
        for job in jobs:
            sent = Job(job.position, ImageItem(Path(os.path.abspath(job.item.path)), job.item.name), job.prompts)
            if not options.huge_outputs:
                units.append(Unit(len(units), "image", sent))
                continue
            outputs = make_outputs(context.output, job.item, options)
            try:
                with open_image(sent.item.path, options.max_pixels, options.read) as source:  # a TIFF: its header only
                    huge = plan_huge(source, sent, options, outputs, context.prompt_mode)
            except Exception as error:
                failed.append((job, {"image": job.item.name, "reason": failure_reason(error, job.item.name, _CPU, options, context.log, context.names)}, []))
                continue
            first = len(units)
            tasks = huge.tasks or [None]
            units += [Unit(first + i, "whole" if task is None else "tile", sent, task) for i, task in enumerate(tasks)]
            images[job.position] = _HugeImage(huge, outputs, len(tasks))
        return units, images, failed

    def _dataset(self, ray: Any, units: list, context: RunContext) -> Any:
        """The units as one Ray Data dataset through the pool of SegmentWorkers."""
        from sam_blocked.engines.ray_worker import Attempts, SegmentWorker

        self._attempts = Attempts.remote()
        kwargs = {
            "settings": self.settings,
            "blocking": self.blocking,
            "options": context.options,
            "prompt_mode": context.prompt_mode,
            "output": os.path.abspath(context.output),
            "attempts": self._attempts,
            "max_attempts": self.max_attempts,
            "threads": worker_threads(self.cpus_per_worker),
            "names": context.names,
        }
        dataset = ray.data.from_items([{"unit": pickle.dumps(u)} for u in units], override_num_blocks=len(units))
        return dataset.map_batches(
            SegmentWorker,
            fn_constructor_kwargs=kwargs,
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=self.workers, max_tasks_in_flight_per_actor=2),
            num_cpus=self.cpus_per_worker,
            num_gpus=self.gpus_per_worker,
        )

    def _arrived(
        self, unit: Any, job: Job, result: dict[str, Any], images: dict[int, "_HugeImage"], context: RunContext
    ) -> Iterator[tuple[Job, dict[str, Any], list[UnitRecord]]]:
        """One unit's result (or its loss: a result without a worker): yields the image's result once it is whole."""
        record = _record(result, "tile" if unit.kind == "tile" else "image") if "worker" in result else None
        if unit.kind == "image":
            yield job, result.get("entry") or {"image": job.item.name, "reason": result["reason"]}, [record] if record else []
            return
        image = images[job.position]
        if record is None:
            image.lost(unit.index, result["reason"])
        else:
            image.add(unit.index, result, record)
            if unit.kind == "tile":
                context.on_tile(job.item.name, image.arrived, image.units)
        if image.arrived == image.units:
            yield job, self._finish(job, image, context), image.records

    def _finish(self, job: Job, image: _HugeImage, context: RunContext) -> dict[str, Any]:
        """Stitch and write a huge image from its units' crops, here on the driver."""
        name = job.item.name
        if image.reason is not None:
            return {"image": name, "reason": image.reason}
        started = time.perf_counter()
        try:
            crops = [crop for index in sorted(image.crops) for crop in image.crops[index]]  # the tiles' order, as the local engine
            if image.huge.tasks is None:
                masks = crops
            else:
                masks = stitch_tiles(crops, context.prompt_mode, DecodeSettings.from_amg(context.options.amg, context.options.multimask))
            fields = finish_huge(image.huge, masks, image.outputs)
        except Exception as error:
            return {"image": name, "reason": failure_reason(error, name, _CPU, context.options, context.log, context.names)}
        seconds = sum(r.seconds for r in image.records) + time.perf_counter() - started
        peaks = [p for p in image.peaks if p is not None]
        return {"image": name, **fields, "seconds": round(seconds, 3), "peak_memory_bytes": max(peaks) if peaks else None}

    def close(self) -> None:
        ray = import_ray()
        if self._attempts is not None and ray.is_initialized():
            ray.kill(self._attempts)
        self._attempts = None
        if self._connected and ray.is_initialized():
            ray.shutdown()
        self._connected = False


_CPU = torch.device("cpu")  # the driver's device, for messages about work done here


@dataclass
class _HugeImage:
    """A huge-output image on the driver, waiting for its units' crops."""

    huge: HugeImage
    outputs: OutputWriter
    units: int
    crops: dict[int, list[MaskCrop]] = field(default_factory=dict)
    records: list[UnitRecord] = field(default_factory=list)
    peaks: list[Optional[int]] = field(default_factory=list)
    reason: Optional[str] = None
    arrived: int = 0

    def add(self, index: int, result: dict[str, Any], record: UnitRecord) -> None:
        from sam_blocked.engines.ray_worker import unpack_crops

        self.arrived += 1
        self.records.append(record)
        if "reason" in result:
            self.reason = self.reason or result["reason"]
        else:
            self.crops[index] = unpack_crops(result["crops"])
            self.peaks.append(result.get("peak_memory_bytes"))

    def lost(self, index: int, reason: str) -> None:
        self.arrived += 1
        self.reason = self.reason or reason


def _record(result: dict[str, Any], kind: str) -> UnitRecord:
    keys = ("node_ip", "pid", "device", "model", "random_weights", "restarts", "threads")
    return UnitRecord(result["worker"], result["node"], kind, result["seconds"], **{k: result.get(k) for k in keys})


def _rows(rows: Iterator[dict]) -> Iterator[dict]:
    """The dataset's rows; a failure of the whole run (e.g. no worker could load the model) as a ValueError."""
    try:
        yield from rows
    except Exception as error:
        first = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        raise ValueError(f"the Ray workers stopped: {first}") from error


@contextlib.contextmanager
def _data_settings(ray: Any) -> Iterator[None]:
    """DATA_SETTINGS on Ray Data's current context, and its INFO lines off, restored on exit."""
    context = ray.data.DataContext.get_current()
    saved = {key: getattr(context, key) for key in DATA_SETTINGS if hasattr(context, key)}
    logger = logging.getLogger("ray.data")
    level = logger.level
    try:
        for key in saved:
            setattr(context, key, DATA_SETTINGS[key])
        logger.setLevel(logging.ERROR)
        yield
    finally:
        for key, value in saved.items():
            setattr(context, key, value)
        logger.setLevel(level)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
