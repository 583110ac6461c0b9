"""The depth map beside each thumbnail, when ``--depth-weights`` asks for one.

The Depth Anything model runs on the image after the scoring preprocessing, so the map shown is the one DGIQA saw.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pipeline.analysis.report.config import ReportConfig
from pipeline.scoring.depth import depth_passes
from pipeline.scoring.preprocess import PreparedImage
from pipeline.scoring.scorer import read_depth_weights, resolve_device


@dataclass(frozen=True)
class DepthMaps:
    """A loaded depth model on its device, and the checkpoint's label for the page.

    Attributes:
        label: The checkpoint's ``name@hash`` label, compared on the page with the scores' model ids.
        model: The Depth Anything model, on ``device``.
        device: Where it runs.
    """

    label: str
    model: nn.Module
    device: torch.device

    def gray(self, prepared: PreparedImage) -> np.ndarray:
        """The uint8 ``(height, width)`` depth map of one prepared image (one at a time: a failure is one tile's)."""
        [[(_, depth_map)]] = depth_passes(self.model, [prepared], self.device, batch=1)
        return depth_map


def load_depth_maps(config: ReportConfig) -> DepthMaps | None:
    """The depth model ``config`` asks for, or None when no depth maps (or no thumbnails at all) are shown.

    Raises:
        WeightsError: ``config.depth_weights`` cannot be read or is not a Depth Anything checkpoint.
    """
    if config.depth_weights is None or not config.thumbnails:
        return None
    device = resolve_device(config.device)
    weights = read_depth_weights(config.depth_weights, config.encoder, config.depth_version, config.storage_options)
    return DepthMaps(weights.label, weights.build().to(device), device)
