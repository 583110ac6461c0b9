"""DP-IQA student: the distilled CNN of "Utilizing Diffusion Prior for Blind Image Quality Assessment in the Wild".

DP-IQA trains a diffusion-based teacher and distils it into this much smaller student, which is what the authors
publish for inference. The module reproduces the authors' student layer for layer, and its attribute names give
``state_dict()`` exactly the keys of their checkpoints (1,206 keys: ``base_model.features.*`` from EfficientNet-B7,
then ``conv_transpose``, ``fc1``, ``fc2``, ``fc3``), so their files load with a strict load and no renaming.

Data flow for a batch of 512x512 RGB images scaled to [0, 1] (no mean/std normalisation, see
``pipeline.scoring.dpiqa_preprocess``):

1. EfficientNet-B7 ``features`` (its pooling and classifier replaced by identities): 2560 channels at 1/32 scale,
   16x16 for a 512x512 input.
2. A stride-2 transposed convolution to 8 channels at 32x32, ReLU, nearest-neighbour resize to 64x64.
3. Flattened (32,768 values) through three linear layers (512, 512, 1) with ReLUs between: one raw score per image.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import efficientnet_b7

INPUT_SIZE = 512
FEATURE_CHANNELS = 2560
FEATURE_STRIDE = 32
HEAD_CHANNELS = 8
HEAD_GRID = 64
HIDDEN_FEATURES = 512
NUM_CHECKPOINT_KEYS = 1206

_DATA_PARALLEL_PREFIX = "module."


def _efficientnet_b7_features() -> nn.Module:
    # weights=None: weights come only from the checkpoint the user passes, never from a model hub.
    backbone = efficientnet_b7(weights=None)
    # The authors keep the whole torchvision model and neutralise its head, which is why checkpoint keys read
    # ``base_model.features.*``; calling it then returns the flattened feature map.
    backbone.avgpool = nn.Identity()
    backbone.classifier = nn.Identity()
    return backbone


class DpiqaStudent(nn.Module):
    """The DP-IQA student network: ``forward(images)`` returns one raw quality score per image.

    Scores are on the scale of the training set's labels divided by 100 (the scorer's ``output_scale`` in
    ``pipeline/scorers/dpiqa_student.py``). They are not squashed by a sigmoid, as the authors report them, so they
    are comparable with published numbers.
    """

    def __init__(self):
        super().__init__()
        self.base_model = _efficientnet_b7_features()
        self.conv_transpose = nn.ConvTranspose2d(FEATURE_CHANNELS, HEAD_CHANNELS, kernel_size=3, stride=2,
                                                 padding=1, output_padding=1)
        self.fc1 = nn.Linear(HEAD_CHANNELS * HEAD_GRID * HEAD_GRID, HIDDEN_FEATURES)
        self.fc2 = nn.Linear(HIDDEN_FEATURES, HIDDEN_FEATURES)
        self.fc3 = nn.Linear(HIDDEN_FEATURES, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Score images.

        The authors' forward also returns the intermediate feature map (for distillation); only the scores are
        needed to score photos, so only they are returned.

        Args:
            images: ``(N, 3, 512, 512)`` RGB in [0, 1]. Other sizes run (the head resizes to 64x64) but the
                published students were trained and evaluated at 512x512 only.

        Returns:
            ``(N,)`` raw scores.
        """
        n, _, height, width = images.shape
        flat = self.base_model(images)
        # The backbone returns its feature map flattened; every stride-2 stage rounds odd sizes up.
        grid = (math.ceil(height / FEATURE_STRIDE), math.ceil(width / FEATURE_STRIDE))
        features = flat.reshape(n, FEATURE_CHANNELS, *grid)
        x = F.relu(self.conv_transpose(features))
        x = F.interpolate(x, size=(HEAD_GRID, HEAD_GRID), mode="nearest").flatten(1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x).view(-1)


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip the ``module.`` prefix that ``nn.DataParallel`` training adds to every key.

    Nothing else is renamed: the authors' checkpoints already match this module, so any other difference (a
    DGIQA checkpoint, a teacher checkpoint, a different backbone) must fail the strict load, which names the
    missing, unexpected and mis-shaped keys.
    """
    return {key.removeprefix(_DATA_PARALLEL_PREFIX): value for key, value in state_dict.items()}


def build_dpiqa_student() -> DpiqaStudent:
    """Build the DP-IQA student architecture with random weights, in eval mode (BatchNorm running statistics)."""
    return DpiqaStudent().eval()

