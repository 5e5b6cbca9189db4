"""SamAutomaticMaskGenerator's per-batch work, the same records in a bounded amount of memory.

Stock `_process_batch` decodes a batch of grid points (repeating the image embedding per
point), upsamples all 3 masks of every point to the image size in float32 before the
predicted-IoU filter drops most of them, and run-length encodes the survivors over whole
images. `process_batch` returns the same MaskData:

- the decoder runs on a chunk of points at a time without copying the image per point
  (sam_blocked.automatic.decoder);
- the predicted-IoU filter runs on the low-resolution masks (it reads only the scores), so
  the masks it drops are never upsampled;
- the survivors go through SAM's own steps (`Sam.postprocess_masks`, amg.py's
  `calculate_stability_score`, `batched_mask_to_box`, `is_box_near_crop_edge`,
  `uncrop_masks`) a few masks at a time, and `mask_to_rle` encodes them with numpy, mask by
  mask, into the same uncompressed RLE as amg.py's `mask_to_rle_pytorch`.

`postprocess_small_regions` is the generator's small-region step with one mask at full size
at a time instead of all of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.utils.amg import (
    MaskData,
    batched_mask_to_box,
    calculate_stability_score,
    is_box_near_crop_edge,
    remove_small_regions,
    rle_to_mask,
    uncrop_masks,
)
from torchvision.ops.boxes import batched_nms

from sam_blocked.attention.common import FP32_BYTES
from sam_blocked.attention.threads import run_steps, step_threads
from sam_blocked.automatic.decoder import DEFAULT_DECODER_BYTES, LAYER_TENSORS, decoder_reasons, predict_masks, prompts_per_chunk, upscale_per_chunk
from sam_blocked.automatic.workspace import Workspace

# per full-size mask in the post-processing, counted with headroom: its float32 logits at the
# image's size, the comparison and the bool mask (6 bytes a pixel) and as much again for what
# a step holds beside them (one mask at the model's size when the image is resized, the
# masks padded to the image when in a crop, the RLE's transposed copy)
POST_BYTES_PER_PIXEL = 2 * FP32_BYTES + 4


# automatic_tensor_bytes' counts, in (tokens x channels) float32 tensors ("planes"):
SHARED_PLANES = 5  # kept per image: the shared image side, its first-layer keys, values and queries, and the dense positional encoding
FRESH_PLANES = 2  # per prompt of a chunk, outside the workspace: a layer's keys and the next layer norm's output
SCORE_ROWS = 56  # heads x prompt-side tokens of a cross attention's scores (8 x 7 for a point prompt)


def automatic_tensor_bytes(tokens: int, pixels: int, budget_bytes: Optional[int] = None, channels: int = 256, masks: int = 3, prompts: Optional[int] = None) -> int:
    """The extra peak of tensors while process_batch runs (over the image embedding), for an
    image at the model's input size: the workspace's slots at their largest
    (workspace.Workspace), what is kept per image, a chunk's fresh tensors and its
    low-resolution masks, counted from the same chunk and step sizes the code uses.

    Args:
        tokens: image tokens of the embedding (h * w; 4096 at 1024 px).
        pixels: pixels of the image (or crop) the masks are upsampled to.
        budget_bytes: as process_batch's (None: the default).
        channels: the embedding's channels; masks: masks per point (3: multimask).
        prompts: prompts per batch, when fewer than a chunk (1: one prompt set).
    """
    chunk = min(prompts or 2**31, prompts_per_chunk(tokens, channels, budget_bytes))
    up = min(chunk, upscale_per_chunk(tokens, channels, budget_bytes))
    plane = tokens * channels * FP32_BYTES  # one prompt's image side
    scores = chunk * SCORE_ROWS * tokens * FP32_BYTES
    step_pixels = masks_per_step(pixels, budget_bytes) * pixels
    slots = (
        max(chunk * plane, up * 2 * plane, FP32_BYTES * step_pixels)  # a: keys + pe, the 2nd convolution, the logits
        + max(chunk * plane, up * plane)  # b: x + attention, the 1st convolution
        + step_pixels  # c: the comparisons (bool)
        + max(scores, step_pixels)  # d: scores, the masks (bool)
        + max(scores, up * 16 * tokens * masks * FP32_BYTES)  # e: softmax, the mask logits
    )
    low_res = chunk * masks * 16 * tokens * FP32_BYTES
    return SHARED_PLANES * plane + slots + FRESH_PLANES * chunk * plane + low_res


def masks_per_step(pixels: int, budget_bytes: Optional[int]) -> int:
    """Full-size masks post-processed together within the budget."""
    return max(1, (budget_bytes or DEFAULT_DECODER_BYTES) // (POST_BYTES_PER_PIXEL * pixels))


class RunLengths(list):
    """An RLE's counts: a list that `copy.deepcopy` shares instead of copying.

    SamAutomaticMaskGenerator deep-copies every batch's MaskData twice on its way to the
    records (MaskData.cat, per crop and per image): for masks with ~10^5 runs that copying
    took 85% of the time of a whole batch. Counts are never changed once encoded, so sharing
    them is safe; everything else (==, slicing, len, iteration, json, pycocotools) sees a list.
    """

    def __deepcopy__(self, memo: dict) -> "RunLengths":
        return self


def mask_to_rle(masks: torch.Tensor) -> list[dict[str, Any]]:
    """amg.py's mask_to_rle_pytorch, the same counts, a mask at a time in numpy.

    Args:
        masks: (B, H, W) bool.

    Returns:
        B uncompressed RLEs {"size": [H, W], "counts": [...]}, column-major, starting with a
        run of zeros (0 when the first pixel is set).
    """
    b, h, w = masks.shape
    out = []
    for mask in masks:
        flat = mask.t().contiguous().view(-1).cpu().numpy()  # column-major, as COCO's RLE
        change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
        bounds = np.concatenate(([0], change, [h * w]))
        counts = RunLengths([] if not flat[0] else [0])
        counts.extend(np.diff(bounds).tolist())
        out.append({"size": [h, w], "counts": counts})
    return out


Decode = Callable[[torch.Tensor, torch.Tensor], "tuple[torch.Tensor, torch.Tensor]"]


def multimask_decode(predictor: Any, budget_bytes: Optional[int], work: Optional[Workspace] = None) -> Decode:
    """The decoder call of SamPredictor.predict_torch(multimask_output=True) on the predictor's image."""
    model = predictor.model
    decoder = model.mask_decoder
    image_pe = model.prompt_encoder.get_dense_pe()
    if decoder_reasons(decoder):
        return lambda sparse, dense: decoder(
            image_embeddings=predictor.features, image_pe=image_pe, sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=True
        )
    return lambda sparse, dense: predict_masks(decoder, predictor.features, image_pe, sparse, dense, slice(1, None), budget_bytes, work)


