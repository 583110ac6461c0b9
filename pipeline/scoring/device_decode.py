"""``--decode gpu``: JPEGs decoded and resized on the scorer's device, for nodes whose CPUs cannot feed the GPU.

The CPU side only reads the header (the pixel and size limits, the EXIF orientation) and ships the encoded
bytes with the orientation; the actor decodes them with ``torchvision.io.decode_jpeg`` (nvJPEG on a GPU,
libjpeg-turbo on a CPU), turns the pixels as the EXIF orientation says, and resizes with
``torch.nn.functional.interpolate`` on the same device. Images that are not JPEGs are prepared on the CPU as by
default.

The orientation is applied here, not by ``decode_jpeg(apply_exif_orientation=True)``: torchvision applies that
flag on the CPU only and ignores it on CUDA, where portrait photos would come out sideways. Decoding without it
on every device keeps the CPU (the tests' device) on the code path a GPU runs.

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
from PIL import ExifTags
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

# What ImageOps.exif_transpose (and cv2.imread, and ``preprocess.decode_image``) does to each EXIF orientation,
# on a ``(3, H, W)`` tensor; other values leave the image as stored.
_ORIENT = {
    2: lambda x: x.flip(-1),                     # FLIP_LEFT_RIGHT
    3: lambda x: x.flip(-2, -1),                 # ROTATE_180
    4: lambda x: x.flip(-2),                     # FLIP_TOP_BOTTOM
    5: lambda x: x.transpose(-2, -1),            # TRANSPOSE
    6: lambda x: x.transpose(-2, -1).flip(-1),   # ROTATE_270 (90 degrees clockwise)
    7: lambda x: x.flip(-2, -1).transpose(-2, -1),  # TRANSVERSE
    8: lambda x: x.transpose(-2, -1).flip(-2),   # ROTATE_90 (90 degrees counter-clockwise)
}


@dataclass
class EncodedImage:
    """A JPEG whose header passed the limits, still encoded: decoded on the scorer's device.

    Attributes:
        data: The encoded bytes as a uint8 array.
        height: Height of the image once EXIF-oriented.
        width: Width of the image once EXIF-oriented.
        orientation: The EXIF orientation read from the header (1 to 8; 1, as stored), applied after decoding.
    """

    data: np.ndarray
    height: int
    width: int
    orientation: int

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The arrays to ship between Ray stages."""
        return {"encoded": self.data, "orientation": np.array(self.orientation, np.uint8)}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], height: int, width: int) -> EncodedImage:
        """Rebuild from ``to_arrays`` output."""
        return cls(data=arrays["encoded"], height=height, width=width, orientation=int(arrays["orientation"]))


def prepare_for_device(data: bytes, config: PreprocessConfig) -> EncodedImage | PreparedImage:
    """The CPU side of ``--decode gpu``: a JPEG's header checked, the bytes kept; other formats prepared here.

    Raises:
        ImageError: The header says the image is outside the limits, or the data is no image.
    """
    if not data.startswith(JPEG_MAGIC):
        return prepare_bytes(data, config)
    im = open_image(data, config.max_pixels)
    height, width = oriented_size(im)  # refuses an unreadable EXIF block, so the read below succeeds
    check_size(height, width, config)
    orientation = im.getexif().get(ExifTags.Base.Orientation, 1)
    return EncodedImage(np.frombuffer(data, np.uint8).copy(), height, width,
                        orientation if orientation in _ORIENT else 1)


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
    decoded = decode_oriented([items[i] for i in encoded], device)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    for i, rgb in zip(encoded, decoded, strict=True):
        height, width = rgb.shape[1:]
        x = rgb[None].float()
        depth = F.interpolate(x / 255.0, size=depth_input_size(height, width, config), mode="bicubic",
                              align_corners=False)
        small = F.interpolate(x, size=short_side_size(height, width, config), mode="bilinear", align_corners=False)
        small = small.round_().clamp_(0, 255).to(torch.uint8)[0].permute(1, 2, 0).cpu().numpy()
        out[i] = PreparedImage(rgb_small=small, depth_input=((depth - mean) / std)[0], height=height, width=width)
    return out


def decode_oriented(items: Sequence[EncodedImage], device: torch.device) -> list[torch.Tensor]:
    """The JPEGs decoded on ``device`` to ``(3, H, W)`` uint8 RGB tensors, EXIF orientation applied.

    Raises:
        ImageError: A JPEG that does not decode, or decodes to another size than its header said.
    """
    tensors = [torch.from_numpy(item.data) for item in items]
    try:
        decoded = decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=False)
    except RuntimeError:  # one bad file fails the batch call: find it
        decoded = [_decode_one(t, device) for t in tensors]
    out = []
    for item, rgb in zip(items, decoded, strict=True):
        if item.orientation in _ORIENT:
            rgb = _ORIENT[item.orientation](rgb).contiguous()
        height, width = rgb.shape[1:]
        if (height, width) != (item.height, item.width):
            raise ImageError(f"decoded {width}x{height}, the header said {item.width}x{item.height}")
        out.append(rgb)
    return out


def _decode_one(data: torch.Tensor, device: torch.device) -> torch.Tensor:
    try:
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=False)
    except RuntimeError as exc:
        raise ImageError(f"truncated or corrupt image data: {exc}") from None
