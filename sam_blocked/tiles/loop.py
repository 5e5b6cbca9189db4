"""One image tile by tile, in this process: plan, run each tile once, stitch.

`run_tiles` is the one tile loop: the batch run's unit of work (sam_blocked.engines.unit)
and `segment_tiled` (the demo's "segment everything") both go through it, each with its
own way to run one tile. Another engine (a pool of workers) calls the same pieces apart:
plan_tiles on the driver, segment_tile per task in the workers, stitch_tiles on the driver
(sam_blocked.engines.ray).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from segment_anything import SamPredictor

from sam_blocked.inputs.prompts import Prompt
from sam_blocked.tiles.crops import MaskCrop
from sam_blocked.tiles.plan import TileTask, Tiling, plan_points, plan_prompts
from sam_blocked.tiles.stitch import stitch_points, stitch_prompts
from sam_blocked.tiles.tile import DecodeSettings, Source, segment_tile


@dataclass
class TiledResult:
    """What a tiled image gave.

    Args:
        masks: the stitched MaskCrops.
        tiles: tiles in the image's grid.
        encoder_passes: tiles encoded (each once): in prompt mode only those the prompts need.
    """

    masks: list[MaskCrop]
    tiles: int
    encoder_passes: int


def segment_tiled(
    predictor: SamPredictor,
    source: Source,
    height: int,
    width: int,
    tiling: Tiling,
    *,
    prompts: Optional[Sequence[Prompt]] = None,
    points_per_side: int = 32,
    settings: DecodeSettings = DecodeSettings(),
    on_tile: Optional[Callable[[int, int], None]] = None,
) -> TiledResult:
    """Segment one image tile by tile at native resolution.

    Args:
        predictor: a SamPredictor whose model's input size is tiling.tile.
        source: the image: an ImageSource, an (H, W, 3) uint8 array, or a path (then
            opened for each tile: pass an ImageSource to open it once).
        height, width: the image size.
        tiling: tile size and overlap.
        prompts: prompt sets in whole-image pixels (prompt mode); None: automatic masks.
        points_per_side: automatic mode: grid points per tile side (SAM's density per tile).
        settings: decoding and amg.py's filters.
        on_tile: called with (tiles done, tiles to do) after each tile.

    Raises:
        InputError: a prompt set no tile holds (plan_prompts).
    """
    size = predictor.model.image_encoder.img_size
    if size != tiling.tile:
        raise ValueError(f"the model's input size is {size} px but the tile is {tiling.tile} px: the tile must be the input size")
    tasks = plan_tiles(tiling, height, width, prompts, points_per_side)
    masks = run_tiles(tasks, lambda task: segment_tile(predictor, source, task, settings), prompts is not None, settings, on_tile)
    return TiledResult(masks, len(tiling.boxes(height, width)), len(tasks))


def run_tiles(
    tasks: Sequence[TileTask],
    segment_one: Callable[[TileTask], list[MaskCrop]],
    prompt_mode: bool,
    settings: DecodeSettings,
    on_tile: Optional[Callable[[int, int], None]] = None,
) -> list[MaskCrop]:
    """The tile loop: each task's crops, in order, once each, then the image's masks stitched.

    Args:
        tasks: from plan_tiles.
        segment_one: one tile's crops (segment_tile, or a caller's wrapper around it).
        prompt_mode: stitch prompt sets (stitch_prompts), else grid points (stitch_points).
        settings: decoding settings (box_nms_thresh for stitching points).
        on_tile: called with (tiles done, tiles to do) after each tile.
    """
    crops: list[MaskCrop] = []
    for done, task in enumerate(tasks, start=1):
        crops += segment_one(task)
        if on_tile is not None:
            on_tile(done, len(tasks))
    return stitch_tiles(crops, prompt_mode, settings)


def plan_tiles(tiling: Tiling, height: int, width: int, prompts: Optional[Sequence[Prompt]], points_per_side: int) -> list[TileTask]:
    """The tiles to run: those the prompt sets need (prompt mode), else every tile owning grid points."""
    if prompts is not None:
        return plan_prompts(tiling, height, width, prompts)
    return plan_points(tiling, height, width, points_per_side)


def stitch_tiles(crops: Sequence[MaskCrop], prompt_mode: bool, settings: DecodeSettings) -> list[MaskCrop]:
    """The image's masks from every tile's crops (in any order of tiles): stitch_prompts or stitch_points."""
    return stitch_prompts(crops) if prompt_mode else stitch_points(crops, settings.box_nms_thresh)