def upsample(model: Any, masks: torch.Tensor, input_size: tuple[int, ...], original_size: tuple[int, ...], out: Optional[Workspace] = None) -> torch.Tensor:
    """model.postprocess_masks(masks, input_size, original_size), (B, M, h, w) -> (B, M, H, W).

    For segment_anything's own Sam.postprocess_masks the two bilinear interpolations run as
    its own calls do (the same aten op), written into `out`'s slots when given, so that a
    step does not take fresh memory from the system; and when the image is the model's input
    size (a 1024 px image, a tile) the second interpolation is to the same size: for finite
    logits that is the identity, exactly (weights 1 and 0), and is skipped. With `out`, an
    image of another size goes through the model's size one mask at a time (each channel is
    interpolated on its own either way), so that only one mask is held at the model's size
    beside the step's masks at the image's. The result is then a view of `out`'s slot "a":
    valid until its next use."""
    from segment_anything.modeling import Sam

    if getattr(type(model), "postprocess_masks", None) is not Sam.postprocess_masks:
        return model.postprocess_masks(masks, input_size, original_size)
    size = model.image_encoder.img_size
    same = tuple(input_size) == tuple(original_size) and bool(torch.isfinite(masks).all())
    if out is None or same:
        first = out.take("a", (*masks.shape[:-2], size, size), masks) if out is not None else None
        masks = _bilinear(masks, (size, size), first)[..., : input_size[0], : input_size[1]]
        return masks if same else _bilinear(masks, tuple(original_size), None)
    result = out.take("a", (*masks.shape[:-2], *original_size), masks)
    for j in range(masks.shape[1]):
        one = _bilinear(masks[:, j : j + 1], (size, size), out.take("b", (masks.shape[0], 1, size, size), masks))
        _bilinear(one[..., : input_size[0], : input_size[1]], tuple(original_size), result[:, j : j + 1])
    return result


