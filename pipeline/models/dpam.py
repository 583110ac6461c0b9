"""DPAM-IQA (public code ``Roc-3/DPAM_IQA``), rebuilt on today's timm.

The paper: "Dual Perception-Aware Blind Image Quality Assessment with Semantic-Distortion Integration and
Dynamic Global-Local Refinement". A MANIQA-style network with two extra inputs, about 172.5 million parameters.
Its attribute names give ``state_dict()`` the keys of the authors' training script's checkpoints
(``torch.save(net.module.state_dict())``: 325 entries, recorded from their model in
``tests/data/dpam_checkpoint_layout.tsv``), so their files load strictly; ``checkpoint_filter_fn`` only strips a
``DataParallel`` prefix. No checkpoint is published yet.

Inputs per image (``pipeline.scoring.dpam_preprocess`` makes them):

* ``rgb``: ``(N, 3, 224, 224)`` RGB scaled to [-1, 1];
* ``texture``: ``(N, 3, 224, 224)`` the grey image minus its Gaussian blur (in uint8 arithmetic), in [0, 1], the
  same plane three times;
* ``superpixels``: ``(N, nodes, pixels, 3)`` colours (BGR, [0, 1]) of ``pixels`` pixels sampled from each of
  ``nodes`` SLIC superpixels.

Data flow: a ViT-B/8 gives 784 patch tokens; the outputs of its blocks 6-9 are concatenated (3072 channels on the
28x28 grid). A texture gate (pooled to 28x28) and a superpixel similarity matrix (resized to 28x28) each query
those features through a channel attention; the two results are fused to 3072 channels and refined in two stages
(768 then 384 channels), each a transformer block beside two residual blocks and a dynamic depthwise convolution.
A per-token score and a per-token weight give the image's score as their weighted mean (non-negative, no upper
bound: the training labels' scale).

The channel attentions keep two quirks of the published code, as the checkpoints were trained with them: the
attention is between channels (the token axis is the linear layers' width), and its values are the transposed
value matrix *reshaped* (not transposed back) to ``(channels, tokens)``.
"""

from __future__ import annotations

from collections.abc import Mapping

import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import nn

CROP_SIZE = 224
PATCH_SIZE = 8
GRID = CROP_SIZE // PATCH_SIZE  # 28 tokens a side
TOKENS = GRID * GRID
EMBED_DIM = 768
VIT_FEATURE_BLOCKS = (6, 7, 8, 9)  # blocks whose outputs (class token dropped) make the 3072 channels
FEATURES = EMBED_DIM * len(VIT_FEATURE_BLOCKS)
SUPERPIXEL_CHANNELS = 256
HEAD_HEADS = 4
MLP_DIM = 768
DROP = 0.1
VIT_VARIANT = "vit_base_patch8_224"

_DATA_PARALLEL_PREFIX = "module."


class ChannelAttention(nn.Module):
    """Attention between the channels of a ``(N, C, T)`` map, the T tokens being the linear layers' width.

    ``forward(query, key_value)`` attends from ``query``'s channels to ``key_value``'s (one map for
    self-attention). The values enter as ``v.transpose(1, 2).reshape(N, C, T)``, a reshuffle of the value matrix
    that the published code does and its checkpoints were trained with; the result adds ``key_value`` back.

    ``cross`` only orders the last two operations as the two published blocks do (reshape before or after the
    product with the attention), which changes the arithmetic of the self-attention block and not its names.
    """

    def __init__(self, tokens: int, cross: bool):
        super().__init__()
        self.cross = cross
        self.c_q = nn.Linear(tokens, tokens)
        self.c_k = nn.Linear(tokens, tokens)
        self.c_v = nn.Linear(tokens, tokens)
        self.scale = tokens ** -0.5
        self.proj_drop = nn.Dropout(DROP)

    def forward(self, query: torch.Tensor, key_value: torch.Tensor | None = None) -> torch.Tensor:
        """``(N, C, T)`` attended maps: ``key_value`` (or ``query``) plus the attention's mixture of its values."""
        key_value = query if key_value is None else key_value
        n, c, t = key_value.shape
        attention = (self.c_q(query) @ self.c_k(key_value).transpose(-2, -1) * self.scale).softmax(dim=-1)
        v = self.c_v(key_value)
        if self.cross:
            mixed = attention @ v.transpose(1, 2).reshape(n, c, t)
        else:
            mixed = (attention @ v).transpose(1, 2).reshape(n, c, t)
        return self.proj_drop(mixed) + key_value


class TextureGate(nn.Module):
    """The texture image pooled to the token grid, then a convolutional gate in (0, 1) per feature channel."""

    def __init__(self, channels: int):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d((GRID, GRID))
        self.texture_attention = nn.Sequential(
            nn.Conv2d(3, channels, kernel_size=3, padding=1), nn.BatchNorm2d(channels),
            nn.Conv2d(channels, channels, kernel_size=1), nn.BatchNorm2d(channels), nn.Sigmoid())

    def forward(self, texture: torch.Tensor) -> torch.Tensor:
        """``(N, C, 28, 28)`` gates from ``(N, 3, 224, 224)`` texture images."""
        return self.texture_attention(self.pool(texture))


