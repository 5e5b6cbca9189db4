"""A user's script, as people write them: load SAM through segment_anything's registry, prompt it, save the result.

    python user_sam_script.py --model-type vit_b --checkpoint sam_vit_b.pth --image photo.jpg --out result.npz

Nothing in it knows about sam_blocked; tests run it as it is, with `python` and with
`sam-blocked run`, and compare what it saves.
"""

import argparse

import numpy as np
import torch
from PIL import Image
from segment_anything import SamPredictor, sam_model_registry

parser = argparse.ArgumentParser(description="Segment the objects under a few points of an image with SAM.")
parser.add_argument("--model-type", default="vit_b")
parser.add_argument("--checkpoint", required=True)
parser.add_argument("--image", required=True)
parser.add_argument("--out", required=True)
parser.add_argument("--points", type=int, default=3)
args = parser.parse_args()

sam = sam_model_registry[args.model_type](checkpoint=args.checkpoint)
sam.eval()
predictor = SamPredictor(sam)
image = np.array(Image.open(args.image).convert("RGB"))
with torch.no_grad():
    predictor.set_image(image)
h, w = image.shape[:2]
points = np.stack([np.linspace(w * 0.2, w * 0.8, args.points), np.linspace(h * 0.3, h * 0.7, args.points)], axis=1)
masks, scores = [], []
for x, y in points:
    mask, score, _ = predictor.predict(point_coords=np.array([[x, y]]), point_labels=np.array([1]), multimask_output=False)
    masks.append(mask[0])
    scores.append(float(score[0]))
    print(f"point ({x:.0f}, {y:.0f}): mask of {int(mask[0].sum())} pixels, score {score[0]:.3f}")
np.savez_compressed(args.out, masks=np.stack(masks), scores=np.array(scores), embedding=predictor.get_image_embedding().numpy())
