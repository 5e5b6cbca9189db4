"""SamAutomaticMaskGenerator with stock's settings and records, its per-batch work bounded.

`BlockedMaskGenerator` is segment_anything's generator (every setting, every output_mode,
crop layers, `generate` itself unchanged) with two steps replaced: `_process_batch`
(sam_blocked.automatic.batch.process_batch: the decoder without a copy of the image per
point, the masks the IoU filter drops never upsampled, the rest a few masks at a time) and
`postprocess_small_regions` (one full-size mask at a time). The switch
(sam_blocked.enable) installs the same two steps on SamAutomaticMaskGenerator itself, and on
SAM-HQ's, so scripts that build the stock generator get them too.

    generator = BlockedMaskGenerator(sam, points_per_side=32, max_block_mb=64)
    records = generator.generate(image)          # the records SamAutomaticMaskGenerator returns
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
from segment_anything import SamAutomaticMaskGenerator
from segment_anything.utils.amg import MaskData

from sam_blocked.automatic.batch import postprocess_small_regions, process_batch
from sam_blocked.automatic.decoder import budget_bytes
from sam_blocked.attention.common import check_max_block_mb


def decoder_budget_mb(model: Any) -> Optional[float]:
    """The max_block_mb a patched model's mask decoder carries (patch_sam's settings), else None."""
    config = getattr(getattr(model, "mask_decoder", None), "blocked_config", None)
    return getattr(config, "max_block_mb", None)


class BlockedMaskGenerator(SamAutomaticMaskGenerator):
    """SamAutomaticMaskGenerator(model, ...) with the same records, in bounded memory.

    Args:
        model: a segment_anything Sam.
        *args, **kwargs: SamAutomaticMaskGenerator's (points_per_side, points_per_batch,
            pred_iou_thresh, ..., output_mode).
        max_block_mb: MiB for one step's tensors (a chunk of points in the decoder, a few
            full-size masks after it); None: 64.
    """

    def __init__(self, model: Any, *args: Any, max_block_mb: Optional[float] = None, **kwargs: Any) -> None:
        super().__init__(model, *args, **kwargs)
        self.budget_bytes = budget_bytes(check_max_block_mb(max_block_mb))

    def _process_batch(self, points: np.ndarray, im_size: tuple[int, ...], crop_box: list[int], orig_size: tuple[int, ...]) -> MaskData:
        return process_batch(self, points, im_size, crop_box, orig_size, self.budget_bytes)

    postprocess_small_regions = staticmethod(postprocess_small_regions)
