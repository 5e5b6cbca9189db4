"""The untiled mask producers: SAM's masks for one image set in a predictor, one at a time.

`prompt_masks` decodes prompt sets on the embedding SamPredictor holds; `auto_masks` runs
SamAutomaticMaskGenerator. Both yield (record, mask) with amg.py's record keys and an
(H, W) bool mask, one at a time, so a large image never holds every mask at full size.
Tiled segmentation (sam_blocked.tiles) keeps masks as crops instead.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch
from pycocotools import mask as mask_utils
from segment_anything import SamAutomaticMaskGenerator, SamPredictor
from segment_anything.utils.amg import batched_mask_to_box, box_xyxy_to_xywh, calculate_stability_score

from sam_blocked.inputs.prompts import Prompt


@torch.no_grad()
def prompt_masks(predictor: SamPredictor, prompts: Sequence[Prompt], multimask: bool = False) -> Iterator[tuple[dict, np.ndarray]]:
    """Masks for prompt sets on the image set in `predictor`, one at a time.

    SamPredictor.predict's steps, except that the decoder's low-resolution masks are
    upsampled to the original size one at a time rather than three together: a 12000 x
    9000 image then needs one (H, W) float32 mask on the device, not three.

    Args:
        predictor: a SamPredictor after set_image.
        prompts: prompt sets in original pixel coordinates.
        multimask: keep all three masks of each set, else the one SAM scores best.

    Yields:
        (record, mask): record holds amg.py's keys (area, bbox XYWH, predicted_iou,
        point_coords, stability_score, crop_box) plus point_labels, box, prompt,
        prompt_name and mask_index; mask is (H, W) bool.
    """
    model = predictor.model
    height, width = predictor.original_size
    device = predictor.device
    for index, prompt in enumerate(prompts):
        points = boxes = None
        if (arrays := prompt.points()) is not None:
            coords = predictor.transform.apply_coords(arrays[0], predictor.original_size)  # (N, 2)
            points = (
                torch.as_tensor(coords, dtype=torch.float, device=device)[None],  # (1, N, 2)
                torch.as_tensor(arrays[1], dtype=torch.int, device=device)[None],  # (1, N)
            )
        if prompt.box is not None:
            box = predictor.transform.apply_boxes(np.array(prompt.box, dtype=np.float64), predictor.original_size)  # (1, 4)
            boxes = torch.as_tensor(box, dtype=torch.float, device=device)
        sparse, dense = model.prompt_encoder(points=points, boxes=boxes, masks=None)
        low_res, scores = model.mask_decoder(
            image_embeddings=predictor.features,
            image_pe=model.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=True,
        )  # (1, 3, 256, 256), (1, 3)
        keep = range(low_res.shape[1]) if multimask else [int(scores[0].argmax())]
        for k in keep:
            logits = model.postprocess_masks(low_res[:, k : k + 1], predictor.input_size, predictor.original_size)[0]  # (1, H, W)
            stability = calculate_stability_score(logits, model.mask_threshold, 1.0)
            mask = logits > model.mask_threshold  # (1, H, W)
            del logits
            record = {
                "area": int(mask.sum()),
                "bbox": box_xyxy_to_xywh(batched_mask_to_box(mask)[0]).tolist(),
                "predicted_iou": float(scores[0, k]),
                "point_coords": [list(p) for p in prompt.foreground + prompt.background],
                "point_labels": [1] * len(prompt.foreground) + [0] * len(prompt.background),
                "box": None if prompt.box is None else list(prompt.box),
                "stability_score": float(stability[0]),
                "crop_box": [0, 0, width, height],
                "prompt": index,
                "prompt_name": prompt.name,
                "mask_index": k,
            }
            yield record, mask[0].cpu().numpy()


def auto_masks(generator: SamAutomaticMaskGenerator, image: np.ndarray) -> Iterator[tuple[dict, np.ndarray]]:
    """SamAutomaticMaskGenerator's records (output_mode "coco_rle"), each with its (H, W) bool mask,
    decoded one at a time so a large image never holds every mask at full size."""
    for record in generator.generate(image):
        yield record, mask_utils.decode(record["segmentation"]).astype(bool)
