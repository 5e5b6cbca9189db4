"""sam_blocked: exact blocked attention for Segment Anything's image encoder."""

from sam_blocked.attention import BlockPlan, blocked_attention, plan_blocks
from sam_blocked.models import MODEL_TYPES, build_sam
from sam_blocked.patch import BlockConfig, is_patched, patch_sam, patched, stock, unpatch_sam

__all__ = [
    "BlockConfig",
    "BlockPlan",
    "MODEL_TYPES",
    "blocked_attention",
    "build_sam",
    "is_patched",
    "patch_sam",
    "patched",
    "plan_blocks",
    "stock",
    "unpatch_sam",
]
__version__ = "0.1.0"