class SuperpixelSimilarity(nn.Module):
    """A ``(N, 1, nodes, nodes)`` map of cosine similarities between superpixels, reweighted by itself.

    Each superpixel's sampled pixels go through a 1x1 convolution; their mean and (unbiased) standard deviation
    over the pixels, reduced to ``channels``, make the superpixel's unit-length descriptor.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.pixel_conv = nn.Conv2d(3, channels, kernel_size=1)
        self.reduce_conv = nn.Conv2d(channels * 2, channels, kernel_size=1)
        self.similarity_weight_block = nn.Sequential(nn.Conv2d(1, 1, kernel_size=1), nn.BatchNorm2d(1), nn.ReLU())

    def forward(self, superpixels: torch.Tensor) -> torch.Tensor:
        """``(N, 1, nodes, nodes)`` from ``(N, nodes, pixels, 3)`` superpixel colours."""
        pixels = self.pixel_conv(superpixels.permute(0, 3, 2, 1))  # (N, channels, pixels, nodes)
        pooled = torch.cat([pixels.mean(dim=2, keepdim=True), pixels.std(dim=2, keepdim=True)], dim=1)
        descriptors = F.normalize(self.reduce_conv(pooled), p=2, dim=1).squeeze(2)  # (N, channels, nodes)
        similarity = torch.bmm(descriptors.transpose(1, 2), descriptors).unsqueeze(1)
        return similarity * self.similarity_weight_block(similarity)


class ResBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and a skip connection."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, kernel_size=3, padding=1)
        self.bn1 = nn.BatchNorm2d(dim)
        self.conv2 = nn.Conv2d(dim, dim, kernel_size=3, padding=1)
        self.bn2 = nn.BatchNorm2d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Same shape as ``x``."""
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + x)


