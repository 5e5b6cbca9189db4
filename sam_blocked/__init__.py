"""sam_blocked: exact blocked attention for Segment Anything's image encoder."""

from sam_blocked.attention.blocked import blocked_attention, plan_blocks
from sam_blocked.attention.common import BlockPlan
from sam_blocked.attention.dispatch import BACKEND_CHOICES, BACKENDS, choose_backend, not_supported_reasons
from sam_blocked.models.checkpoints import detect_model_type, download_checkpoint, find_checkpoint, load_sam
from sam_blocked.models.registry import MODEL_TYPES, build_sam
from sam_blocked.memory.planner import MemoryPlan, largest_input_size, plan_memory
from sam_blocked.patch import BlockConfig, is_patched, patch_sam, patched, stock, unpatch_sam
from sam_blocked.switch import disable, enable, enabled, is_enabled
from sam_blocked.resolution import resample_pos_embed, resized, set_image_size
from sam_blocked.verify import EquivalenceReport, verify_equivalence

__all__ = [
    "BACKENDS",
    "BACKEND_CHOICES",
    "BlockConfig",
    "BlockPlan",
    "EquivalenceReport",
    "MODEL_TYPES",
    "MemoryPlan",
    "blocked_attention",
    "detect_model_type",
    "disable",
    "download_checkpoint",
    "enable",
    "enabled",
    "find_checkpoint",
    "load_sam",
    "not_supported_reasons",
    "build_sam",
    "choose_backend",
    "is_enabled",
    "is_patched",
    "largest_input_size",
    "patch_sam",
    "patched",
    "plan_memory",
    "plan_blocks",
    "resample_pos_embed",
    "resized",
    "set_image_size",
    "stock",
    "unpatch_sam",
    "verify_equivalence",
]
__version__ = "0.1.0"
