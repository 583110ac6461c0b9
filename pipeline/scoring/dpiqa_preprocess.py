"""Image preprocessing identical to the DP-IQA authors' inference for their student model.

The authors' transform is ``Image.open(path).convert("RGB")``, then torchvision ``Resize((512, 512))`` and
``ToTensor()``. Reproduced here step for step:

* decode with Pillow and convert to RGB (alpha dropped, palettes expanded, first frame of an animation);
* Pillow bilinear resize straight to 512x512, aspect ratio not kept (on a PIL image, ``Resize((512, 512))`` is
  exactly ``image.resize((512, 512), Image.BILINEAR)``, antialiased as Pillow always is when shrinking);
* ``to_tensor``: channels first, float32, divided by 255, with no mean/std normalisation (``ToTensor()``).

Unlike the DGIQA preprocessing (``pipeline.scoring.preprocess``), which matches OpenCV, every resize here is Pillow's:
the published student saw Pillow's pixels. The decoded image is resized on the CPU and kept as uint8
``(512, 512, 3)`` (768 KiB, a quarter of the float tensor) until it reaches the model's device.

The project's guards still apply: empty, unrecognised, truncated or oversized data raises ``ImageError`` with a
one-line reason, so a bad file becomes an error row instead of stopping a run.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps

from pipeline.models.dpiqa import INPUT_SIZE
from pipeline.scoring.preprocess import ImageError, PreprocessConfig, check_size, open_image
from pipeline.scoring.single_pass import PreparedPixels


@dataclass(frozen=True)
class DpiqaPreprocessConfig:
    """How one image becomes the DP-IQA student's input. The defaults are the authors' behaviour.

    Attributes:
        exif_transpose: Rotate and mirror the image as its EXIF orientation tag says before resizing. Off by
            default because the authors' code does not: a phone photo taken upright but stored sideways is
            scored sideways, and the published scores were computed that way. Turning it on scores the image
            as people see it; the image is squashed to a square either way, so the two can differ noticeably
            for portrait photos.
        max_pixels: Images with more pixels are refused from the header, before decoding, so a decompression
            bomb never allocates its declared size. Defaults to ``PreprocessConfig``'s limit.
        min_side: Images with a shorter side are refused (as in ``PreprocessConfig``).
        max_aspect: Images longer than this ratio are refused (as in ``PreprocessConfig``): squashed to a
            square they carry little of what the model was trained on.
    """

    exif_transpose: bool = False
    max_pixels: int = PreprocessConfig.max_pixels
    min_side: int = PreprocessConfig.min_side
    max_aspect: float = PreprocessConfig.max_aspect

    def __post_init__(self):
        self.limits  # noqa: B018 - validates the limits as PreprocessConfig does

    @property
    def limits(self) -> PreprocessConfig:
        """The size limits as a ``PreprocessConfig``, so both scorers refuse images with the same messages."""
        return PreprocessConfig(max_pixels=self.max_pixels, min_side=self.min_side, max_aspect=self.max_aspect)

    @classmethod
    def from_preprocess(cls, config: PreprocessConfig, exif_transpose: bool = False) -> DpiqaPreprocessConfig:
        """Take the size limits of an existing ``PreprocessConfig`` (e.g. the one built from the CLI)."""
        return cls(exif_transpose=exif_transpose, max_pixels=config.max_pixels, min_side=config.min_side,
                   max_aspect=config.max_aspect)


def _reason(exc: Exception) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _open_rgb(data: bytes, config: DpiqaPreprocessConfig) -> Image.Image:
    image = open_image(data, config.max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image.seek(0)
            image.load()
            if config.exif_transpose:
                image = ImageOps.exif_transpose(image)
            rgb = image.convert("RGB")
    except Exception as exc:  # noqa: BLE001 - truncated data, bad EXIF, decoder errors
        raise ImageError(f"truncated or corrupt image data: {_reason(exc)}") from None
    check_size(rgb.height, rgb.width, config.limits)
    return rgb


def prepare_dpiqa(data: bytes, config: DpiqaPreprocessConfig = DpiqaPreprocessConfig()) -> tuple[np.ndarray, int, int]:
    """Decode one encoded image and resize it to the student's input, as the authors do.

    Args:
        data: The encoded file (JPEG, PNG, WebP, GIF, TIFF, HEIC, ...).
        config: EXIF handling and size limits.

    Returns:
        The uint8 ``(512, 512, 3)`` RGB array, and the decoded image's ``height`` and ``width`` (after the EXIF
        rotation when ``config.exif_transpose`` is on), which the output records.

    Raises:
        ImageError: Empty, unrecognised, truncated or corrupt data, or an image outside the configured limits.
    """
    rgb = _open_rgb(data, config)
    resized = rgb.resize((INPUT_SIZE, INPUT_SIZE), Image.Resampling.BILINEAR)
    return np.array(resized, dtype=np.uint8), rgb.height, rgb.width


def to_tensor(batch: np.ndarray | Sequence[np.ndarray], device: torch.device | str | None = None) -> torch.Tensor:
    """Turn uint8 ``(N, H, W, 3)`` images into the student's float32 ``(N, 3, H, W)`` input in [0, 1].

    The same arithmetic as torchvision's ``ToTensor()`` (float32, then ``/ 255``) and, as in the authors' code,
    no mean/std normalisation. With ``device`` the uint8 batch is moved first and converted there, which copies
    a quarter of the bytes to a GPU.

    Args:
        batch: One array of images, or a sequence of ``(H, W, 3)`` arrays of one size.
        device: Where the returned tensor lives; the CPU when omitted.

    Raises:
        ValueError: The batch is not uint8 ``(N, H, W, 3)``.
    """
    array = batch if isinstance(batch, np.ndarray) else np.stack(batch)
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] != 3:
        raise ValueError(f"expected uint8 images of shape (N, H, W, 3), got {array.dtype} {array.shape}")
    tensor = torch.from_numpy(np.require(array, requirements=["C_CONTIGUOUS", "WRITEABLE"]))
    if device is not None:
        tensor = tensor.to(device)
    return tensor.permute(0, 3, 1, 2).contiguous().to(torch.float32).div(255)


def prepare_for_scoring(data: bytes, config: PreprocessConfig, exif_transpose: bool = False) -> PreparedPixels:
    """The scorer registry's preprocessing step: the authors' input, with the job's size limits.

    Of ``config`` only the size limits apply: crops, depth input size and draft decoding are DGIQA's, and the
    registry refuses them for this scorer (``uses_options`` below).

    Args:
        data: The encoded image.
        config: The job's or the command's limits.
        exif_transpose: Rotate the image upright by its EXIF orientation first (``--exif-transpose``). Off by
            default, as in the authors' code; see ``DpiqaPreprocessConfig``.

    Raises:
        ImageError: The bytes are not a scorable image.
    """
    pixels, height, width = prepare_dpiqa(data, DpiqaPreprocessConfig.from_preprocess(config, exif_transpose))
    return PreparedPixels(pixels=pixels, height=height, width=width)


prepare_for_scoring.uses_options = frozenset({"exif_transpose"})  # read by pipeline.scorers.registry
