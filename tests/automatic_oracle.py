"""Stock SamAutomaticMaskGenerator as the oracle for sam_blocked.automatic: a small peaked SAM,
a recorder of stock's full-size logits, and the comparison of two record lists.

"The same records" (the issue's definition): matched one to one by crop, point and mask;
predicted_iou and stability_score within 1e-5 relative; segmentations equal except pixels
whose stock logit lies within float rounding of the threshold; a record on one side only
only where a score lies within 1e-4 of its threshold, named.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from segment_anything.utils.amg import rle_to_mask

from sam_blocked.models.registry import build_sam

SCORE_RTOL = 1e-5  # predicted_iou, stability_score: the reassociated decoder's float32 rounding, relative
# ... and absolute for predicted_iou, on the IoU head's scale: its outputs are of order one, so a
# score near zero carries the head's rounding (measured up to 1.04e-6 here), large relative to
# the score itself; 1e-5 of the head's order-one scale is the decoder test's bound (DECODER_RTOL)
SCORE_ATOL = 1e-5
LOGIT_RTOL = 1e-5  # a pixel may differ only where |stock logit - threshold| <= this x the mask's largest |logit|
EDGE_ATOL = 1e-4
HYPER_GAIN = 30.0


def peaked_sam(img_size: int = 256, seed: int = 0, model_type: str = "tiny") -> torch.nn.Module:
    """A seeded SAM whose decoder attention is peaked (its q projections scaled up) and whose
    masks cross the threshold in places: logits of order one with structure from the image."""
    sam = build_sam(model_type, img_size=img_size, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in sam.mask_decoder.named_parameters():
            if p.dim() >= 2:
                gain = 4.0 if name.endswith("q_proj.weight") else HYPER_GAIN if name.startswith("output_hypernetworks_mlps") and name.endswith("layers.2.weight") else 1.0
                p.copy_(torch.randn(p.shape, generator=g) * gain / math.sqrt(math.prod(p.shape[1:])))
            elif not ("norm" in name):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        _center_masks(sam)
    return sam.eval()


def _center_masks(sam: torch.nn.Module) -> None:
    """Make the hypernetworks' outputs orthogonal to the mean upscaled embedding of a photo, so
    each mask's logits vary around zero with the image (random weights otherwise give masks
    that are all in or all out)."""
    from segment_anything import SamPredictor
    from skimage import data

    predictor = SamPredictor(sam)
    predictor.set_image(data.astronaut())
    decoder = sam.mask_decoder
    up = decoder.output_upscaling(predictor.features)  # (1, C/8, 4h, 4w)
    u = up.mean(dim=(0, 2, 3))
    u = u / u.norm()
    project = torch.eye(len(u)) - torch.outer(u, u)
    for mlp in decoder.output_hypernetworks_mlps:
        last = mlp.layers[-1]
        last.weight.copy_(project @ last.weight)
        last.bias.copy_(project @ last.bias)


def record_stock_logits(generator: Any) -> dict:
    """Wrap a stock generator instance so each batch stores its full-size logits:
    {(crop x0, y0, x1, y1, point x, point y): (3, h, w) float32 at the crop's size}."""
    store: dict = {}
    stock_batch = generator._process_batch
    model = generator.predictor.model

    def batch(points, im_size, crop_box, orig_size, *args):
        stock_post = model.postprocess_masks

        def post(masks, input_size, original_size):
            out = stock_post(masks, input_size, original_size)
            for p, m in zip(points, out):
                store[(*(int(v) for v in crop_box), round(float(p[0]), 6), round(float(p[1]), 6))] = m.clone()
            return out

        model.postprocess_masks = post
        try:
            return stock_batch(points, im_size, crop_box, orig_size, *args)
        finally:
            del model.postprocess_masks

    generator._process_batch = batch
    return store


def as_mask(segmentation: Any) -> np.ndarray:
    if isinstance(segmentation, np.ndarray):
        return segmentation.astype(bool)
    if isinstance(segmentation["counts"], str):
        return mask_utils.decode({"size": segmentation["size"], "counts": segmentation["counts"].encode()}).astype(bool)
    return rle_to_mask(segmentation)


def _key(record: dict) -> tuple:
    x, y, w, h = (int(round(v)) for v in record["crop_box"])
    px, py = record["point_coords"][0]
    return (x, y, x + w, y + h, round(px - x, 6), round(py - y, 6))


def compare_records(stock: list[dict], ours: list[dict], logits: dict, settings: dict, threshold: float = 0.0) -> dict:
    """Assert `ours` are stock's records (module docstring); returns counts for the test to report."""
    unmatched = list(range(len(ours)))
    flipped_pixels = 0
    one_sided = []
    by_key: dict = {}
    for i, r in enumerate(ours):
        by_key.setdefault(_key(r), []).append(i)
    for s in stock:
        key = _key(s)
        candidates = [i for i in by_key.get(key, []) if i in unmatched]
        best = min(candidates, key=lambda i: abs(ours[i]["predicted_iou"] - s["predicted_iou"]), default=None)
        if best is None or not math.isclose(ours[best]["predicted_iou"], s["predicted_iou"], rel_tol=SCORE_RTOL, abs_tol=SCORE_ATOL):
            one_sided.append(("stock", s))
            continue
        unmatched.remove(best)
        o = ours[best]
        a, b = as_mask(s["segmentation"]), as_mask(o["segmentation"])
        assert a.shape == b.shape
        diff = np.argwhere(a != b)
        stored = logits.get(key)
        x0, y0 = key[0], key[1]
        crop = k = None
        if stored is not None:
            crop = stored.numpy()
            k = int(np.argmin([np.count_nonzero((crop[j] > threshold) != a[y0 : y0 + crop.shape[1], x0 : x0 + crop.shape[2]]) for j in range(len(crop))]))
        if not math.isclose(o["stability_score"], s["stability_score"], rel_tol=SCORE_RTOL, abs_tol=SCORE_RTOL):
            # The stability score is a ratio of pixel counts above threshold +- offset: a pixel whose
            # logit lies within float rounding of either level may count on one side only. Allowed:
            # as much change as those pixels can make, counted from stock's own logits.
            assert crop is not None, f"{key}: stability {o['stability_score']} against {s['stability_score']}, stock's logits not recorded"
            offset = settings.get("stability_score_offset", 1.0)
            tol = LOGIT_RTOL * float(np.abs(crop[k]).max())
            near_hi = np.count_nonzero(np.abs(crop[k] - (threshold + offset)) <= tol)
            near_lo = np.count_nonzero(np.abs(crop[k] - (threshold - offset)) <= tol)
            union = np.count_nonzero(crop[k] > threshold - offset)
            allowed = (near_hi + near_lo) / max(1, union - near_lo) * 1.001 + 1e-7  # + the float32 rounding of the ratio itself
            assert abs(o["stability_score"] - s["stability_score"]) <= allowed, (key, o["stability_score"], s["stability_score"], near_hi, near_lo)
        if len(diff):
            assert crop is not None, f"{key}: {len(diff)} pixels differ and stock's logits were not recorded"
            values = crop[k][diff[:, 0] - y0, diff[:, 1] - x0]
            scale = float(np.abs(crop[k]).max())
            worst = float(np.abs(values - threshold).max())
            assert worst <= LOGIT_RTOL * scale, f"{key}: {len(diff)} pixels differ, one with stock logit {worst:.3g} from the threshold (scale {scale:.3g})"
            flipped_pixels += len(diff)
        for field in ("area", "bbox"):
            if not len(diff):
                assert o[field] == s[field], (key, field, o[field], s[field])
    one_sided += [("ours", ours[i]) for i in unmatched]
    for side, r in one_sided:
        near = abs(r["predicted_iou"] - settings.get("pred_iou_thresh", 0.88)) <= EDGE_ATOL or abs(r["stability_score"] - settings.get("stability_score_thresh", 0.95)) <= EDGE_ATOL
        assert near, f"a record kept by {side} only, with no score within {EDGE_ATOL} of its threshold: {_key(r)} iou {r['predicted_iou']} stability {r['stability_score']}"
    return {"records": len(stock), "flipped_pixels": flipped_pixels, "one_sided": len(one_sided)}
