"""Where the units of work run: in this process (`LocalEngine`) or over a Ray cluster (`RayEngine`).

An engine is given the run's jobs (sam_blocked.engines.unit.Job: paths and prompt sets) and yields,
for each image as it finishes, its summary entry and the units of work that made it (an
image, or its tiles: which worker, on which node, how long). sam_blocked.segment's run
loop decides what runs, what is skipped and what failed, and writes the summary; engines
only run the work:

    segment_images(sam, images, out)                                     # LocalEngine(sam)
    segment_images(RayEngine(ModelSettings("vit_b"), workers=4, gpus_per_worker=1), images, out)

Ray is optional (`pip install 'sam-blocked[ray]'`) and imported only when a RayEngine is made.
"""

from __future__ import annotations

from sam_blocked.engines.base import Engine, RunContext, UnitRecord
from sam_blocked.engines.local import LocalEngine
from sam_blocked.engines.ray import RayEngine

__all__ = ["Engine", "LocalEngine", "RayEngine", "RunContext", "UnitRecord"]
