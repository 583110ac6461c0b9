"""DGIQA: depth-guided feature attention and refinement for no-reference image quality.

The network follows the published inference of Ramesh et al. module for module, and its attribute names are
chosen so that ``state_dict()`` has exactly the keys and shapes of the published checkpoints
(``tests/data/dgiqa_checkpoint_layout.tsv``). That is what lets ``load_state_dict(strict=True)`` accept the
published KonIQ-10k and KADID-10k files unchanged.

Data flow for a batch of 224x224 crops (RGB crop and the matching depth-map crop):

1. Two Swin-T feature extractors give four maps each (strides 4, 8, 16, 32).
2. A Transformer-CNN bridge per map projects it to 64/128/256/512 channels with channel attention.
3. The four maps are resized to the smallest one and concatenated (960 channels), once per branch.
4. Depth-guided cross attention (queries from depth, keys/values from RGB), then self-attention refinement.
5. Two dilated 3x3 convolutions, global average pooling, a linear layer and a sigmoid: one score per crop.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import timm
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.attention import set_attention

SWIN_VARIANT = "swin_tiny_patch4_window7_224"
CROP_SIZE = 224
STAGE_CHANNELS = (96, 192, 384, 768)
BRIDGE_CHANNELS = (64, 128, 256, 512)
FUSED_CHANNELS = sum(BRIDGE_CHANNELS)


class TransformerCnnBridge(nn.Module):
    """Turns one Swin stage output into a CNN feature map, reweighting channels squeeze-excitation style.

    Args:
        in_channels: Channels of the Swin stage.
        out_channels: Channels after the 1x1 projection.
        reduction: Channel reduction inside the attention gate.
        drop_prob: Dropout2d probability (inactive in eval mode; kept so training code can reuse the module).
    """

    def __init__(self, in_channels: int, out_channels: int, reduction: int = 16, drop_prob: float = 0.1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=1)
        self.attention = nn.Sequential(
            nn.Conv2d(out_channels, out_channels // reduction, kernel_size=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels // reduction, out_channels, kernel_size=1),
            nn.Sigmoid(),
        )
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.norm = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.drop = nn.Dropout2d(p=drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Project, gate and convolve a ``(N, C, H, W)`` map."""
        projected = self.conv1(x)
        gated = projected * self.attention(projected)
        return self.drop(self.relu(self.norm(self.conv2(gated))))


class SpatialAttentionBlock(nn.Module):
    """Post-norm transformer block whose tokens are the H*W positions of a feature map.

    The same block serves as depth-guided cross attention (queries from one map, keys and values from another)
    and as self-attention refinement. The two uses carry different parameter names in the published checkpoint
    (``multihead_attn`` vs ``multihead_attn_spatial`` and so on), so the names take a ``suffix``.

    Args:
        dim: Channels of the feature map (the token width).
        num_heads: Attention heads.
        dropout: Dropout after attention and MLP (inactive in eval mode).
        suffix: Appended to every parameter name: ``""`` for cross attention, ``"_spatial"`` for refinement.

    Attributes:
        fused_attn: Compute attention with ``scaled_dot_product_attention`` (``nn.MultiheadAttention`` does when
            no weights are asked for) rather than the published way, which asks for the weights and so forms
            the full attention matrix; see ``pipeline.models.attention``.
    """

    def __init__(self, dim: int, num_heads: int = 16, dropout: float = 0.1, suffix: str = ""):
        super().__init__()
        self._suffix = suffix
        self.fused_attn = True
        self.add_module(f"multihead_attn{suffix}", nn.MultiheadAttention(dim, num_heads, dropout=dropout))
        self.add_module(f"norm1{suffix}", nn.LayerNorm(dim))
        self.add_module(f"norm2{suffix}", nn.LayerNorm(dim))
        self.add_module(f"fc{suffix}", nn.Sequential(nn.Linear(dim, dim * 4), nn.GELU(), nn.Linear(dim * 4, dim)))
        self.dropout = nn.Dropout(dropout)

    def _part(self, name: str) -> nn.Module:
        return getattr(self, name + self._suffix)

    def forward(self, query_map: torch.Tensor, key_value_map: torch.Tensor | None = None) -> torch.Tensor:
        """Attend from ``query_map`` to ``key_value_map`` (itself when omitted); both ``(N, C, H, W)``."""
        n, c, h, w = query_map.shape
        query = query_map.flatten(2).permute(2, 0, 1)  # (H*W, N, C), sequence first as nn.MultiheadAttention wants
        key_value = query if key_value_map is None else key_value_map.flatten(2).permute(2, 0, 1)
        attended, _ = self._part("multihead_attn")(query, key_value, key_value, need_weights=not self.fused_attn)
        x = self._part("norm1")(query + self.dropout(attended))
        x = self._part("norm2")(x + self.dropout(self._part("fc")(x)))
        return x.permute(1, 2, 0).reshape(n, c, h, w)


