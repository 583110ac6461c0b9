"""Depth Anything (V1, and V2 as a second ``version``): a DINOv2 ViT/14 encoder and a DPT decoder.

The encoder is timm's ``VisionTransformer`` configured as DINOv2 (patch 14, 518 px, LayerScale), never loaded
from a hub. Two details follow the published DINOv2 code rather than timm, because the depth maps (and so
DGIQA's scores) depend on them:

* position embeddings for a grid other than 37x37 are resampled bicubically *by a scale factor* of
  ``(n + 0.1) / 37`` per axis, the way the published code does, not to a target size as timm does;
* the decoder reads the outputs of four blocks (V1: the last four; V2: fixed indices), each passed through
  the final LayerNorm, with the class token dropped.

Parameter names equal the published checkpoints (``pretrained.*``, ``depth_head.*``), so they load strictly.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from pipeline.models.attention import set_attention

PATCH_SIZE = 14
PRETRAIN_GRID = 37  # 518 / 14: the grid the position embeddings were trained on
POS_EMBED_OFFSET = 0.1


@dataclass(frozen=True)
class EncoderSpec:
    """Sizes of one Depth Anything encoder variant."""

    embed_dim: int
    depth: int
    num_heads: int
    features: int
    out_channels: tuple[int, int, int, int]
    v2_layers: tuple[int, int, int, int]


ENCODERS: dict[str, EncoderSpec] = {
    "vits": EncoderSpec(384, 12, 6, 64, (48, 96, 192, 384), (2, 5, 8, 11)),
    "vitb": EncoderSpec(768, 12, 12, 128, (96, 192, 384, 768), (2, 5, 8, 11)),
    "vitl": EncoderSpec(1024, 24, 16, 256, (256, 512, 1024, 1024), (4, 11, 17, 23)),
}
VERSIONS = ("v1", "v2")


class DinoV2Encoder(VisionTransformer):
    """timm ViT laid out as DINOv2 (with its unused ``mask_token``), returning normalised block outputs."""

    def __init__(self, spec: EncoderSpec):
        super().__init__(
            img_size=PRETRAIN_GRID * PATCH_SIZE,
            patch_size=PATCH_SIZE,
            embed_dim=spec.embed_dim,
            depth=spec.depth,
            num_heads=spec.num_heads,
            mlp_ratio=4.0,
            init_values=1.0,
            num_classes=0,
        )
        # Present in every DINOv2 checkpoint (used only in self-supervised training); kept for strict loading.
        self.mask_token = nn.Parameter(torch.zeros(1, spec.embed_dim))

    def interpolated_pos_embed(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """Position embeddings (class token first) for a ``grid_h`` x ``grid_w`` patch grid."""
        pos_embed = self.pos_embed
        if grid_h == grid_w == PRETRAIN_GRID:
            return pos_embed
        dim = pos_embed.shape[-1]
        patch_pos = pos_embed[:, 1:].float().reshape(1, PRETRAIN_GRID, PRETRAIN_GRID, dim).permute(0, 3, 1, 2)
        scale = ((grid_h + POS_EMBED_OFFSET) / PRETRAIN_GRID, (grid_w + POS_EMBED_OFFSET) / PRETRAIN_GRID)
        patch_pos = F.interpolate(patch_pos, scale_factor=scale, mode="bicubic", align_corners=False)
        if patch_pos.shape[-2:] != (grid_h, grid_w):
            raise RuntimeError(f"position embedding resampled to {tuple(patch_pos.shape[-2:])}, "
                               f"expected {(grid_h, grid_w)}")
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, dim)
        return torch.cat([pos_embed[:, :1].float(), patch_pos], dim=1).to(pos_embed.dtype)

    def block_outputs(self, x: torch.Tensor, indices: tuple[int, ...]) -> list[torch.Tensor]:
        """Patch tokens ``(N, grid_h * grid_w, C)`` after the blocks in ``indices``, each LayerNorm-ed."""
        grid_h, grid_w = x.shape[-2] // PATCH_SIZE, x.shape[-1] // PATCH_SIZE
        tokens = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        tokens = tokens + self.interpolated_pos_embed(grid_h, grid_w)
        wanted = set(indices)
        outputs = []
        for i, block in enumerate(self.blocks):
            tokens = block(tokens)
            if i in wanted:
                outputs.append(self.norm(tokens)[:, 1:])
        return outputs


class ResidualConvUnit(nn.Module):
    """Pre-activation residual unit of the DPT refinement path (no BatchNorm in Depth Anything)."""

    def __init__(self, features: int):
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(features, features, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual refinement of ``x``."""
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class FeatureFusionBlock(nn.Module):
    """Merges a coarser path with a skip connection, then upsamples (bilinear, corners aligned)."""

    def __init__(self, features: int):
        super().__init__()
        self.out_conv = nn.Conv2d(features, features, kernel_size=1)
        self.resConfUnit1 = ResidualConvUnit(features)  # noqa: N815 - published checkpoint key
        self.resConfUnit2 = ResidualConvUnit(features)  # noqa: N815 - published checkpoint key

    def forward(self, path: torch.Tensor, skip: torch.Tensor | None = None,
                size: tuple[int, int] | None = None) -> torch.Tensor:
        """Fuse and upsample to ``size`` (twice the input size when omitted)."""
        if skip is not None:
            path = path + self.resConfUnit1(skip)
        path = self.resConfUnit2(path)
        if size is None:
            path = F.interpolate(path, scale_factor=2, mode="bilinear", align_corners=True)
        else:
            path = F.interpolate(path, size=size, mode="bilinear", align_corners=True)
        return self.out_conv(path)


