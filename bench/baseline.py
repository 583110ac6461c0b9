"""The baseline the benchmark compares against: this project's own rewrite of the published inference algorithm.

It is not the published code (``uf-robopi/DGIQA``, which is never part of this repository): it runs this
project's model modules, written the straightforward way the published script works, so that its speed can be
measured beside the scorer in one process. One image at a time, models loaded once, fp32, full-resolution OpenCV
decode, float64 depth input, the depth map upsampled to full resolution as three channels and resized back down,
all crops of the image in one forward pass, attention written out as explicit matrix products (the caller passes
models set to ``math``, see ``pipeline.models.attention``). The benchmark's "deviation from the baseline" therefore
compares this project with itself; agreement with the published code is checked against the numbers that code
printed, recorded in ``tests/data/dgiqa_published_scores.json`` (``tests/test_published_parity.py``).
"""

from __future__ import annotations

import random

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from pipeline.scoring.preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    depth_input_size,
    normalize_to_tensor,
    short_side_size,
)

CROP = 224


def _resize_short(image: np.ndarray) -> np.ndarray:
    h, w = short_side_size(image.shape[0], image.shape[1])
    return cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)


@torch.inference_mode()
def baseline_score(path: str, dgiqa: torch.nn.Module, depth_model: torch.nn.Module, crops: int,
                   device: torch.device) -> float:
    """Score one image file the straightforward way; returns the mean crop score."""
    bgr = cv2.imread(path)
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    height, width = rgb.shape[:2]
    new_h, new_w = depth_input_size(height, width)
    x = cv2.resize(rgb / 255.0, (new_w, new_h), interpolation=cv2.INTER_CUBIC)
    x = ((x - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)).transpose(2, 0, 1).astype(np.float32)
    depth = depth_model(torch.from_numpy(np.ascontiguousarray(x))[None].to(device))
    full = F.interpolate(depth[None], (height, width), mode="bilinear", align_corners=False)[0, 0].cpu().numpy()
    gray = ((full - full.min()) / (full.max() - full.min() + 1e-8) * 255).astype(np.uint8)
    depth_map = cv2.cvtColor(gray, cv2.COLOR_GRAY2RGB)
    image = normalize_to_tensor(_resize_short(rgb))
    depth_t = normalize_to_tensor(_resize_short(depth_map))
    rng = random.Random(42)
    image_crops, depth_crops = [], []
    _, h, w = image.shape
    for _ in range(crops):
        cx, cy = rng.randint(0, w - CROP), rng.randint(0, h - CROP)
        image_crops.append(image[:, cy:cy + CROP, cx:cx + CROP])
        depth_crops.append(depth_t[:, cy:cy + CROP, cx:cx + CROP])
    scores = dgiqa(torch.stack(image_crops).to(device), torch.stack(depth_crops).to(device))
    return scores.mean().item()