def _bilinear(masks: torch.Tensor, size: tuple[int, int], out: Optional[torch.Tensor]) -> torch.Tensor:
    """F.interpolate(masks, size, mode="bilinear", align_corners=False), into `out` when given (the same aten op)."""
    if out is None:
        return F.interpolate(masks, size, mode="bilinear", align_corners=False)
    return torch._C._nn.upsample_bilinear2d(masks, size, False, None, None, out=out)


def stability_score(logits: torch.Tensor, threshold: float, offset: float, out: Optional[Workspace] = None) -> torch.Tensor:
    """amg.py's calculate_stability_score(logits, threshold, offset), the same counts and the
    same float32 division, with the comparisons written into a reused buffer."""
    if out is None or logits.dim() != 3 or logits.shape[-1] > 32767:  # stock's int16 row sums, kept as they are
        return calculate_stability_score(logits, threshold, offset)
    above = out.take("c", tuple(logits.shape), logits, torch.bool)
    intersections = torch.gt(logits, threshold + offset, out=above).sum(-1, dtype=torch.int16).sum(-1, dtype=torch.int32)
    unions = torch.gt(logits, threshold - offset, out=above).sum(-1, dtype=torch.int16).sum(-1, dtype=torch.int32)
    return intersections / unions


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """amg.py's batched_mask_to_box for (B, H, W) bool masks, the same long boxes (zeros for
    an empty mask), from the rows and columns any pixel is set in: bytes reduced with amax,
    ~40x faster on the CPU than stock's max over bools."""
    if masks.dim() != 3 or masks.dtype != torch.bool or masks.numel() == 0:
        return batched_mask_to_box(masks)
    as_bytes = masks.view(torch.uint8)
    rows = as_bytes.amax(-1)  # (B, H): 1 where the row has a pixel
    cols = as_bytes.amax(-2)  # (B, W)
    top, bottom = _first_last(rows)
    left, right = _first_last(cols)
    boxes = torch.stack([left, top, right, bottom], dim=-1)
    return boxes * (rows.amax(-1) > 0).unsqueeze(-1)  # an empty mask: [0, 0, 0, 0], as stock