def _swin_features(img_size: int) -> nn.Module:
    # pretrained=False: weights come only from the checkpoint the user passes, never from a model hub.
    return timm.create_model(SWIN_VARIANT, pretrained=False, features_only=True, img_size=img_size)


class DGIQA(nn.Module):
    """The DGIQA network: ``forward(rgb_crops, depth_crops)`` returns one score in [0, 1] per crop.

    Args:
        img_size: Crop size the Swin backbones are built for (224 in the published model).
    """

    def __init__(self, img_size: int = CROP_SIZE):
        super().__init__()
        self.backbone = _swin_features(img_size)
        self.depth_backbone = _swin_features(img_size)
        for i, (cin, cout) in enumerate(zip(STAGE_CHANNELS, BRIDGE_CHANNELS, strict=True), start=1):
            self.add_module(f"tcb{i}", TransformerCnnBridge(cin, cout))
        for i, (cin, cout) in enumerate(zip(STAGE_CHANNELS, BRIDGE_CHANNELS, strict=True), start=1):
            self.add_module(f"tcb{i}_depth", TransformerCnnBridge(cin, cout))
        self.depth_guided_cross_attention = SpatialAttentionBlock(FUSED_CHANNELS, num_heads=16)
        self.refinement_attention = SpatialAttentionBlock(FUSED_CHANNELS, num_heads=16, suffix="_spatial")
        self.dilated_stack = nn.Sequential(
            nn.Conv2d(FUSED_CHANNELS, 1024, kernel_size=3, padding=2, dilation=2),
            nn.BatchNorm2d(1024),
            nn.ReLU(inplace=True),
            nn.Conv2d(1024, 1024, kernel_size=3, padding=4, dilation=4),
            nn.BatchNorm2d(1024),
            nn.ReLU(inplace=True),
        )
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(1024, 1)

    def _fuse(self, backbone: nn.Module, images: torch.Tensor, suffix: str) -> torch.Tensor:
        stages = backbone(images)
        if len(stages) != 4:
            raise ValueError(f"expected 4 feature maps from the Swin backbone, got {len(stages)}")
        bridged = [
            getattr(self, f"tcb{i}{suffix}")(stage.permute(0, 3, 1, 2)) for i, stage in enumerate(stages, start=1)
        ]
        height = min(m.shape[2] for m in bridged)
        width = min(m.shape[3] for m in bridged)
        resized = [F.interpolate(m, size=(height, width), mode="bilinear", align_corners=False) for m in bridged]
        return torch.cat(resized, dim=1)

    def forward(self, rgb: torch.Tensor, depth: torch.Tensor) -> torch.Tensor:
        """Score crops.

        Args:
            rgb: ``(N, 3, 224, 224)`` ImageNet-normalised RGB crops.
            depth: ``(N, 3, 224, 224)`` ImageNet-normalised depth-map crops at the same positions.

        Returns:
            ``(N,)`` scores in [0, 1].
        """
        fused_rgb = self._fuse(self.backbone, rgb, "")
        fused_depth = self._fuse(self.depth_backbone, depth, "_depth")
        fused = self.depth_guided_cross_attention(fused_depth, fused_rgb)
        fused = self.refinement_attention(fused)
        pooled = self.global_pool(self.dilated_stack(fused)).flatten(1)
        return torch.sigmoid(self.fc(pooled)).view(-1)


_LEGACY_STAGE = re.compile(r"^(backbone|depth_backbone)\.layers\.(\d+)\.")
_OLD_DOWNSAMPLE = re.compile(r"^(backbone|depth_backbone)\.layers_(\d+)\.downsample\.")
_DROPPED_BUFFERS = ("attn_mask", "relative_position_index", "relative_coords_table")


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename keys of DGIQA checkpoints saved under other timm versions to this module's names.

    Handles ``layers.N`` (timm without flattened feature modules) instead of ``layers_N``, the patch-merging
    layer stored at the end of stage N (timm before 0.9) instead of the start of stage N+1, and the
    ``attn_mask`` / ``relative_position_index`` buffers older timm versions saved; those buffers are derived
    from the architecture, so dropping them loses nothing. Other keys pass through, so a wrong checkpoint
    still fails the strict load with its own key names.
    """
    keys = list(state_dict)
    downsample_at_stage_end = any(k.startswith(("backbone.layers_0.downsample", "backbone.layers.0.downsample"))
                                  for k in keys)
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.rsplit(".", 1)[-1] in _DROPPED_BUFFERS:
            continue
        key = _LEGACY_STAGE.sub(r"\1.layers_\2.", key)
        if downsample_at_stage_end:
            key = _OLD_DOWNSAMPLE.sub(lambda m: f"{m.group(1)}.layers_{int(m.group(2)) + 1}.downsample.", key)
        out[key] = value
    return out


def build_dgiqa() -> DGIQA:
    """Build the published DGIQA architecture with random weights, in eval mode, attention in the fused kernel."""
    model = DGIQA().eval()
    set_attention(model, "sdpa")  # timm keeps Swin's fused window attention off unless told
    return model

