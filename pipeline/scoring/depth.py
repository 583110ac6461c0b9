"""Depth maps for prepared images: the one loop that groups depth inputs by size and runs the depth model.

Scoring, the training's depth cache and the report's thumbnails all need the uint8 map DGIQA sees; they share
this loop so that the batching, the arithmetic and the map's rounding cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import nn

from pipeline.scoring.precision import autocast
from pipeline.scoring.preprocess import PreparedImage, depth_to_map


@torch.inference_mode()
def depth_passes(model: nn.Module, prepared: Sequence[PreparedImage], device: torch.device, batch: int,
                 precision: str = "fp32") -> Iterator[list[tuple[int, np.ndarray]]]:
    """Run ``model`` over the images' depth inputs; yields, per forward pass, ``(index, uint8 (H, W) map)`` pairs.

    Images whose depth inputs have the same size share a pass (photos from one camera do), at most ``batch`` of
    them; a caller that stores maps as they come (the training's cache) holds one pass's maps at a time.

    Args:
        model: A Depth Anything model on ``device``, in eval mode.
        prepared: Prepared images (their ``depth_input``, ``height`` and ``width`` are used).
        device: Where the model runs.
        batch: Most images per forward pass.
        precision: ``fp32`` (the published numerics) or an autocast precision.
    """
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, item in enumerate(prepared):
        by_shape.setdefault(tuple(item.depth_input.shape), []).append(i)
    for indices in by_shape.values():
        for start in range(0, len(indices), batch):
            chunk = indices[start:start + batch]
            x = torch.stack([prepared[i].depth_input for i in chunk]).to(device, non_blocking=True)
            with autocast(device, precision):
                depth = model(x).float()
            yield [(i, depth_to_map(depth[j], prepared[i].height, prepared[i].width)) for j, i in enumerate(chunk)]
