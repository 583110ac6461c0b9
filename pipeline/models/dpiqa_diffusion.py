"""DP-IQA: the diffusion-prior model of "Utilizing Diffusion Prior for Blind Image Quality Assessment in the Wild".

The authors (public code ``RomGai/DP-IQA``) publish this model beside the distilled student
(``pipeline.models.dpiqa``). It reads quality from a frozen Stable Diffusion v1.5 denoiser run once at timestep 1:

1. The VAE encoder maps the ``(N, 3, 512, 512)`` image, in [0, 1] as the authors feed it (not the [-1, 1] Stable
   Diffusion was trained on), to a diagonal Gaussian over a ``(N, 4, 64, 64)`` latent. The authors *sample* it
   (``latent_dist.sample()``, unseeded, so their score changes from call to call); ``forward`` takes the noise as
   an argument instead, or ``None`` for the distribution's mean, so a score is a function of the image alone
   (``pipeline.scoring.diffusion_prior`` draws it). The latent is scaled by the VAE's scaling factor (0.18215).
2. The text condition is a fixed set of CLIP ViT-L/14 text features of quality prompts (``prompts``; not part of
   the checkpoint: ``pipeline.scoring.prompt_embeddings`` reads or computes them), each moved by a small learnt
   residual MLP (``text_adapter``, scaled per channel by ``gamma``), and given to the U-Net's cross attention.
3. A T2I ``FullAdapter`` turns the image into four residuals that are added inside the U-Net's down blocks.
4. The outputs of the U-Net's four up blocks (1280, 1280, 640 and 320 channels for SD v1.5) go to the quality
   feature decoder: each is resized to 64x64 (bicubic), convolved to 512 channels and squeezed-and-excited; the
   four are fused, reduced to 8 channels and flattened through three linear layers to one raw score.

The whole network's ``state_dict`` is the authors' checkpoint layout (VAE and U-Net included, decoder of the VAE
too although it is never run), so their files load strictly. The diffusers classes are built from configurations
kept here (``ARCHITECTURES``), never fetched from a model hub: ``sd15`` is Stable Diffusion v1.5's (the published
checkpoints; 859,520,964 U-Net and 83,653,863 VAE parameters), ``tiny`` a small one of the same structure for
tests. Which one a checkpoint needs is read from its shapes (``architecture_of``).

diffusers is an optional dependency (the ``dpiqa`` extra); the scorer's spec names it, so a command asking for
this model without it stops with the install command before anything is read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.models.adapter import FullAdapter
from torch import nn

INPUT_SIZE = 512
DECODER_GRID = 64  # every up-block feature is resized to 64x64 before the decoder's convolutions
DECODER_CHANNELS = 512
SCORE_CHANNELS = (128, 32, 8)
TIMESTEP = 1
GAMMA_INIT = 1e-4  # the authors' initial text-adapter gain
DISTORTION_CLASSES = 24  # an unused classifier in the authors' decoder; kept for the checkpoint layout

_DATA_PARALLEL_PREFIX = "module."


@dataclass(frozen=True)
class Architecture:
    """The configurations the diffusers parts are built from.

    Attributes:
        name: ``sd15`` or ``tiny``.
        vae: ``AutoencoderKL`` keyword arguments.
        unet: ``UNet2DConditionModel`` keyword arguments; its ``block_out_channels`` also size the image adapter
            and the decoder's input convolutions.
        adapter: ``FullAdapter`` keyword arguments besides ``channels``.
        text_dim: Width of the prompt features (the U-Net's cross-attention width).
    """

    name: str
    vae: Mapping = field(default_factory=dict)
    unet: Mapping = field(default_factory=dict)
    adapter: Mapping = field(default_factory=dict)
    text_dim: int = 768

    @property
    def channels(self) -> tuple[int, ...]:
        """The U-Net's block widths, finest first."""
        return tuple(self.unet.get("block_out_channels", (320, 640, 1280, 1280)))


_VAE_FOUR_BLOCKS = {"down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4}

ARCHITECTURES: dict[str, Architecture] = {arch.name: arch for arch in (
    # Stable Diffusion v1.5: diffusers' U-Net defaults are SD v1's but for the CLIP ViT-L/14 cross-attention width.
    Architecture("sd15",
                 vae={**_VAE_FOUR_BLOCKS, "block_out_channels": (128, 256, 512, 512), "layers_per_block": 2,
                      "sample_size": 512},
                 unet={"cross_attention_dim": 768, "sample_size": 64},
                 adapter={"num_res_blocks": 2},
                 text_dim=768),
    # The same structure at a size a test builds in a second: four blocks each, so the latent is still 1/8 of
    # the image and the adapter's residuals still meet the U-Net's down blocks at their resolutions.
    Architecture("tiny",
                 vae={**_VAE_FOUR_BLOCKS, "block_out_channels": (16, 16, 32, 32), "layers_per_block": 1,
                      "norm_num_groups": 8, "sample_size": 512},
                 unet={"block_out_channels": (32, 64, 64, 64), "layers_per_block": 1, "cross_attention_dim": 32,
                       "attention_head_dim": 4, "norm_num_groups": 8, "sample_size": 64},
                 adapter={"num_res_blocks": 1},
                 text_dim=32),
)}


class SqueezeExcite(nn.Module):
    """Channel gates from the pooled map (reduction 16, no biases), as in the authors' decoder."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(channels, channels // reduction, bias=False), nn.ReLU(),
                                nn.Linear(channels // reduction, channels, bias=False), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` with each channel scaled by its gate."""
        return x * self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))[:, :, None, None]