class ResBlockGroup(nn.Module):
    """Residual blocks in sequence (two in the published model)."""

    def __init__(self, dim: int, num_blocks: int = 2):
        super().__init__()
        self.blocks = nn.Sequential(*(ResBlock(dim) for _ in range(num_blocks)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Same shape as ``x``."""
        return self.blocks(x)


class DynamicDepthwiseConv(nn.Module):
    """A 3x3 depthwise convolution whose kernels are predicted per image from the image's own features.

    The kernel predictor: average-pool by 2, three depthwise 3x3 convolutions, max-pool by 2, three more, global
    average, then a 1x1 convolution to ``channels * 9`` kernel weights; a learned bias is shared by all images.
    """

    def __init__(self, channels: int, kernel_size: int = 3):
        super().__init__()
        self.channels = channels
        self.kernel_size = kernel_size
        self.pool = nn.AdaptiveAvgPool2d((1, 1))
        self.avgpool = nn.AvgPool2d(kernel_size=2, stride=2)
        self.maxpool = nn.MaxPool2d(kernel_size=2, stride=2)

        def depthwise() -> nn.Sequential:
            return nn.Sequential(*(nn.Conv2d(channels, channels, kernel_size, 1, kernel_size // 2, groups=channels)
                                   for _ in range(3)))

        self.Block1 = depthwise()
        self.Block2 = depthwise()
        self.tokernel = nn.Conv2d(channels, kernel_size ** 2 * channels, 1, 1, 0)
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Each image's channels convolved with the kernels predicted from that image; same shape as ``x``."""
        n, c, h, w = x.shape
        context = self.pool(self.Block2(self.maxpool(self.Block1(self.avgpool(x)))))
        kernels = self.tokernel(context).view(n * c, 1, self.kernel_size, self.kernel_size)
        # All images in one grouped convolution: the batch folded into the channels.
        out = F.conv2d(x.reshape(1, n * c, h, w), kernels, self.bias.repeat(n), padding=self.kernel_size // 2,
                       groups=n * c)
        return out.view(n, c, h, w)


def _vit() -> nn.Module:
    # pretrained=False: weights come only from the checkpoint the user passes, never from a model hub.
    return timm.create_model(VIT_VARIANT, pretrained=False)


def _head_block(dim: int) -> Block:
    """A refinement stage's transformer block, as timm 0.5.5 built it with the authors' arguments.

    No qkv bias, an MLP of 768 hidden units, and PyTorch's LayerNorm (eps 1e-5: timm 0.5.5's ``Block`` default,
    where today's timm defaults to 1e-6).
    """
    return Block(dim=dim, num_heads=HEAD_HEADS, mlp_ratio=MLP_DIM / dim, qkv_bias=False, proj_drop=DROP,
                 norm_layer=nn.LayerNorm)


def _tokens_to_map(x: torch.Tensor) -> torch.Tensor:
    """``(N, T, C)`` tokens to a ``(N, C, 28, 28)`` map."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], GRID, GRID)


def _map_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """``(N, C, 28, 28)`` map to ``(N, T, C)`` tokens."""
    return x.flatten(2).transpose(1, 2)


class DPAM(nn.Module):
    """The DPAM-IQA network: ``forward(rgb, texture, superpixels)`` returns one score per image (see the module)."""

    def __init__(self):
        super().__init__()
        dim = EMBED_DIM
        self.vit = _vit()
        self.simi_matrix = SuperpixelSimilarity(SUPERPIXEL_CHANNELS)
        self.slic_conv = nn.Conv2d(1, FEATURES, 1)
        self.ta = TextureGate(FEATURES)
        self.t_conv = nn.Conv2d(FEATURES, FEATURES, 1)
        self.teablock = nn.ModuleList(ChannelAttention(TOKENS, cross=True) for _ in range(2))
        self.fusionconv = nn.Conv2d(FEATURES * 2, FEATURES, 1)

        self.conv1 = nn.Conv2d(FEATURES, dim, 1)
        self.block1 = _head_block(dim)
        self.resblock1 = ResBlockGroup(dim)
        self.dyd1 = DynamicDepthwiseConv(dim)
        self.catconv1 = nn.Conv2d(dim * 2, dim, 1)
        self.tablock = ChannelAttention(TOKENS, cross=False)

        half = dim // 2
        self.conv2 = nn.Conv2d(dim, half, 1)
        self.block2 = _head_block(half)
        self.resblock2 = ResBlockGroup(half)
        self.dyd2 = DynamicDepthwiseConv(half)
        self.catconv2 = nn.Conv2d(dim, half, 1)

        self.fc_score = nn.Sequential(nn.Linear(half, half), nn.ReLU(), nn.Dropout(DROP), nn.Linear(half, 1),
                                      nn.ReLU())
        self.fc_weight = nn.Sequential(nn.Linear(half, half), nn.ReLU(), nn.Dropout(DROP), nn.Linear(half, 1),
                                       nn.Sigmoid())

    def vit_features(self, rgb: torch.Tensor) -> torch.Tensor:
        """``(N, 3072, 784)``: blocks 6-9's patch tokens, channels first.

        The published model runs the whole ViT and keeps these four outputs; the blocks after the last one
        (and the final norm and classifier) change none of them, so they are not run.
        """
        vit = self.vit
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(rgb))))
        kept = []
        for index, block in enumerate(vit.blocks[:VIT_FEATURE_BLOCKS[-1] + 1]):
            x = block(x)
            if index in VIT_FEATURE_BLOCKS:
                kept.append(x[:, vit.num_prefix_tokens:])
        return torch.cat(kept, dim=2).transpose(1, 2)

    def _stage(self, x: torch.Tensor, block: nn.Module, resblock: nn.Module, dyd: nn.Module,
               catconv: nn.Module) -> torch.Tensor:
        """A transformer block beside residual blocks and a dynamic convolution, merged by a 1x1 convolution."""
        attended = _tokens_to_map(block(_map_to_tokens(x)))
        local = dyd(resblock(x))
        return catconv(torch.cat([attended, local], dim=1))

    def forward(self, rgb: torch.Tensor, texture: torch.Tensor, superpixels: torch.Tensor) -> torch.Tensor:
        """One score per image (or crop) from the three inputs of ``pipeline.scoring.dpam_preprocess``."""
        n = rgb.shape[0]
        slic = self.slic_conv(self.simi_matrix(superpixels))
        slic = F.interpolate(slic, size=(GRID, GRID), mode="bilinear", align_corners=False).flatten(2)
        texture_query = self.t_conv(self.ta(texture)).flatten(2)
        features = self.vit_features(rgb)

        fused = torch.cat([self.teablock[0](texture_query, features), self.teablock[1](slic, features)], dim=1)
        x = self.conv1(self.fusionconv(fused.view(n, FEATURES * 2, GRID, GRID)))
        x = self._stage(x, self.block1, self.resblock1, self.dyd1, self.catconv1)
        x = self.tablock(x.flatten(2)).view(n, EMBED_DIM, GRID, GRID)
        x = self._stage(self.conv2(x), self.block2, self.resblock2, self.dyd2, self.catconv2)

        tokens = _map_to_tokens(x)
        score, weight = self.fc_score(tokens), self.fc_weight(tokens)
        return (score * weight).sum(dim=(1, 2)) / weight.sum(dim=(1, 2))


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The authors' checkpoint keys are this module's; a ``DataParallel`` wrapper's ``module.`` prefix is removed.

    Everything else passes through, so a checkpoint of another model fails the strict load with its keys named.
    """
    if state_dict and all(key.startswith(_DATA_PARALLEL_PREFIX) for key in state_dict):
        return {key[len(_DATA_PARALLEL_PREFIX):]: value for key, value in state_dict.items()}
    return dict(state_dict)


def build_dpam() -> DPAM:
    """Build the DPAM-IQA architecture with random weights, in eval mode."""
    return DPAM().eval()