class DPTHead(nn.Module):
    """The DPT decoder of Depth Anything: four token maps in, one relative (inverse) depth map out."""

    def __init__(self, in_channels: int, features: int, out_channels: tuple[int, int, int, int]):
        super().__init__()
        self.projects = nn.ModuleList(nn.Conv2d(in_channels, c, kernel_size=1) for c in out_channels)
        self.resize_layers = nn.ModuleList([
            nn.ConvTranspose2d(out_channels[0], out_channels[0], kernel_size=4, stride=4),
            nn.ConvTranspose2d(out_channels[1], out_channels[1], kernel_size=2, stride=2),
            nn.Identity(),
            nn.Conv2d(out_channels[3], out_channels[3], kernel_size=3, stride=2, padding=1),
        ])
        scratch = nn.Module()
        for i, c in enumerate(out_channels, start=1):
            scratch.add_module(f"layer{i}_rn", nn.Conv2d(c, features, kernel_size=3, padding=1, bias=False))
        for i in range(1, 5):
            scratch.add_module(f"refinenet{i}", FeatureFusionBlock(features))
        scratch.output_conv1 = nn.Conv2d(features, features // 2, kernel_size=3, padding=1)
        scratch.output_conv2 = nn.Sequential(
            nn.Conv2d(features // 2, 32, kernel_size=3, padding=1),
            nn.ReLU(True),
            nn.Conv2d(32, 1, kernel_size=1),
            nn.ReLU(True),
            nn.Identity(),
        )
        self.scratch = scratch

    def forward(self, tokens: list[torch.Tensor], grid_h: int, grid_w: int) -> torch.Tensor:
        """Decode four ``(N, grid_h * grid_w, C)`` token maps into ``(N, 1, 14 * grid_h, 14 * grid_w)``."""
        layers = []
        for i, t in enumerate(tokens):
            x = t.permute(0, 2, 1).reshape(t.shape[0], t.shape[-1], grid_h, grid_w)
            layers.append(self.resize_layers[i](self.projects[i](x)))
        s = self.scratch
        rn = [getattr(s, f"layer{i}_rn")(x) for i, x in enumerate(layers, start=1)]
        path = s.refinenet4(rn[3], size=rn[2].shape[2:])
        path = s.refinenet3(path, rn[2], size=rn[1].shape[2:])
        path = s.refinenet2(path, rn[1], size=rn[0].shape[2:])
        path = s.refinenet1(path, rn[0])
        out = s.output_conv1(path)
        out = F.interpolate(out, (grid_h * PATCH_SIZE, grid_w * PATCH_SIZE), mode="bilinear", align_corners=True)
        return s.output_conv2(out)


class DepthAnything(nn.Module):
    """Depth Anything: ``forward(x)`` maps ``(N, 3, H, W)`` (multiples of 14) to ``(N, H, W)`` relative depth.

    Args:
        encoder: ``vits``, ``vitb`` or ``vitl``.
        version: ``v1`` (decoder reads the last four blocks) or ``v2`` (fixed intermediate blocks).
    """

    def __init__(self, encoder: str = "vits", version: str = "v1"):
        super().__init__()
        if encoder not in ENCODERS:
            raise ValueError(f"unknown Depth Anything encoder {encoder!r}; expected one of {sorted(ENCODERS)}")
        if version not in VERSIONS:
            raise ValueError(f"unknown Depth Anything version {version!r}; expected one of {VERSIONS}")
        spec = ENCODERS[encoder]
        self.encoder = encoder
        self.version = version
        self.layer_indices = tuple(range(spec.depth - 4, spec.depth)) if version == "v1" else spec.v2_layers
        self.pretrained = DinoV2Encoder(spec)
        self.depth_head = DPTHead(spec.embed_dim, spec.features, spec.out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Relative inverse depth (larger is nearer), non-negative, at the input resolution."""
        h, w = x.shape[-2:]
        if h % PATCH_SIZE or w % PATCH_SIZE:
            raise ValueError(f"Depth Anything input sides must be multiples of {PATCH_SIZE}, got {h}x{w}")
        tokens = self.pretrained.block_outputs(x, self.layer_indices)
        depth = self.depth_head(tokens, h // PATCH_SIZE, w // PATCH_SIZE)
        if self.version == "v1":
            # V1 resizes to the input size once more; a no-op in size, kept for the published numerics.
            depth = F.interpolate(depth, size=(h, w), mode="bilinear", align_corners=True)
        return F.relu(depth).squeeze(1)


def encoder_of(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Tell the encoder variant of a Depth Anything checkpoint from its shapes (embedding width and depth)."""
    pos = state_dict.get("pretrained.pos_embed")
    if pos is None:
        raise KeyError("not a Depth Anything checkpoint: it has no 'pretrained.pos_embed'")
    blocks = {int(k.split(".")[2]) for k in state_dict if k.startswith("pretrained.blocks.")}
    for name, spec in ENCODERS.items():
        if pos.shape[-1] == spec.embed_dim and len(blocks) == spec.depth:
            return name
    raise KeyError(f"not a known Depth Anything encoder: embedding width {pos.shape[-1]}, {len(blocks)} blocks")


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map Depth Anything checkpoints to this module's keys.

    The published files already use them; blocks saved in DINOv2's chunked layout (``blocks.<chunk>.<i>``,
    used when DINOv2 is built with ``block_chunks > 0``) are flattened. Other keys pass through unchanged, so a
    wrong checkpoint fails the strict load with its own key names.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if key.startswith("pretrained.blocks.") and len(parts) > 4 and parts[3].isdigit():
            key = ".".join(["pretrained", "blocks", *parts[3:]])
        out[key] = value
    return out


def build_depth_anything(encoder: str = "vits", version: str = "v1") -> DepthAnything:
    """Build Depth Anything with random weights, in eval mode, attention in the fused kernel."""
    model = DepthAnything(encoder, version).eval()
    set_attention(model, "sdpa")  # explicit: timm's default follows the TIMM_FUSED_ATTN environment variable
    return model

