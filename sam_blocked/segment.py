"""Batch segmentation of image files with SamPredictor or SamAutomaticMaskGenerator.

The library side of `sam-blocked segment`. Given the images (sam_blocked.inputs.images) and,
in prompt mode, their prompt sets (sam_blocked.inputs.prompts), it runs SAM with one encoder
pass per image, then one mask-decoder call per prompt set, or amg.py's automatic masks,
and writes each image's outputs (sam_blocked.outputs.images) plus, for the run (sam_blocked.summary):

    OUT/segment-summary.json, OUT/segment.log

Outputs are either complete or absent: a rerun skips images whose outputs all exist and
redoes the rest. A bad image fails alone, with a message in the log and the summary.
The masks come from sam_blocked.masks; the options are checked in sam_blocked.engines.options.

This is the run loop: it decides, here in the driver, what runs, what is skipped and
what failed, and writes the summary. The work on one image (sam_blocked.engines.unit) runs in an
engine (sam_blocked.engines): in this process, or over a Ray cluster.

With a tiling (SegmentOptions.tiling), an image larger than a tile goes tile by tile at
native resolution (sam_blocked.tiles: one encoder pass per tile used, masks as crops,
stitched) and every image is written as huge images are: label TIFF, COCO RLE, table.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from segment_anything.modeling import Sam
from tqdm import tqdm

from sam_blocked.engines.base import Engine, RunContext, UnitRecord
from sam_blocked.engines.local import LocalEngine
from sam_blocked.errors import SettingError, spell
from sam_blocked.inputs.images import ImageItem
from sam_blocked.masks import auto_masks, prompt_masks
from sam_blocked.engines.options import AMG_SETTINGS, SegmentOptions
from sam_blocked.outputs.images import remove_stray_partials, write_atomic
from sam_blocked.outputs.writer import OutputWriter
from sam_blocked.inputs.prompts import Prompt, match_prompts
from sam_blocked.summary import LOG_NAME, SUMMARY_NAME, RunLog, RunSummary
from sam_blocked.engines.unit import Job, available_bytes, make_outputs

__all__ = ["AMG_SETTINGS", "available_bytes", "LOG_NAME", "SUMMARY_NAME", "RunSummary", "SegmentOptions", "auto_masks", "prompt_masks", "segment_images"]


def segment_images(
    sam: Union[Sam, Engine],
    images: Sequence[ImageItem],
    output: str | os.PathLike,
    *,
    prompts: Optional[Mapping[str, list[Prompt]]] = None,
    options: Optional[SegmentOptions] = None,
    problems: Sequence[tuple[str, str]] = (),
    settings: Optional[Mapping[str, Any]] = None,
    progress: bool = True,
    names: Optional[Mapping[str, str]] = None,
) -> RunSummary:
    """Segment `images` into `output`, one encoder pass per image (or tile); bad images fail alone.

    Args:
        sam: the model (patched or not), already on its device and in its dtype: it runs in
            this process. Or an engine (sam_blocked.engines), e.g. a RayEngine: the images
            (or tiles) run on its workers, each with its own model.
        images: from collect_images.
        output: the output folder (created).
        prompts: from load_prompts: prompt mode (SamPredictor). None: automatic masks.
        options: formats, multimask, overlay, overwrite, max_pixels, amg settings, tiling
            (whose tile must be the model's input size).
        problems: (input, reason) to record as failed, e.g. collect_images' problems.
        settings: anything to record in the summary (model, flags).
        progress: show a tqdm bar and echo failures to stderr.
        names: how the front end spells a setting in messages and reasons (the CLI:
            FlagNames(), max_pixels as --max-pixels); default the settings' own names.

    Returns:
        The RunSummary, also written to output/segment-summary.json. A KeyboardInterrupt
        removes the unfinished images' partial files, writes the summary marked
        interrupted, and is raised again.
    """
    options = options or SegmentOptions()
    names = names or {}
    output = Path(output)
    engine: Engine = LocalEngine(sam) if isinstance(sam, torch.nn.Module) else sam
    if output.exists() and not output.is_dir():
        raise SettingError(f"{{output}} {output} is a file: give a folder", "output")
    if prompts is not None and options.amg:
        raise SettingError(f"automatic-mask settings ({', '.join(options.amg)}) apply to {{auto}} only, not to {{prompts}}", "auto", "prompts")
    matched: dict[ImageItem, list[Prompt]] = {}
    missing: list[tuple[str, str]] = []
    if prompts is not None:
        matched, missing = match_prompts(prompts, images)
    mode = "auto" if prompts is None else "prompts"
    where = engine.prepare(options, prompts is not None)  # refuses what it cannot run, before anything is written
    try:
        output.mkdir(parents=True, exist_ok=True)
        recorded = {**vars(options), "tiling": None if options.tiling is None else vars(options.tiling)}
        summary = RunSummary(output, mode, {"options": _jsonable(recorded), **_jsonable(dict(settings or {}))}, engine=engine.name)
        summary.images = len(images)
        log = RunLog(output / LOG_NAME, echo=progress)
    except BaseException:
        engine.close()
        raise
    log(f"run started: {len(images)} image(s), mode {mode}; settings {json.dumps(summary.settings)}")
    log(where, echo=engine.name != "local")  # where the work goes; a Ray cluster's worth a line on the terminal
    run = _Run(summary, log)
    for arg, reason in [*problems, *missing]:
        run.fail(arg, reason)
    jobs, outputs = _plan_jobs(images, output, options, matched if prompts is not None else None, names, run)
    folders = {p.parent for current in outputs.values() for p in current.finals()}
    remove_stray_partials(folders)  # what workers of an earlier run left when they died

    context = RunContext(output, options, prompts is not None, log, lambda name, done, total: None, names)
    started = time.perf_counter()
    # disable=None: a bar on a terminal only, so logs of overnight runs stay readable
    bar = tqdm(total=len(jobs), unit="image", desc="segment", disable=None if progress else True, file=sys.stderr, dynamic_ncols=True)
    context.on_tile = lambda name, done, total: bar.set_postfix_str(f"{name}: tile {done}/{total}")
    finished: set[int] = set()
    try:
        for job, entry, units in engine.run(jobs, context):
            finished.add(job.position)
            outputs[job.position].clean()
            run.finished(job, entry, units)
            bar.update(1)
            bar.set_postfix_str(f"failed={len(summary.failed)}", refresh=False)
    except BaseException as error:
        run.stopped(error, len(jobs) - len(finished))
        raise
    finally:
        engine.close()  # stops the workers: nothing more is written
        for position, current in outputs.items():
            if position not in finished:
                current.clean()
        remove_stray_partials(folders)
        bar.close()
        summary.seconds = time.perf_counter() - started
        run.close(output)
    return summary


class _Run:
    """The run's summary as entries come in, each listed in its image's place, and its log."""

    def __init__(self, summary: RunSummary, log: RunLog) -> None:
        self.summary, self.log = summary, log
        self.order: dict[int, int] = {}  # id(entry) -> position of its image: the summary lists keep the images' order

    def fail(self, image: str, reason: str, position: int = -1, entry: Optional[dict] = None) -> None:
        entry = {"image": image, "reason": reason, **(entry or {})}
        self.order[id(entry)] = position
        self.summary.failed.append(entry)
        self.log(f"failed {image}: {reason}", echo=True)

    def skip(self, item: ImageItem, reason: str, position: int) -> None:
        entry = {"image": item.name, "reason": reason}
        self.order[id(entry)] = position
        self.summary.skipped.append(entry)

    def finished(self, job: Job, entry: dict[str, Any], units: list[UnitRecord]) -> None:
        """An engine's result for one image: done, or failed with its reason."""
        summary = self.summary
        _record_units(summary, entry, units)
        self.order[id(entry)] = job.position
        if "reason" in entry:
            self.fail(job.item.name, entry["reason"], job.position, entry)
            return
        summary.done.append(entry)
        peak = entry.get("peak_memory_bytes")
        if peak is not None:
            summary.peak_memory_bytes = max(summary.peak_memory_bytes or 0, peak)
        tiles = f", {entry['tiles']} tile(s), {entry['encoder_passes']} encoder pass(es)" if "tiles" in entry else ""
        self.log(f"done {job.item.name}: {entry['masks']} mask(s){tiles} in {entry['seconds']} s" + "".join(f"; {n}" for n in entry["notes"]))

    def stopped(self, error: BaseException, not_finished: int) -> None:
        self.summary.not_finished = not_finished
        if isinstance(error, KeyboardInterrupt):
            self.summary.interrupted = True
            self.log(f"interrupted: no partial files left; {not_finished} image(s) not finished", echo=True)
        else:
            self.log(f"stopped ({type(error).__name__}: {error}); {not_finished} image(s) not finished", echo=True)

    def close(self, output: Path) -> None:
        """Write the summary, entries in the images' order, and close the log."""
        summary = self.summary
        for entries in (summary.done, summary.skipped, summary.failed):
            entries.sort(key=lambda e: self.order.get(id(e), -1))  # stable: inputs that named nothing first, then images in order
        write_atomic(output / SUMMARY_NAME, lambda f: f.write(json.dumps(summary.to_dict(), indent=1).encode()))
        self.log(summary.line())
        self.log.file.close()


def _plan_jobs(
    images: Sequence[ImageItem],
    output: Path,
    options: SegmentOptions,
    matched: Optional[dict[ImageItem, list[Prompt]]],
    names: Mapping[str, str],
    run: _Run,
) -> tuple[list[Job], dict[int, OutputWriter]]:
    """Decided here, before anything is sent to the engine: clashes, skips and resumes.
    Returns the jobs to run and their writers, by position (matched: None in automatic mode)."""
    claimed = {output / SUMMARY_NAME: "the run summary", output / LOG_NAME: "the run log"}
    jobs: list[Job] = []
    outputs: dict[int, OutputWriter] = {}
    for position, item in enumerate(images):
        current = make_outputs(output, item, options)
        clash = next((claimed[p] for p in current.finals() if p in claimed), None)
        if clash is not None:
            clashes = SettingError(f"its output name {item.stem!r} is already used by {clash}: rename one, or run them into different {{output}} folders", "output")
            run.fail(item.name, spell(clashes, names), position)
            continue
        claimed.update({p: str(item.path) for p in current.finals()})
        current.clean()
        if matched is not None and item not in matched:
            run.log(f"skipped {item.name}: no prompts")
            run.skip(item, "no prompts for it in the prompt file", position)
        elif not options.overwrite and current.complete():
            run.log(f"skipped {item.name}: outputs already complete")
            run.skip(item, spell(SettingError("outputs already complete ({overwrite} redoes them)", "overwrite"), names), position)
        else:
            jobs.append(Job(position, item, tuple((matched or {}).get(item, ()))))
            outputs[position] = current
    return jobs, outputs


def _record_units(summary: RunSummary, entry: dict[str, Any], units: list[UnitRecord]) -> None:
    """Count the units against their workers; the image's entry names the nodes and workers that did it."""
    summary.add_units(units)
    if units:
        entry["nodes"] = sorted({u.node for u in units})
        entry["workers"] = sorted({u.worker for u in units})
    devices = sorted({w["device"] for w in summary.workers.values() if w["device"]})
    if devices:
        summary.device = ", ".join(devices)
    loaded = next((u for u in units if u.model is not None), None)
    if loaded is not None and summary.settings.get("model") is None:  # the workers loaded the model: say which
        summary.settings["model"], summary.settings["random_weights"] = loaded.model, loaded.random_weights


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))
