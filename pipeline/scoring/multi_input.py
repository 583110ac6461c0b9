"""The runner for scorers whose network takes several inputs per image, and possibly several crops (DPAM-IQA).

As with ``single_pass``, everything model-specific comes from the scorer's registry entry: the builder, the
checkpoint remapping, the preprocessing (CPU tasks, to a prepared item with a ``rgb`` array of one row per crop)
and ``to_tensor``, which turns a list of prepared items into the network's positional inputs, one row per crop,
the crops of an image adjacent. An image's score is the mean of its crops' outputs; ``score_std`` their
population standard deviation, when there is more than one crop.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from pipeline.scorers.registry import resolve
from pipeline.scoring.precision import autocast
from pipeline.scoring.scorer import ImageScore, ScorerConfig
from pipeline.scoring.single_pass import SinglePassScorer


class MultiInputScorer(SinglePassScorer):
    """Loads one multi-input scorer once; scores batches of prepared images (see the module).

    ``forward_batch`` counts crops: a batch's images are cut into chunks of whole images of at most that many
    crops (one image with more crops goes alone).
    """

    def __init__(self, config: ScorerConfig):
        super().__init__(config)
        # What the preprocessing makes (its ``prepared_type`` attribute), for the stages to rebuild items with.
        self.prepared_type = resolve(self.spec.preprocessing).prepared_type
        if config.forward_batch is None:
            self.forward_batch = 32 if self.device.type == "cuda" else 2

    def _chunks(self, prepared: Sequence) -> list[list]:
        chunks, current, crops = [], [], 0
        for item in prepared:
            n = len(item.rgb)
            if current and crops + n > self.forward_batch:
                chunks.append(current)
                current, crops = [], 0
            current.append(item)
            crops += n
        if current:
            chunks.append(current)
        return chunks

    @torch.inference_mode()
    def score_prepared(self, prepared: Sequence) -> list[ImageScore]:
        """One forward pass per chunk of whole images; each image's crops averaged."""
        results: list[ImageScore] = []
        for chunk in self._chunks(prepared):
            inputs = self._to_tensor(chunk, self.device)
            with autocast(self.device, self.config.precision):
                out = self.model(*inputs).float().reshape(-1).cpu().numpy().astype(np.float64)
            start = 0
            for item in chunk:
                crops = out[start:start + len(item.rgb)]
                start += len(crops)
                results.append(ImageScore(score=float(crops.mean()),
                                          score_std=float(crops.std()) if len(crops) > 1 else None,
                                          num_crops=len(crops), width=item.width, height=item.height))
        return results
