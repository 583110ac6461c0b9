"""``--decode gpu``: JPEGs decoded and resized on the scorer's device, for nodes whose CPUs cannot feed the GPU.

The CPU side only reads the header (the pixel and size limits, the EXIF orientation) and ships the encoded
bytes; the actor decodes them with ``torchvision.io.decode_jpeg`` (nvJPEG on a GPU, libjpeg-turbo on a CPU) and
resizes with ``torch.nn.functional.interpolate`` on the same device. Images that are not JPEGs are prepared on
the CPU as by default.

The pixels are not OpenCV's: another IDCT and upsampling of the chroma planes, and PyTorch's bicubic and
bilinear kernels where the published code calls ``cv2.resize`` (same kernels, other rounding, bilinear in
float). Scores move by about as much as ``--draft-decode`` moves them (measured on the CPU with the same
arithmetic: README, "Decoding on the GPU"), so the option is off by default and enters the job's run key.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_jpeg

from pipeline.scoring.preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageError,
    PreparedImage,
    PreprocessConfig,
    check_size,
    depth_input_size,
    open_image,
    oriented_size,
    prepare_bytes,
    short_side_size,
)

JPEG_MAGIC = b"\xff\xd8\xff"
# torchvision 0.29 deprecates its decoders for TorchCodec; the GPU image this must run on (torchvision 0.26, no
# TorchCodec) has only these, so they are kept, and their warning is not repeated in every actor's log.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)


@dataclass
class EncodedImage:
    """A JPEG whose header passed the limits, still encoded: decoded on the scorer's device.

    Attributes:
        data: The encoded bytes as a uint8 array.
        height: Height of the image once EXIF-oriented.
        width: Width of the image once EXIF-oriented.
    """

    data: np.ndarray
    height: int
    width: int

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The arrays to ship between Ray stages."""
        return {"encoded": self.data}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], height: int, width: int) -> EncodedImage:
        """Rebuild from ``to_arrays`` output."""
        return cls(data=arrays["encoded"], height=height, width=width)


def prepare_for_device(data: bytes, config: PreprocessConfig) -> EncodedImage | PreparedImage:
    """The CPU side of ``--decode gpu``: a JPEG's header checked, the bytes kept; other formats prepared here.

    Raises:
        ImageError: The header says the image is outside the limits, or the data is no image.
    """
    if not data.startswith(JPEG_MAGIC):
        return prepare_bytes(data, config)
    height, width = oriented_size(open_image(data, config.max_pixels))
    check_size(height, width, config)
    return EncodedImage(np.frombuffer(data, np.uint8).copy(), height, width)


def decode_on_device(items: Sequence[EncodedImage | PreparedImage], config: PreprocessConfig,
                     device: torch.device) -> list[PreparedImage]:
    """Prepared images for the scorer: encoded ones decoded and resized on ``device``, the others as they are.

    The depth input stays on ``device``; the 384 px image comes back to the CPU (it is small) for the crops.

    Raises:
        ImageError: A JPEG that does not decode.
    """
    encoded = [i for i, item in enumerate(items) if isinstance(item, EncodedImage)]
    out = list(items)
    if not encoded:
        return out
    tensors = [torch.from_numpy(items[i].data) for i in encoded]
    try:
        decoded = decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True)
    except RuntimeError:  # one bad file fails the batch call: find it
        decoded = [_decode_one(t, device) for t in tensors]
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    for i, rgb in zip(encoded, decoded, strict=True):
        height, width = rgb.shape[1:]
        if (height, width) != (items[i].height, items[i].width):
            raise ImageError(f"decoded {width}x{height}, the header said {items[i].width}x{items[i].height}")
        x = rgb[None].float()
        depth = F.interpolate(x / 255.0, size=depth_input_size(height, width, config), mode="bicubic",
                              align_corners=False)
        small = F.interpolate(x, size=short_side_size(height, width, config), mode="bilinear", align_corners=False)
        small = small.round_().clamp_(0, 255).to(torch.uint8)[0].permute(1, 2, 0).cpu().numpy()
        out[i] = PreparedImage(rgb_small=small, depth_input=((depth - mean) / std)[0], height=height, width=width)
    return out


def _decode_one(data: torch.Tensor, device: torch.device) -> torch.Tensor:
    try:
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True)
    except RuntimeError as exc:
        raise ImageError(f"truncated or corrupt image data: {exc}") from None
