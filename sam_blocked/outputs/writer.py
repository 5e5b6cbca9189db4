"""The one interface of an image's output writer, whole image or huge image.

A writer owns the output files of one image, each either complete or absent. The run loop
(sam_blocked.segment) and every engine ask the same four things of it, whichever writer it is:

    writer.finals()              the paths its outputs will have (clash and resume checks)
    writer.complete()            whether a run wrote them all (resume skips the image)
    writer.clean()               remove what an interrupted run left (staging names only)
    writer.check(height, width)  refuse (InputError) an image it cannot write, before segmenting

How masks go in differs with what is written, and only the unit of work that made the
writer (sam_blocked.engines.unit) calls it: `ImageOutputs` (sam_blocked.outputs.images)
takes (H, W) masks one at a time, begin / add / commit; `HugeImageOutputs`
(sam_blocked.outputs.huge) takes every mask as a crop at once, commit(masks, ...).
Both subclass OutputWriter; sam_blocked.engines.unit.make_outputs picks one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable


@runtime_checkable
class OutputWriter(Protocol):
    """The output files of one image; see the module docstring."""

    def finals(self) -> list[Path]:
        """The paths this image's outputs will have (a mask folder as a folder)."""
        ...

    def complete(self) -> bool:
        """Whether every output is there, finished (an interrupted run leaves some out)."""
        ...

    def clean(self) -> None:
        """Remove what an interrupted run left under this writer's staging names."""
        ...

    def check(self, height: int, width: int) -> None:
        """Refuse (InputError) an image of this size that these outputs cannot hold."""
        ...

