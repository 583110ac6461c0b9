"""The scorer: both models loaded once, images in, crop-averaged DGIQA scores out.

The same ``Scorer`` serves the ``dgiqa score`` command and the Ray actor pool, so a score does not depend on
how it was asked for. It is deliberately heavy to construct (weights are read, hashed and loaded) and cheap to
call; its config is a small picklable dataclass that can be shipped to workers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from pipeline.models import depth_anything as da
from pipeline.models.dgiqa import build_dgiqa
from pipeline.models.dgiqa import checkpoint_filter_fn as dgiqa_filter
from pipeline.preprocess import PreprocessConfig, decode_image, depth_model_input, depth_to_map, quality_inputs
from pipeline.weights import WeightsError, load_strict, read_checkpoint

ENCODER_CHOICES = ("auto", *da.ENCODERS)
DEVICE_CHOICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class ScorerConfig:
    """What to load and how to score; cheap to build and to pickle.

    Attributes:
        weights: URI of the DGIQA checkpoint.
        depth_weights: URI of the Depth Anything checkpoint.
        encoder: Depth Anything encoder, or ``auto`` to read it from the checkpoint's shapes.
        depth_version: ``v1`` (the published DGIQA pairing) or ``v2``.
        device: ``auto`` (CUDA when this process sees a GPU), ``cpu`` or ``cuda``.
        crop_batch: Crops per DGIQA forward pass; crops of several images share one pass.
        preprocess: Resize, crop and safety limits.
        storage_options: fsspec options for reading the weights.
    """

    weights: str
    depth_weights: str
    encoder: str = "auto"
    depth_version: str = "v1"
    device: str = "auto"
    crop_batch: int = 40
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    storage_options: Mapping | None = None

    def __post_init__(self):
        if self.encoder not in ENCODER_CHOICES:
            raise ValueError(f"encoder must be one of {', '.join(ENCODER_CHOICES)}, got {self.encoder!r}")
        if self.depth_version not in da.VERSIONS:
            raise ValueError(f"depth_version must be one of {', '.join(da.VERSIONS)}, got {self.depth_version!r}")
        if self.device not in DEVICE_CHOICES:
            raise ValueError(f"device must be one of {', '.join(DEVICE_CHOICES)}, got {self.device!r}")
        if self.crop_batch < 1:
            raise ValueError(f"crop_batch must be at least 1, got {self.crop_batch}")


@dataclass(frozen=True)
class ImageScore:
    """One image's result.

    Attributes:
        score: Mean of the crop scores, in [0, 1].
        score_std: Population standard deviation of the crop scores (how much the crops disagree).
        num_crops: Crops averaged.
        width: Width of the decoded, EXIF-oriented image.
        height: Height of the decoded, EXIF-oriented image.
    """

    score: float
    score_std: float
    num_crops: int
    width: int
    height: int


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when this process can see a GPU, else CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but this process sees no CUDA device")
    return torch.device(name)


class Scorer:
    """DGIQA and Depth Anything, loaded once, scoring images the way the published inference does.

    Args:
        config: What to load.

    Raises:
        WeightsError: A checkpoint cannot be read or does not fit its model.
        ValueError: The device cannot be used.
    """

    def __init__(self, config: ScorerConfig):
        self.config = config
        self.device = resolve_device(config.device)
        dgiqa_ckpt = read_checkpoint(config.weights, config.storage_options)
        depth_ckpt = read_checkpoint(config.depth_weights, config.storage_options)
        depth_state = da.checkpoint_filter_fn(depth_ckpt.state_dict)
        try:
            found = da.encoder_of(depth_state)
        except KeyError as exc:
            raise WeightsError(f"--depth-weights {depth_ckpt.path}: {exc.args[0]}") from None
        if config.encoder not in ("auto", found):
            raise WeightsError(f"--encoder {config.encoder} was given, but --depth-weights {depth_ckpt.path} "
                               f"holds a {found} model")
        self.encoder = found
        self.dgiqa = build_dgiqa()
        load_strict(self.dgiqa, dgiqa_ckpt.state_dict, f"DGIQA (--weights {dgiqa_ckpt.path})", dgiqa_filter)
        self.depth_model = da.build_depth_anything(found, config.depth_version)
        load_strict(self.depth_model, depth_state, f"Depth Anything {found} (--depth-weights {depth_ckpt.path})")
        self.dgiqa.to(self.device)
        self.depth_model.to(self.device)
        self.dgiqa_sha256 = dgiqa_ckpt.sha256
        self.depth_sha256 = depth_ckpt.sha256
        self.model_id = (f"dgiqa@{dgiqa_ckpt.sha256}"
                         f"+depth-anything-{config.depth_version}-{found}@{depth_ckpt.sha256}")

    @torch.inference_mode()
    def depth_map(self, rgb: np.ndarray) -> np.ndarray:
        """The uint8 ``(H, W, 3)`` depth map DGIQA sees for an ``(H, W, 3)`` uint8 RGB image."""
        x = depth_model_input(rgb, self.config.preprocess)[None].to(self.device)
        depth = self.depth_model(x)[0]
        return depth_to_map(depth, rgb.shape[0], rgb.shape[1])

    @torch.inference_mode()
    def score_images(self, images: Sequence[np.ndarray]) -> list[ImageScore]:
        """Score decoded ``(H, W, 3)`` uint8 RGB images; their crops share DGIQA forward passes."""
        cfg = self.config.preprocess
        rgb_crops, depth_crops = [], []
        for rgb in images:
            image_crops, map_crops = quality_inputs(rgb, self.depth_map(rgb), cfg)
            rgb_crops.append(image_crops)
            depth_crops.append(map_crops)
        if not images:
            return []
        all_rgb, all_depth = torch.cat(rgb_crops), torch.cat(depth_crops)
        step = self.config.crop_batch
        crop_scores = torch.cat([
            self.dgiqa(all_rgb[i:i + step].to(self.device), all_depth[i:i + step].to(self.device)).float().cpu()
            for i in range(0, all_rgb.shape[0], step)
        ])
        results = []
        for i, rgb in enumerate(images):
            per_crop = crop_scores[i * cfg.num_crops:(i + 1) * cfg.num_crops]
            results.append(ImageScore(score=per_crop.mean().item(), score_std=per_crop.std(correction=0).item(),
                                      num_crops=cfg.num_crops, width=rgb.shape[1], height=rgb.shape[0]))
        return results

    def score_bytes(self, data: bytes) -> ImageScore:
        """Decode and score one encoded image.

        Raises:
            ImageError: The bytes are not a scorable image.
        """
        return self.score_images([decode_image(data, self.config.preprocess)])[0]
