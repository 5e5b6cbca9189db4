"""Prove on the user's own model that the patched encoder matches its library's stock encoder.

Any model the adapters know (sam_blocked.adapters): segment_anything and
segment_anything_hq Sams through their own SamPredictor (embeddings and masks), their
ImageEncoderViTs, transformers' SamModel / SamVisionModel and SamHQ counterparts, and
timm's VisionTransformerSAM (every tensor the library's encoder call returns).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

import numpy as np
import torch

from sam_blocked import adapters
from sam_blocked.adapters.base import EncoderCall
from sam_blocked.attention.common import DEFAULT_CHUNKS
from sam_blocked.patch import patched, stock

# Largest |patched - stock| allowed, relative to max |stock|, per encoder dtype. float32
# differs only by summation order; half precision by one rounding of each block's output.
TOLERANCES = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}
MIN_MASK_IOU = 0.99


@dataclass
class EquivalenceReport:
    """What verify_equivalence measured. `passed` needs the embedding within tolerance and,
    when masks were compared, every prompt's mask IoU >= MIN_MASK_IOU."""

    max_abs_error: float
    max_rel_error: float  # max |patched - stock| / max |stock|
    tolerance: float
    dtype: str
    input_size: int
    chunks: int
    max_block_mb: Optional[float]
    backend: str
    mask_ious: list[float] = field(default_factory=list)
    passed: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        blocking = f"max_block_mb={self.max_block_mb:g}" if self.max_block_mb is not None else f"chunks={self.chunks}"
        lines = [
            f"image encoder, {self.input_size} px, {self.dtype}, {blocking}, backend {self.backend}",
            f"  max abs error   {self.max_abs_error:.3e}",
            f"  max rel error   {self.max_rel_error:.3e}   (tolerance {self.tolerance:.0e})",
        ]
        if self.mask_ious:
            ious = ", ".join(f"{iou:.4f}" for iou in self.mask_ious)
            lines.append(f"  mask IoU        {ious}   (stock vs patched, {len(self.mask_ious)} point prompts; need >= {MIN_MASK_IOU})")
        lines.append("PASS: patched encoder matches stock" if self.passed else "FAIL: patched encoder differs from stock")
        return "\n".join(lines)


def _encoder_call(model: torch.nn.Module) -> EncoderCall:
    call = adapters.encoder_call(model)
    if call is None:
        raise ValueError(
            f"verify_equivalence takes a SAM model or image encoder of segment_anything, segment_anything_hq, "
            f"transformers or timm, got {type(model).__qualname__}"
        )
    return call


def _flat(output) -> torch.Tensor:
    """Every tensor of an encoder's output (a tensor, or tuples / lists of them) as one float32 vector."""
    if isinstance(output, torch.Tensor):
        return output.float().flatten()
    return torch.cat([_flat(o) for o in output])


def _seeded_image(size: int, seed: int) -> np.ndarray:
    """A smooth random RGB image (low-frequency noise upsampled), (size, size, 3) uint8."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, 16, 16, generator=generator)
    image = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    return (image.clamp(0, 1)[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()


def _point_prompts(height: int, width: int, count: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([rng.uniform(0, width - 1, count), rng.uniform(0, height - 1, count)], axis=1)  # (count, 2) x, y


def _mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


@torch.no_grad()
def verify_equivalence(
    model: torch.nn.Module,
    image: Optional[np.ndarray] = None,
    *,
    chunks: int = DEFAULT_CHUNKS,
    max_block_mb: Optional[float] = None,
    backend: str = "auto",
    points: int = 3,
    seed: int = 0,
) -> EquivalenceReport:
    """Run the image encoder stock and patched on the same input and compare.

    The model is left patched or not exactly as it came in.

    Args:
        model: a segment_anything or segment_anything_hq Sam (embeddings and masks are
            compared, through that library's SamPredictor), or their ImageEncoderViT,
            transformers' SamModel, SamVisionModel, SamHQModel, SamHQVisionModel, or timm's
            VisionTransformerSAM (every tensor the encoder returns is compared); on its
            device and in its dtype.
        image: (H, W, 3) uint8 RGB; default a seeded smooth random image at the model's size.
        chunks, max_block_mb, backend: the patch to verify, as patch_sam takes them.
        points: number of seeded single-point prompts whose masks are compared (Sams only).
        seed: seeds the default image and the prompt points.
    """
    call = _encoder_call(model)
    size = call.size
    parameter = next(model.parameters())
    dtype = parameter.dtype
    if image is None:
        image = _seeded_image(size, seed)
    if not (isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8):
        raise ValueError("image must be an (H, W, 3) uint8 RGB array")

    if call.predictor is not None:
        predictor = call.predictor(model)
        prompts = _point_prompts(image.shape[0], image.shape[1], points, seed)
        runs = []
        for context in (stock(model), patched(model, chunks, max_block_mb, backend)):
            with context:
                predictor.set_image(image)
                masks = [
                    predictor.predict(point_coords=p[None], point_labels=np.array([1]), multimask_output=False)[0][0]
                    for p in prompts
                ]
                features = [predictor.features, *getattr(predictor, "interm_features", [])]  # SAM-HQ: also its early layers
                runs.append((_flat(features), masks))
        (reference, ref_masks), (result, masks) = runs
        ious = [_mask_iou(a, b) for a, b in zip(ref_masks, masks)]
    else:
        x = torch.as_tensor(image, device=parameter.device).permute(2, 0, 1)[None].float()
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        x = ((x - x.mean()) / x.std().clamp_min(1e-6)).to(dtype)
        with stock(model):
            reference = _flat(call.run(x))
        with patched(model, chunks, max_block_mb, backend):
            result = _flat(call.run(x))
        ious = []

    max_abs = (result - reference).abs().max().item()
    max_rel = max_abs / max(reference.abs().max().item(), 1e-12)
    tolerance = TOLERANCES.get(dtype, 1e-4)
    passed = bool(np.isfinite(max_rel) and max_rel <= tolerance and all(iou >= MIN_MASK_IOU for iou in ious))
    return EquivalenceReport(
        max_abs_error=max_abs,
        max_rel_error=max_rel,
        tolerance=tolerance,
        dtype=str(dtype).replace("torch.", ""),
        input_size=size,
        chunks=chunks,
        max_block_mb=max_block_mb,
        backend=backend,
        mask_ious=ious,
        passed=passed,
    )