class QualityFeatureDecoder(nn.Module):
    """Four up-block features to one raw score (the authors' ``QFD``; its attribute names are their keys).

    ``bnc1``, ``dropout`` and ``classifier_dist`` are in the authors' module but not in its forward pass; the
    first and last are kept for the checkpoint layout.
    """

    def __init__(self, channels: Sequence[int]):
        super().__init__()
        for i, width in enumerate(channels, start=1):
            setattr(self, f"conv{i}", nn.Conv2d(width, DECODER_CHANNELS, kernel_size=3, padding=1))
            setattr(self, f"se{i}", SqueezeExcite(DECODER_CHANNELS))
        self.fuse_conv = nn.Conv2d(DECODER_CHANNELS * len(channels), DECODER_CHANNELS, kernel_size=3, padding=1)
        self.se_fuse = SqueezeExcite(DECODER_CHANNELS)
        self.bnc1 = nn.BatchNorm2d(DECODER_CHANNELS)
        widths = (DECODER_CHANNELS, *SCORE_CHANNELS)
        for i, (a, b) in enumerate(zip(widths, widths[1:], strict=False), start=1):
            setattr(self, f"conv_score{i}", nn.Conv2d(a, b, kernel_size=1))
        self.fc1 = nn.Linear(SCORE_CHANNELS[-1] * DECODER_GRID * DECODER_GRID, DECODER_CHANNELS)
        self.fc2 = nn.Linear(DECODER_CHANNELS, DECODER_CHANNELS)
        self.fc3 = nn.Linear(DECODER_CHANNELS, 1)
        self.classifier_dist = nn.Linear(DECODER_CHANNELS, DISTORTION_CLASSES)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """``features``: the up blocks' outputs from the finest (last up block) to the coarsest; ``(N,)`` out."""
        maps = []
        for i, x in enumerate(features, start=1):
            x = F.interpolate(x, size=(DECODER_GRID, DECODER_GRID), mode="bicubic", align_corners=False)
            maps.append(getattr(self, f"se{i}")(getattr(self, f"conv{i}")(x)))
        x = self.se_fuse(self.fuse_conv(torch.cat(maps, dim=1)))
        for i in range(1, len(SCORE_CHANNELS) + 1):
            x = F.relu(getattr(self, f"conv_score{i}")(x))
        x = F.relu(self.fc1(x.flatten(1)))
        x = F.relu(self.fc2(x))
        return self.fc3(x).view(-1)