def _first_last(line: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the first and the last 1 along the last dim of a 0/1 uint8 tensor (argmax gives the first maximum)."""
    n = line.shape[-1]
    return line.argmax(-1), (n - 1) - line.flip(-1).argmax(-1)


@dataclass(frozen=True)
class Filters:
    """SamAutomaticMaskGenerator's per-batch filters (amg.py's names)."""

    pred_iou_thresh: float
    stability_score_thresh: float
    stability_score_offset: float


@torch.no_grad()
def decode_steps(
    predictor: Any,
    points: np.ndarray,
    im_size: tuple[int, ...],
    filters: Filters,
    budget_bytes: Optional[int] = None,
    decode: Optional[Decode] = None,
    work: Optional[Workspace] = None,
) -> Iterator[dict[str, Any]]:
    """Stock _process_batch's steps up to the thresholded masks, a step at a time.

    A chunk of points is decoded, the predicted-IoU filter runs on its low-resolution masks,
    and the survivors are upsampled (Sam.postprocess_masks), scored (calculate_stability_score),
    filtered and thresholded a few at a time; an empty step stands for a chunk that keeps none.

    Args:
        predictor: a SamPredictor with the image (or crop) set.
        points: (B, 2) points in the set image's pixels (x, y).
        im_size: that image's (h, w).
        work: the slots to decode into (a Workspace the caller reuses); None: one for this call.

    Yields:
        {"iou_preds": (m,), "points": (m, 2) float64, "stability_score": (m,), "masks": (m, h, w) bool}
        in stock's order (point-major, then mask). "masks" may be a reused buffer: use it (or
        copy it) before asking for the next step.
    """
    model = predictor.model
    transformed_points = predictor.transform.apply_coords(points, im_size)
    in_points = torch.as_tensor(transformed_points, device=predictor.device)
    in_labels = torch.ones(in_points.shape[0], dtype=torch.int, device=in_points.device)
    sparse, dense = model.prompt_encoder(points=(in_points[:, None, :], in_labels[:, None]), boxes=None, masks=None)
    _, c, h, w = predictor.features.shape
    chunk = prompts_per_chunk(h * w, c, budget_bytes)
    work = work or Workspace()  # the decoder's and these steps' tensors, and the first layer's image side, for this batch
    decode = decode or multimask_decode(predictor, budget_bytes, work)
    threshold = model.mask_threshold
    out_h, out_w = predictor.original_size
    step = masks_per_step(out_h * out_w, budget_bytes)
    for start in range(0, len(points), chunk):
        stop = min(len(points), start + chunk)
        low_res, iou_preds = decode(sparse[start:stop], dense[start:stop])
        k = low_res.shape[1]
        low_res, iou_preds = low_res.flatten(0, 1), iou_preds.flatten(0, 1)  # (b*3, 256, 256), (b*3,)
        point_rows = torch.as_tensor(points[start:stop].repeat(k, axis=0))
        if filters.pred_iou_thresh > 0.0:
            keep = iou_preds > filters.pred_iou_thresh
            low_res, iou_preds, point_rows = low_res[keep], iou_preds[keep], point_rows[keep]
        if low_res.shape[0] == 0:
            yield {"iou_preds": iou_preds, "points": point_rows, "stability_score": iou_preds.new_zeros(0), "masks": torch.zeros(0, out_h, out_w, dtype=torch.bool)}
        for s in range(0, low_res.shape[0], step):
            e = min(low_res.shape[0], s + step)
            logits = upsample(model, low_res[None, s:e], predictor.input_size, predictor.original_size, work)[0]  # (m, h, w)
            stability = stability_score(logits, threshold, filters.stability_score_offset, work)
            masks = torch.gt(logits, threshold, out=work.take("d", tuple(logits.shape), logits, torch.bool))
            del logits
            if filters.stability_score_thresh > 0.0:
                keep = stability >= filters.stability_score_thresh
                stability, masks = stability[keep], masks[keep]
                yield {"iou_preds": iou_preds[s:e][keep], "points": point_rows[s:e][keep], "stability_score": stability, "masks": masks}
            else:
                yield {"iou_preds": iou_preds[s:e], "points": point_rows[s:e], "stability_score": stability, "masks": masks}


@torch.no_grad()
def process_batch(
    generator: Any,
    points: np.ndarray,
    im_size: tuple[int, ...],
    crop_box: list[int],
    orig_size: tuple[int, ...],
    budget_bytes: Optional[int] = None,
    decode: Optional[Decode] = None,
) -> MaskData:
    """SamAutomaticMaskGenerator._process_batch's MaskData, within `budget_bytes` per step.

    Args:
        generator: a SamAutomaticMaskGenerator (segment_anything's, or SAM-HQ's) whose
            predictor has the crop set.
        points: (B, 2) grid points in crop pixels (x, y).
        im_size: the crop's (h, w); crop_box: [x0, y0, x1, y1] in the image; orig_size: the image's (H, W).
        budget_bytes: bytes for one step's tensors (None: the decoder's default).
        decode: (sparse (b, P, C), dense (b, C, h, w)) -> low-resolution logits (b, M, 4h, 4w)
            and predicted IoU (b, M) of the masks stock keeps; None: segment_anything's
            multimask output through sam_blocked.automatic.decoder (stock's decoder when
            decoder_reasons refuses the model's).

    Returns:
        MaskData with rles, iou_preds, points, stability_score and boxes, as stock's.
    """
    filters = Filters(generator.pred_iou_thresh, generator.stability_score_thresh, generator.stability_score_offset)
    predictor = generator.predictor
    # On the CPU the batch's chunks of points are shared out among threads (attention.threads),
    # each with its own workspace and its share of the budget, and put back in stock's order:
    # as many threads as full-size masks fit the budget (each post-processes one at least).
    # A caller's own `decode` may keep state of its own: then one thread.
    out_h, out_w = predictor.original_size
    threads = min(step_threads(predictor.device), masks_per_step(out_h * out_w, budget_bytes)) if decode is None else 1
    share = budget_bytes if threads == 1 else (budget_bytes or DEFAULT_DECODER_BYTES) // threads
    _, c, h, w = predictor.features.shape
    chunk = prompts_per_chunk(h * w, c, share)
    parts = [(i, start, min(len(points), start + chunk)) for i, start in enumerate(range(0, len(points), chunk))]
    done: list[Optional[tuple[dict[str, list[torch.Tensor]], list[dict[str, Any]], int]]] = [None] * len(parts)
    works = [Workspace() for _ in range(min(threads, len(parts)))]

    def run(part: tuple[int, int, int], slot: int) -> None:
        i, start, stop = part
        done[i] = _records(predictor, points[start:stop], im_size, crop_box, orig_size, filters, share, decode, works[slot])

    run_steps(run, parts, threads)
    rows: dict[str, list[torch.Tensor]] = {"iou_preds": [], "points": [], "stability_score": [], "boxes": []}
    rles: list[dict[str, Any]] = []
    masks_seen = 0
    for part_rows, part_rles, part_seen in done:
        for key, values in part_rows.items():
            rows[key] += values
        rles += part_rles
        masks_seen += part_seen
    data = MaskData(**{key: torch.cat(values) for key, values in rows.items() if values})
    if not masks_seen:  # stock boxes no mask as float zeros
        data["boxes"] = torch.zeros(0, 4, device=data["iou_preds"].device)
    data["rles"] = rles
    return data


def _records(
    predictor: Any,
    points: np.ndarray,
    im_size: tuple[int, ...],
    crop_box: list[int],
    orig_size: tuple[int, ...],
    filters: Filters,
    budget_bytes: Optional[int],
    decode: Optional[Decode],
    work: Workspace,
) -> tuple[dict[str, list[torch.Tensor]], list[dict[str, Any]], int]:
    """process_batch's rows, RLEs and count of masks for some of its points, in stock's order."""
    orig_h, orig_w = orig_size
    rows: dict[str, list[torch.Tensor]] = {"iou_preds": [], "points": [], "stability_score": [], "boxes": []}
    rles: list[dict[str, Any]] = []
    masks_seen = 0
    for step in decode_steps(predictor, points, im_size, filters, budget_bytes, decode, work):
        masks = step.pop("masks")  # (m, h, w) bool: boxed, filtered and encoded now, then dropped
        if len(masks):
            masks_seen += len(masks)
            boxes = mask_boxes(masks)  # (m, 4) long
            keep = ~is_box_near_crop_edge(boxes, crop_box, [0, 0, orig_w, orig_h])
            step["boxes"] = boxes
            if not bool(keep.all()):
                step = {key: value[keep] for key, value in step.items()}
                masks = masks[keep]
            rles += mask_to_rle(uncrop_masks(masks, crop_box, orig_h, orig_w))
        del masks
        for key, value in step.items():
            rows[key].append(value)
    return rows, rles, masks_seen


def postprocess_small_regions(mask_data: MaskData, min_area: int, nms_thresh: float) -> MaskData:
    """SamAutomaticMaskGenerator.postprocess_small_regions, one full-size mask at a time.

    Stock decodes every mask, keeps all of them at full size for the box NMS, then
    re-encodes the changed ones it keeps; here each mask is decoded, cleaned, boxed and (when
    changed) re-encoded before the next, so the NMS sees the same boxes and scores."""
    if len(mask_data["rles"]) == 0:
        return mask_data
    boxes, scores, new_rles = [], [], {}
    for i, rle in enumerate(mask_data["rles"]):
        mask = rle_to_mask(rle)
        mask, changed = remove_small_regions(mask, min_area, mode="holes")
        unchanged = not changed
        mask, changed = remove_small_regions(mask, min_area, mode="islands")
        unchanged = unchanged and not changed
        mask_t = torch.as_tensor(mask).unsqueeze(0)
        boxes.append(mask_boxes(mask_t)[0])
        scores.append(float(unchanged))
        if not unchanged:
            new_rles[i] = mask_to_rle(mask_t)[0]
    boxes_t = torch.stack(boxes)
    keep_by_nms = batched_nms(boxes_t.float(), torch.as_tensor(scores), torch.zeros(len(boxes_t)), iou_threshold=nms_thresh)
    for i_mask in keep_by_nms:
        if scores[i_mask] == 0.0:
            mask_data["rles"][i_mask] = new_rles[int(i_mask)]
            mask_data["boxes"][i_mask] = boxes_t[i_mask]
    mask_data.filter(keep_by_nms)
    return mask_data


__all__ = ["RunLengths", "mask_boxes", "mask_to_rle", "masks_per_step", "postprocess_small_regions", "process_batch", "stability_score"]
