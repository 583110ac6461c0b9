"""Image preprocessing identical to the DPAM-IQA authors' data loaders, made deterministic.

The authors' loaders (one per training set) turn an image into three inputs; this module reproduces them with
OpenCV, pixel for pixel:

* **the ViT input**: the image (BGR) resized to 224x224 with OpenCV's bicubic, aspect ratio not kept, then RGB;
  ``to_tensors`` scales it to [-1, 1] (``(x / 255 - 0.5) / 0.5``);
* **the texture image**: the grey image minus its Gaussian blur (sigma 2), subtracted in uint8 so that negative
  details wrap around to 255, 254, ... (as the authors' numpy arithmetic does), divided by 255, repeated to three
  planes and resized to 224x224 with OpenCV's float bicubic (whose planes differ in the last bit, so all three
  are kept);
* **the superpixel features**: SLIC (OpenCV contrib's ``ximgproc``, its default SLICO algorithm, 10 iterations)
  on the LAB image at the preset's size; ``nodes`` superpixels are picked evenly from the non-empty labels in
  ascending order, and from each, ``pixels`` pixels evenly in raster order; their BGR colours, in [0, 1].

Which image feeds the ViT and texture inputs depends on the training set, as in the authors' loaders: the whole
image for the authentic-distortion sets (LIVE Challenge, KonIQ-10k, SPAQ), a 224x224 crop for the synthetic ones
(KADID-10k, TID2013, CSIQ), where the authors take one random crop even when validating. Here the synthetic
presets score the five crops of the authors' ``five_point_crop`` (the four corners and the centre) instead, and
the score is their mean; the superpixels always come from the whole image.

Randomness: where an image has fewer superpixels than ``nodes``, or a superpixel fewer pixels than ``pixels``,
the authors draw from NumPy's global generator. Here each image draws from its own
``numpy.random.RandomState(SLIC_SEED)``, in the same order of calls, so an image's inputs do not depend on the
batch, the worker or the images before it, and equal the authors' when their global generator is seeded with
``SLIC_SEED`` just before the image (which is how the parity numbers in ``tests/data/`` were made).

The authors' ``test_score.py`` (their single-image inference) prepares images as their LIVE Challenge loader
does, so ``livec`` is the default preset.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from pipeline.models.dpam import CROP_SIZE
from pipeline.scoring.preprocess import ImageError, PreprocessConfig, decode_image

SLIC_SEED = 0
TEXTURE_SIGMA = 2.0
SLIC_ITERATIONS = 10
SLIC_RULER = 10.0  # passed as the authors do; SLICO adapts its compactness and ignores it


@dataclass(frozen=True)
class DpamPreset:
    """The preprocessing of one of the authors' data loaders (the training set a checkpoint was trained on).

    Attributes:
        slic_size: ``(width, height)`` the image is resized to (bicubic) before SLIC; None: its own size.
        nodes: Superpixels kept (``image_n_nodes``).
        pixels: Pixels kept per superpixel (``patch_n_nodes``).
        region_size: SLIC's initial superpixel side in pixels.
        five_crops: Score the five 224x224 crops (synthetic sets) rather than the whole image resized.
    """

    slic_size: tuple[int, int] | None
    nodes: int
    pixels: int
    region_size: int
    five_crops: bool


PRESETS: dict[str, DpamPreset] = {
    "livec": DpamPreset((500, 500), 140, 600, 40, five_crops=False),
    "koniq10k": DpamPreset(None, 135, 1200, 74, five_crops=False),
    "spaq": DpamPreset((512, 384), 99, 600, 45, five_crops=False),
    "kadid10k": DpamPreset(None, 99, 600, 45, five_crops=True),
    "tid2013": DpamPreset(None, 99, 600, 45, five_crops=True),
    "csiq": DpamPreset((500, 500), 140, 600, 40, five_crops=True),
}
DEFAULT_PRESET = "livec"


@dataclass(frozen=True)
class PreparedDpam:
    """One image's three inputs, ready for the network (uint8 where the authors' values are whole levels).

    Attributes:
        rgb: ``(crops, 224, 224, 3)`` uint8 RGB.
        texture: ``(crops, 224, 224, 3)`` float32 texture images.
        superpixels: ``(nodes, pixels, 3)`` uint8 BGR superpixel colours (shared by the crops).
        height: Height of the decoded, EXIF-oriented image.
        width: Width of the decoded, EXIF-oriented image.
    """

    rgb: np.ndarray
    texture: np.ndarray
    superpixels: np.ndarray
    height: int
    width: int

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The arrays to ship between Ray stages."""
        return {"rgb": self.rgb, "texture": self.texture, "superpixels": self.superpixels}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], height: int, width: int) -> PreparedDpam:
        """Rebuild from ``to_arrays`` output."""
        return cls(rgb=arrays["rgb"], texture=arrays["texture"], superpixels=arrays["superpixels"], height=height,
                   width=width)


