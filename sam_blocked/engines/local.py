"""The local engine: every image in this process, one after the other, on the model it is given."""

from __future__ import annotations

import os
import socket
import time
from typing import Any, Iterator, Optional, Sequence

import torch
from segment_anything.modeling import Sam

from sam_blocked.engines.base import RunContext, UnitRecord
from sam_blocked.engines.options import SegmentOptions
from sam_blocked.engines.unit import Job, Segmenter, make_outputs, segment_image


class LocalEngine:
    """Segment in this process with `sam` (already on its device, in its dtype, patched or not).

    Args:
        sam: the model.
    """

    name = "local"

    def __init__(self, sam: Sam) -> None:
        self.sam = sam
        self.segmenter: Optional[Segmenter] = None

    def prepare(self, options: SegmentOptions, prompt_mode: bool) -> str:
        self.segmenter = Segmenter(self.sam, options, prompt_mode)  # refuses a tile that is not the input size
        return f"local engine, device {self.segmenter.device}"

    def run(self, jobs: Sequence[Job], context: RunContext) -> Iterator[tuple[Job, dict[str, Any], list[UnitRecord]]]:
        if self.segmenter is None:
            raise RuntimeError("LocalEngine.run before prepare")
        node, device = socket.gethostname(), str(self.segmenter.device)
        for job in jobs:
            outputs = make_outputs(context.output, job.item, context.options)

            def on_tile(done: int, total: int, name: str = job.item.name) -> None:
                context.on_tile(name, done, total)

            started = time.perf_counter()
            entry = segment_image(self.segmenter, job, outputs, context.log, on_tile, context.names)
            unit = UnitRecord("local", node, "image", time.perf_counter() - started, pid=os.getpid(), device=device, threads=torch.get_num_threads())
            yield job, entry, [unit]

    def close(self) -> None:
        self.segmenter = None