class TextAdapter(nn.Module):
    """``prompts + gamma * MLP(prompts)``: the learnt move of the fixed prompt features.

    ``gamma`` is the parent's parameter, as in the authors' layout.
    """

    def __init__(self, text_dim: int):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(text_dim, text_dim), nn.GELU(), nn.Linear(text_dim, text_dim))

    def forward(self, prompts: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        """The moved ``(P, text_dim)`` features."""
        return prompts + gamma * self.fc(prompts)


class DpiqaDiffusion(nn.Module):
    """The DP-IQA network; see the module docstring.

    Args:
        architecture: One of ``ARCHITECTURES``.
    """

    def __init__(self, architecture: Architecture = ARCHITECTURES["sd15"]):
        super().__init__()
        self.architecture = architecture
        self.vae = AutoencoderKL(**architecture.vae)
        self.unet = UNet2DConditionModel(**architecture.unet)
        self.gamma = nn.Parameter(torch.full((architecture.text_dim,), GAMMA_INIT))
        self.text_adapter = TextAdapter(architecture.text_dim)
        self.img_adapter = FullAdapter(channels=list(architecture.channels), **architecture.adapter)
        self.QFD = QualityFeatureDecoder(architecture.channels)
        # The prompt features are the user's (a CLIP text model's output), not the checkpoint's: a buffer outside
        # the state dict, set by ``set_prompts`` (None until then, so a network built on the meta device and given
        # its weights by assignment holds no meta tensor).
        self.register_buffer("prompts", None, persistent=False)
        self._up_features: list[torch.Tensor] = []
        for block in self.unet.up_blocks:
            block.register_forward_hook(lambda module, args, output: self._up_features.append(output))

    def set_prompts(self, prompts: torch.Tensor) -> None:
        """Use these ``(P, text_dim)`` prompt features (any number of prompts).

        Raises:
            ValueError: Not a 2-D floating tensor of the model's text width.
        """
        if prompts.ndim != 2 or not prompts.is_floating_point() or prompts.shape[1] != self.architecture.text_dim \
                or prompts.shape[0] < 1:
            raise ValueError(f"prompt features must be a (prompts, {self.architecture.text_dim}) float tensor, got "
                             f"{tuple(prompts.shape)} {str(prompts.dtype).removeprefix('torch.')}")
        self.prompts = prompts.detach().to(self.gamma.device, torch.float32).clone()

    def latents(self, images: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        """The scaled VAE latent: ``mean + std * noise``, or the mean when ``noise`` is None.

        ``mean + std * noise`` is what diffusers' ``latent_dist.sample()`` computes from its own draw.
        """
        posterior = self.vae.encode(images).latent_dist
        latent = posterior.mean if noise is None else posterior.mean + posterior.std * noise.to(posterior.mean)
        return latent * self.vae.config.scaling_factor

    def forward(self, images: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Score images.

        Args:
            images: ``(N, 3, 512, 512)`` RGB in [0, 1] (``pipeline.scoring.dpiqa_preprocess``).
            noise: ``(N, 4, 64, 64)`` standard normal draws for the latent, or None for its mean.

        Returns:
            ``(N,)`` raw scores.
        """
        if self.prompts is None:
            raise RuntimeError("DP-IQA has no prompt features: call set_prompts first")
        latent = self.latents(images, noise)
        context = self.text_adapter(self.prompts, self.gamma).expand(len(images), -1, -1)
        timestep = torch.full((len(images),), TIMESTEP, dtype=torch.long, device=images.device)
        self._up_features.clear()
        try:
            self.unet(latent, timestep, encoder_hidden_states=context,
                      down_intrablock_additional_residuals=list(self.img_adapter(images)))
            features = self._up_features[::-1]  # the decoder takes the finest map first
        finally:
            self._up_features = []
        return self.QFD(features)


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip a ``DataParallel`` ``module.`` prefix; the authors' ``model.state_dict()`` needs nothing else."""
    return {key.removeprefix(_DATA_PARALLEL_PREFIX): value for key, value in state_dict.items()}


def architecture_of(state_dict: Mapping[str, torch.Tensor]) -> Architecture:
    """The architecture a checkpoint was saved from, told by its U-Net's first and its cross-attention widths.

    Falls back to ``sd15`` (the published one) when none matches, so the strict load names what differs.
    """
    conv_in = state_dict.get("unet.conv_in.weight")
    text = state_dict.get("gamma")
    for arch in ARCHITECTURES.values():
        if conv_in is not None and text is not None and conv_in.shape[0] == arch.channels[0] \
                and text.shape[0] == arch.text_dim:
            return arch
    return ARCHITECTURES["sd15"]


def build_dpiqa(architecture: str | Architecture = "sd15") -> DpiqaDiffusion:
    """The DP-IQA network with random weights, in eval mode."""
    arch = ARCHITECTURES[architecture] if isinstance(architecture, str) else architecture
    return DpiqaDiffusion(arch).eval()