def five_crop_corners(height: int, width: int, size: int = CROP_SIZE) -> list[tuple[int, int]]:
    """``(top, left)`` of the authors' five-point crops: the four corners, then the centre."""
    return [(0, 0), (0, width - size), (height - size, 0), (height - size, width - size),
            (height // 2 - size // 2, width // 2 - size // 2)]


def texture_image(bgr: np.ndarray) -> np.ndarray:
    """``(224, 224, 3)`` float32: the grey image minus its sigma-2 Gaussian blur, wrapped in uint8, resized."""
    grey = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
    detail = grey - cv2.GaussianBlur(grey, (0, 0), sigmaX=TEXTURE_SIGMA, sigmaY=TEXTURE_SIGMA)  # uint8: wraps
    planes = np.repeat((detail.astype(np.float32) / 255)[:, :, None], 3, axis=2)
    return cv2.resize(planes, (CROP_SIZE, CROP_SIZE), interpolation=cv2.INTER_CUBIC)


def decode_bgr(data: bytes, config: PreprocessConfig | None = None) -> np.ndarray:
    """Decode to an ``(H, W, 3)`` uint8 array in OpenCV's channel order, orientation applied, as ``cv2.imread``.

    Raises:
        ImageError: The bytes are not a scorable image (``config``'s limits; the defaults when None).
    """
    return np.ascontiguousarray(decode_image(data, config or PreprocessConfig())[:, :, ::-1])


def vit_input(bgr: np.ndarray) -> np.ndarray:
    """``(224, 224, 3)`` uint8 RGB: ``bgr`` resized with OpenCV's bicubic, aspect ratio not kept."""
    resized = cv2.resize(bgr, (CROP_SIZE, CROP_SIZE), interpolation=cv2.INTER_CUBIC)
    return cv2.cvtColor(resized, cv2.COLOR_BGR2RGB)


def slic_min_side(region_size: int) -> int:
    """The shortest side OpenCV's SLICO segments at ``region_size``; a shorter one crashes the process.

    SLICO's first seed sits ``region_size // 2`` px in from the top-left corner; where that is outside the image
    there is no seed, and ``iterate`` then segfaults rather than raising.
    """
    return region_size // 2 + 1


def superpixel_features(bgr: np.ndarray, preset: DpamPreset, seed: int = SLIC_SEED) -> np.ndarray:
    """``(nodes, pixels, 3)`` uint8 BGR colours sampled from SLIC superpixels of ``bgr`` (see the module).

    Raises:
        ImageError: A side of the image SLIC runs on is under ``slic_min_side(preset.region_size)`` (presets
            that segment the image at its own size).
    """
    image = bgr if preset.slic_size is None else cv2.resize(bgr, preset.slic_size, interpolation=cv2.INTER_CUBIC)
    height, width = image.shape[:2]
    if min(height, width) < slic_min_side(preset.region_size):
        raise ImageError(f"image is {width}x{height}; SLIC superpixels of region size {preset.region_size} need "
                         f"both sides at least {slic_min_side(preset.region_size)} px")
    slic = cv2.ximgproc.createSuperpixelSLIC(cv2.cvtColor(image, cv2.COLOR_BGR2LAB),
                                             region_size=preset.region_size, ruler=SLIC_RULER)
    slic.iterate(SLIC_ITERATIONS)
    labels = slic.getLabels().ravel()
    rng = np.random.RandomState(seed)

    # Pixels grouped by label, each group in raster order (a stable sort keeps it): np.where's order, per label.
    by_label = np.argsort(labels, kind="stable")
    counts = np.bincount(labels, minlength=slic.getNumberOfSuperpixels())
    starts = np.concatenate([[0], np.cumsum(counts)])
    present = [int(label) for label in np.flatnonzero(counts)]
    if len(present) >= preset.nodes:
        chosen = [present[i] for i in np.linspace(0, len(present) - 1, preset.nodes, dtype=int)]
    else:
        chosen = present
        while len(chosen) < preset.nodes:  # the authors draw from the list they are extending
            chosen.append(rng.choice(chosen))

    colours = image.reshape(-1, 3)
    out = np.empty((preset.nodes, preset.pixels, 3), np.uint8)
    for node, label in enumerate(chosen):
        members = by_label[starts[label]:starts[label + 1]]
        if len(members) >= preset.pixels:
            picked = members[np.linspace(0, len(members) - 1, preset.pixels, dtype=int)]
        else:  # sampled with replacement, then put back in raster order
            picked = np.sort(members[rng.choice(len(members), preset.pixels, replace=True)])
        out[node] = colours[picked]
    return out


def prepare_dpam(data: bytes, config: PreprocessConfig | None = None, trained_on: str = DEFAULT_PRESET,
                 superpixels: np.ndarray | None = None) -> PreparedDpam:
    """Decode one image and make its DPAM inputs with the preprocessing of the loader for ``trained_on``.

    Of ``config`` (the defaults when None) only the size limits apply. ``superpixels``: the image's features
    computed before (training's cache), so SLIC is not run again.

    Raises:
        ImageError: The bytes are not a scorable image, or (five-crop presets) a side is under 224 px.
        ValueError: ``trained_on`` names no preset.
    """
    if trained_on not in PRESETS:
        raise ValueError(f"trained_on must be one of {', '.join(PRESETS)}, got {trained_on!r}")
    preset = PRESETS[trained_on]
    bgr = decode_bgr(data, config)
    height, width = bgr.shape[:2]
    if preset.five_crops:
        if min(height, width) < CROP_SIZE:
            raise ImageError(f"image is {width}x{height}; the {trained_on} preset scores 224x224 crops, so both "
                             f"sides must be at least {CROP_SIZE} px")
        views = [bgr[top:top + CROP_SIZE, left:left + CROP_SIZE] for top, left in five_crop_corners(height, width)]
    else:
        views = [bgr]
    return PreparedDpam(rgb=np.stack([vit_input(view) for view in views]),
                        texture=np.stack([texture_image(view) for view in views]),
                        superpixels=superpixel_features(bgr, preset) if superpixels is None else superpixels,
                        height=height, width=width)


def prepare_for_scoring(data: bytes, config: PreprocessConfig, trained_on: str = DEFAULT_PRESET) -> PreparedDpam:
    """The scorer registry's preprocessing step (``trained_on``: ``--trained-on``); see ``prepare_dpam``."""
    return prepare_dpam(data, config, trained_on)


prepare_for_scoring.uses_options = frozenset({"trained_on"})  # read by pipeline.scorers.registry
prepare_for_scoring.prepared_type = PreparedDpam  # read by pipeline.scoring.multi_input


def to_tensors(items: Sequence[PreparedDpam], device: torch.device | str = "cpu",
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The network's ``(rgb, texture, superpixels)`` for every crop of ``items``, in order.

    The crops of an image are adjacent, each with its image's superpixels.

    The uint8 arrays cross to ``device`` as uint8 and are scaled there, as the authors scale them: RGB to
    ``(x / 255 - 0.5) / 0.5``, superpixel colours to ``x / 255``, both in float32.
    """
    rgb = torch.from_numpy(np.concatenate([item.rgb for item in items])).to(device)
    texture = torch.from_numpy(np.concatenate([item.texture for item in items])).to(device)
    repeats = [len(item.rgb) for item in items]
    superpixels = torch.from_numpy(np.stack([item.superpixels for item in items])).to(device)
    superpixels = superpixels.repeat_interleave(torch.tensor(repeats, device=device), dim=0)
    rgb = (rgb.permute(0, 3, 1, 2).to(torch.float32) / 255 - 0.5) / 0.5
    return (rgb.contiguous(), texture.permute(0, 3, 1, 2).contiguous(), superpixels.to(torch.float32) / 255)
