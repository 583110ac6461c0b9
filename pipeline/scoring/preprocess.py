"""Image preprocessing identical to the published DGIQA inference, one image at a time.

Every number here reproduces a step of the published script, so that the same image and weights give the same
score:

* decode to 8-bit RGB with the EXIF orientation applied (what ``cv2.imread`` returns, channel order aside);
* depth-model input: RGB/255 in float64, resized with OpenCV bicubic so both sides are at least 518 px with
  the aspect ratio kept and each side rounded to a multiple of 14 (Depth Anything's "lower_bound" rule),
  ImageNet mean/std, then float32;
* depth map: the model output resized bilinearly to the image size, min-max scaled to 0..255 and truncated to
  uint8, replicated to three channels;
* image and depth map resized with OpenCV bilinear so the shorter side is 384 (albumentations'
  ``SmallestMaxSize``), normalised with ImageNet mean/std through the same float32 lookup table;
* ``num_crops`` 224x224 crops at the same positions in both, drawn from a fresh ``random.Random(42)``: ``x``
  then ``y`` for each crop. A fresh generator per image makes a score independent of batch, order and worker.

OpenCV's ``resize`` is used on purpose: Pillow, torchvision and ``F.interpolate`` give pixels a level apart
from it, and the score notices.
"""

from __future__ import annotations

import io
import math
import random
import struct
import threading
import warnings
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from pipeline.limits import DEFAULT_MAX_PIXELS

try:  # HEIC/HEIF photos (phones); AVIF is built into Pillow
    from pillow_heif import register_heif_opener
except ImportError:  # a machine with the scorer's packages only (the GPU benchmark's): HEIC is an error row
    HEIF_SUPPORTED = False
else:
    register_heif_opener()
    HEIF_SUPPORTED = True
_HEIF_BRANDS = (b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageError(ValueError):
    """One image cannot be scored; the message says why. Other images are unaffected."""


@dataclass(frozen=True)
class PreprocessConfig:
    """How one image becomes model inputs. The defaults are the published inference's.

    Attributes:
        num_crops: Random 224x224 crops averaged into one score.
        crop_size: Crop side in pixels (the Swin backbones are built for 224).
        short_side: Shorter side after the quality-branch resize.
        depth_input_size: Both sides of the depth-model input are at least this many pixels (``--depth-input-size``).
        depth_multiple: Depth-model input sides are multiples of this (the ViT patch size).
        seed: Seed of the per-image crop-position generator.
        max_pixels: Images with more pixels are refused before decoding, so a decompression bomb never
            allocates its declared size.
        min_side: Images with a shorter side are refused: upscaling a few pixels to 384 gives no real score.
        max_aspect: Images longer than this ratio are refused: the depth model's token count (and memory)
            grows with the long side once the short side is scaled to 518.
        reference: Compute every intermediate in the published precision (float64 depth input), for parity
            checks; the default path is faster and within the pinned tolerance of it.
        draft: Let the JPEG decoder scale large photos down by 2, 4 or 8 while decoding (Pillow's draft
            mode), keeping at least twice the pixels the model inputs need in each direction. A 12 MP JPEG then
            decodes and resizes several times faster, which matters where decoding, not the GPU, limits a
            node. Off by default: the pixels are averaged rather than sampled from the full image, so scores
            move slightly (the benchmark records by how much; a test pins the bound).
    """

    num_crops: int = 20
    crop_size: int = 224
    short_side: int = 384
    depth_input_size: int = 518
    depth_multiple: int = 14
    seed: int = 42
    max_pixels: int = DEFAULT_MAX_PIXELS
    min_side: int = 16
    max_aspect: float = 10.0
    reference: bool = False
    draft: bool = False

    def __post_init__(self):
        if self.num_crops < 1:
            raise ValueError(f"num_crops must be at least 1, got {self.num_crops}")
        if self.short_side < self.crop_size:
            raise ValueError(f"short_side ({self.short_side}) must be at least crop_size ({self.crop_size})")
        if self.max_pixels < 1 or self.min_side < 1 or self.max_aspect < 1:
            raise ValueError("max_pixels and min_side must be positive and max_aspect at least 1")


# Pixels per horizontal band when an image is converted or resized band by band: a few MiB per band whatever the
# image's size, and few enough Python steps (about 200 for 100 megapixels) to cost nothing measurable.
_BAND_PIXELS = 1 << 19


def _band_rows(width: int) -> int:
    return max(1, _BAND_PIXELS // width)


def _bands(height: int, width: int) -> range:
    return range(0, height, _band_rows(width))


def _to_uint8_rgb(im: Image.Image) -> np.ndarray:
    """The ``(H, W, 3)`` uint8 RGB array of a loaded Pillow image, filled band by band.

    Whole-image conversions would hold the image three times at once: ``np.asarray`` goes through ``tobytes``,
    which keeps the encoded chunks and their joined copy, beside Pillow's own 4-byte-per-pixel pixels (and
    ``convert`` adds a fourth). Band by band, only Pillow's pixels and the result are full-size. Every step is per
    pixel, so the numbers are those of the whole-image conversion.
    """
    width, height = im.size
    mode = im.mode
    rgb = np.empty((height, width, 3), np.uint8)
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        def convert(band: Image.Image) -> np.ndarray:
            # cv2.imread keeps the high byte of 16-bit samples; 32-bit integer images are read as 16-bit data.
            return (np.clip(np.asarray(band).astype(np.uint32), 0, 65535) >> 8).astype(np.uint8)[..., None]
    elif mode == "F":
        def floats(band: Image.Image) -> np.ndarray:
            return np.nan_to_num(np.asarray(band, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)

        peak = max(float(floats(im.crop((0, top, width, top + _band_rows(width)))).max())
                   for top in _bands(height, width))
        scale = np.float32(255.0 if peak <= 1.0 else 1.0)

        def convert(band: Image.Image) -> np.ndarray:
            return np.clip(floats(band) * scale, 0, 255).astype(np.uint8)[..., None]
    elif mode == "RGB":
        convert = np.asarray
    else:
        def convert(band: Image.Image) -> np.ndarray:
            # Alpha is dropped, not composited, as cv2.imread(IMREAD_COLOR) does; palettes are expanded.
            return np.asarray(band.convert("RGB"))
    for top in _bands(height, width):
        bottom = min(top + _band_rows(width), height)
        rgb[top:bottom] = convert(im.crop((0, top, width, bottom)))
    return rgb


# What ImageOps.exif_transpose does to each EXIF orientation, on the RGB array: one copy each (OpenCV's are ten
# times faster than numpy's strided copies for the turns; TRANSVERSE, rare, takes numpy's single copy).
_ORIENT = {
    2: lambda a: cv2.flip(a, 1),                                    # FLIP_LEFT_RIGHT
    3: lambda a: cv2.rotate(a, cv2.ROTATE_180),                     # ROTATE_180
    4: lambda a: cv2.flip(a, 0),                                    # FLIP_TOP_BOTTOM
    5: cv2.transpose,                                               # TRANSPOSE
    6: lambda a: cv2.rotate(a, cv2.ROTATE_90_CLOCKWISE),            # ROTATE_270 (counter-clockwise, as Pillow)
    7: lambda a: np.ascontiguousarray(a[::-1, ::-1].transpose(1, 0, 2)),  # TRANSVERSE
    8: lambda a: cv2.rotate(a, cv2.ROTATE_90_COUNTERCLOCKWISE),     # ROTATE_90
}


def decode_image(data: bytes, config: PreprocessConfig = PreprocessConfig()) -> np.ndarray:
    """Decode image bytes to an ``(H, W, 3)`` uint8 RGB array at full size, EXIF orientation applied.

    Animated images give their first frame. The pixel count is checked from the header before any pixel is
    decoded. ``config.draft`` is ignored here: this is the full-size decode (see ``decode_for_scoring``).

    Raises:
        ImageError: Empty, unrecognised, truncated or corrupt data, or an image outside the configured limits.
    """
    return _decode(data, config, draft=False)[0]


def decode_for_scoring(data: bytes, config: PreprocessConfig = PreprocessConfig()) -> tuple[np.ndarray, int, int]:
    """Decode image bytes for scoring: the RGB array and the image's full ``height`` and ``width``.

    With ``config.draft`` the array of a large JPEG is smaller than the image; the sizes returned are always
    the full (oriented) ones, which decide every model-input size, so a drafted image gives inputs of the same
    shapes.

    Raises:
        ImageError: As ``decode_image``.
    """
    return _decode(data, config, draft=config.draft)


def _draft_request(im: Image.Image, config: PreprocessConfig) -> tuple[int, int]:
    """Smallest ``(width, height)`` in stored orientation that keeps 2x the pixels every model input needs."""
    width, height = im.size
    transposed = im.getexif().get(_EXIF_ORIENTATION, 1) in _TRANSPOSING_ORIENTATIONS
    if transposed:
        width, height = height, width
    dh, dw = depth_input_size(height, width, config)
    sh, sw = short_side_size(height, width, config)
    need_w, need_h = 2 * max(dw, sw), 2 * max(dh, sh)
    if transposed:
        need_w, need_h = need_h, need_w
    return need_w, need_h


_EXIF_ORIENTATION = 0x0112
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Open encoded bytes with Pillow, reading only the header; refuse what must not be decoded.

    Every scorer's decoding starts here, so all refuse the same images with the same messages. ``max_pixels``
    decides, above Pillow's own decompression-bomb limit as below it (see ``_open_past_pillow_limit``).

    Raises:
        ImageError: Empty or unrecognised data, a header Pillow cannot parse, or more than ``max_pixels``
            pixels (checked before any pixel is decoded, so a decompression bomb never allocates its size).
    """
    if not data:
        raise ImageError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        if not HEIF_SUPPORTED and data[4:8] == b"ftyp" and data[8:12] in _HEIF_BRANDS:
            raise ImageError("a HEIC/HEIF image, and pillow-heif is not installed here") from None
        raise ImageError(f"not a recognised image format ({len(data)} bytes)") from None
    except Image.DecompressionBombError as exc:
        im = _open_past_pillow_limit(data)
        if im is None:
            raise ImageError(f"image refused: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - any decoder failure is this image's error
        raise ImageError(f"truncated or corrupt image data: {type(exc).__name__}: {exc}") from None
    width, height = im.size
    pixels = width * height
    if pixels > max_pixels:
        bomb = ", more than twice: a likely decompression bomb" if pixels > 2 * max_pixels else ""
        raise ImageError(f"image is {width}x{height} = {pixels} pixels, over the limit of {max_pixels} "
                         f"(max_pixels){bomb}")
    _raise_pillow_limit(pixels, max_pixels)
    return im


def _open_past_pillow_limit(data: bytes) -> Image.Image | None:
    """The header ``Image.open`` refused as over Pillow's limit, read without that check; None if none reads it.

    ``Image.open`` checks the size against ``Image.MAX_IMAGE_PIXELS`` itself, after the format's plugin has read
    the header; the plugins do not. Constructing the plugin that accepts the bytes, in ``Image.open``'s order,
    reads the same header with no size check and without changing the module-global limit other threads read,
    so that ``max_pixels`` is what decides.
    """
    prefix = data[:16]
    for name in Image.ID:
        factory, accept = Image.OPEN[name]
        accepted = not accept or accept(prefix)
        if isinstance(accepted, str) or not accepted:  # a str: the format's reason not to try
            continue
        try:
            return factory(io.BytesIO(data), "")
        except (SyntaxError, IndexError, TypeError, struct.error):  # the errors Image.open moves on after
            continue
        except Exception:  # noqa: BLE001 - the refusal stands
            return None
    return None


_PILLOW_LIMIT_LOCK = threading.Lock()


def _raise_pillow_limit(pixels: int, max_pixels: int) -> None:
    """Let Pillow's decoders take an image ``max_pixels`` allowed although it is over Pillow's own limit.

    Some decoders check the size again while loading (TIFF strips and tiles, GIF and MPO frames) against the
    module-global ``Image.MAX_IMAGE_PIXELS``, which cannot be set for one image. It is raised so that
    ``max_pixels`` fits, only when an image that large was allowed, under a lock and never lowered, so no thread
    sees it drop under what another needs; every image the scorers decode passes ``open_image``'s check first.
    """
    limit = Image.MAX_IMAGE_PIXELS
    if limit is None or pixels <= 2 * limit:
        return
    with _PILLOW_LIMIT_LOCK:
        limit = Image.MAX_IMAGE_PIXELS
        if limit is not None and pixels > 2 * limit:
            Image.MAX_IMAGE_PIXELS = (max_pixels + 1) // 2


def oriented_size(im: Image.Image) -> tuple[int, int]:
    """``(height, width)`` of an opened image once its EXIF orientation is applied, from the header alone.

    Raises:
        ImageError: The EXIF data cannot be read.
    """
    width, height = im.size
    try:
        transposed = im.getexif().get(_EXIF_ORIENTATION, 1) in _TRANSPOSING_ORIENTATIONS
    except Exception as exc:  # noqa: BLE001 - a broken EXIF block
        raise ImageError(f"truncated or corrupt image data: {type(exc).__name__}: {exc}") from None
    return (width, height) if transposed else (height, width)


def _decode(data: bytes, config: PreprocessConfig, draft: bool) -> tuple[np.ndarray, int, int]:
    """Decode, convert and orient one image, holding at most Pillow's pixels and one RGB array at a time.

    The orientation is applied to the RGB array after Pillow's pixels are released, rather than by
    ``ImageOps.exif_transpose`` on the Pillow image (which would keep both Pillow images and then the array).
    """
    im = open_image(data, config.max_pixels)
    width, height = im.size
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im.seek(0)
            orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
            drafted = draft and im.format == "JPEG" and min(width, height) >= config.min_side
            if drafted:
                im.draft(im.mode, _draft_request(im, config))
            im.load()
            rgb = _to_uint8_rgb(im)
    except Exception as exc:  # noqa: BLE001 - truncated data, bad EXIF, decoder errors
        raise ImageError(f"truncated or corrupt image data: {type(exc).__name__}: {exc}") from None
    finally:
        im.close()
    if orientation in _ORIENT:
        rgb = _ORIENT[orientation](rgb)
    if not drafted:
        height, width = rgb.shape[:2]
    elif orientation in _TRANSPOSING_ORIENTATIONS:
        height, width = width, height
    check_size(height, width, config)
    return rgb, height, width


def check_size(height: int, width: int, config: PreprocessConfig) -> None:
    """Refuse images too small or too elongated to score (see ``PreprocessConfig``)."""
    if min(height, width) < config.min_side:
        raise ImageError(f"image is {width}x{height}; its shorter side must be at least {config.min_side} px")
    if max(height, width) > config.max_aspect * min(height, width):
        raise ImageError(f"image is {width}x{height}, aspect ratio {max(height, width) / min(height, width):.1f}; "
                         f"at most {config.max_aspect:g} is scored")


def _constrain_to_multiple(x: float, multiple: int, min_val: int) -> int:
    y = round(x / multiple) * multiple  # round half to even, as numpy.round
    if y < min_val:
        y = math.ceil(x / multiple) * multiple
    return int(y)


def depth_input_size(height: int, width: int, config: PreprocessConfig = PreprocessConfig()) -> tuple[int, int]:
    """``(height, width)`` of the depth-model input: both sides >= the lower bound, multiples of 14."""
    bound = config.depth_input_size
    scale_h, scale_w = bound / height, bound / width
    scale = scale_w if scale_w > scale_h else scale_h  # scale so that the output is a lower bound
    return (_constrain_to_multiple(scale * height, config.depth_multiple, bound),
            _constrain_to_multiple(scale * width, config.depth_multiple, bound))


def depth_model_input(rgb: np.ndarray, config: PreprocessConfig = PreprocessConfig(),
                      size: tuple[int, int] | None = None) -> torch.Tensor:
    """The ``(3, h, w)`` float32 input of Depth Anything for an ``(H, W, 3)`` uint8 RGB image.

    The published code scales and resizes in float64, a copy of 24 bytes per pixel; ``config.reference`` does
    the same. The default does it in float32, band by band (``_bicubic_in_bands``), so its memory stays a small
    fraction of the image's own, and its input is within about 2e-6 of the float64 one (normalised units; an
    8-bit level is about 0.017). ``size`` is the full image's ``(height, width)`` when ``rgb`` was decoded smaller.
    """
    new_h, new_w = depth_input_size(*(size or rgb.shape[:2]), config)
    if config.reference:
        resized = cv2.resize(rgb / 255.0, (new_w, new_h), interpolation=cv2.INTER_CUBIC)
        normalized = (resized - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
        return torch.from_numpy(np.ascontiguousarray(normalized.transpose(2, 0, 1)).astype(np.float32))
    resized = _bicubic_in_bands(rgb, new_h, new_w)
    resized -= np.array(IMAGENET_MEAN, np.float32)
    resized /= np.array(IMAGENET_STD, np.float32)
    return torch.from_numpy(np.ascontiguousarray(resized.transpose(2, 0, 1)))


def _bicubic_in_bands(rgb: np.ndarray, new_h: int, new_w: int) -> np.ndarray:
    """RGB/255 in float32, resized with OpenCV bicubic to ``(new_h, new_w)``, without a float copy of the image.

    OpenCV's bicubic resize is separable: it resizes each source row to the new width, then combines four of
    those rows for each output row. So each band of rows is converted to float32 and resized to the new width
    alone (its rows come out exactly as in a whole-image resize: the unchanged height has weights 0, 1, 0, 0),
    and a height-only resize of the ``(H, new_w)`` result finishes. A 100-megapixel photo then needs a float
    intermediate of about 0.7 bytes per pixel instead of a 12-byte-per-pixel float copy, with the same numbers as
    a whole-image float32 resize by OpenCV's own code.

    OpenCV's Intel IPP resize is turned off for these calls (in this thread only, and restored): it rounds
    float32 bicubic to about 2e-5 of the pixel range (normalised, up to 8e-4 on noise, 1e-4 on photos from the
    float64 reference), and its bands would not add up to its whole image; OpenCV's own code stays within about
    2e-6 of the published float64 numbers.
    """
    height = rgb.shape[0]
    narrow = np.empty((height, new_w, 3), np.float32)
    use_ipp = cv2.ipp.useIPP()
    cv2.ipp.setUseIPP(False)
    try:
        for top in _bands(*rgb.shape[:2]):
            band = rgb[top:top + _band_rows(rgb.shape[1])].astype(np.float32)
            band *= np.float32(1 / 255)
            narrow[top:top + len(band)] = cv2.resize(band, (new_w, len(band)), interpolation=cv2.INTER_CUBIC)
        return cv2.resize(narrow, (new_w, new_h), interpolation=cv2.INTER_CUBIC)
    finally:
        cv2.ipp.setUseIPP(use_ipp)


def depth_to_map(depth: torch.Tensor, height: int, width: int) -> np.ndarray:
    """Turn a model depth output ``(h, w)`` into the ``(height, width)`` uint8 map DGIQA sees.

    Bilinear resize to the image size, min-max scaling to 0..255 and truncation. The published code then
    replicates it to three channels; every later step treats the channels alike, so it is kept as one channel
    here (a third of the work, the same numbers) and expanded only when normalised. The arithmetic runs on the
    depth output's device in the published float32 order and only the uint8 map is copied back: a quarter of
    the bytes of the float map, which for 12 MP photos on a GPU is the difference that matters.
    """
    full = F.interpolate(depth[None, None].float(), (height, width), mode="bilinear", align_corners=False)[0, 0]
    lo, hi = full.min(), full.max()
    scaled = (full - lo) / (hi - lo + 1e-8) * 255
    return scaled.to(torch.uint8).cpu().numpy()


def short_side_size(height: int, width: int, config: PreprocessConfig = PreprocessConfig()) -> tuple[int, int]:
    """``(height, width)`` after scaling the shorter side to ``short_side`` (Python rounding, as albumentations)."""
    scale = config.short_side / min(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def resize_short_side(image: np.ndarray, config: PreprocessConfig = PreprocessConfig(),
                      size: tuple[int, int] | None = None) -> np.ndarray:
    """Bilinear OpenCV resize of a uint8 ``(H, W, 3)`` array so its shorter side is ``short_side``.

    ``size`` is the full image's ``(height, width)`` when ``image`` was decoded smaller: the output then has
    the size the full image would give.
    """
    new_h, new_w = short_side_size(*(size or image.shape[:2]), config)
    if (new_h, new_w) == image.shape[:2]:
        return image
    return cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)


def _normalize_tables() -> np.ndarray:
    # The published pipeline normalises uint8 pixels through float32 lookup tables:
    # (v - mean * 255) * (1 / (std * 255)), all in float32.
    mean = np.array(IMAGENET_MEAN, dtype=np.float32) * 255.0
    denominator = np.reciprocal(np.array(IMAGENET_STD, dtype=np.float32) * 255.0)
    return (np.arange(256, dtype=np.float32)[None, :] - mean[:, None]) * denominator[:, None]


_NORMALIZE_TABLES = _normalize_tables()


def normalize_to_tensor(image: np.ndarray) -> torch.Tensor:
    """ImageNet-normalise uint8 ``(H, W, 3)`` (or gray ``(H, W)``, as three equal channels) to ``(3, H, W)``."""
    if image.ndim == 2:
        return torch.from_numpy(np.stack([_NORMALIZE_TABLES[c][image] for c in range(3)]))
    return torch.from_numpy(np.stack([_NORMALIZE_TABLES[c][image[..., c]] for c in range(3)]))


def crop_positions(height: int, width: int, config: PreprocessConfig = PreprocessConfig()) -> list[tuple[int, int]]:
    """``(y, x)`` of each crop's top-left corner, drawn as the published script draws them."""
    rng = random.Random(config.seed)
    positions = []
    for _ in range(config.num_crops):
        x = rng.randint(0, width - config.crop_size)
        y = rng.randint(0, height - config.crop_size)
        positions.append((y, x))
    return positions


def crops(image: torch.Tensor, depth: torch.Tensor,
          config: PreprocessConfig = PreprocessConfig()) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut the same ``num_crops`` crops from a ``(3, H, W)`` image and its depth map.

    Returns:
        Two ``(num_crops, 3, crop_size, crop_size)`` tensors.
    """
    size = config.crop_size
    positions = crop_positions(image.shape[1], image.shape[2], config)
    image_crops = torch.stack([image[:, y:y + size, x:x + size] for y, x in positions])
    depth_crops = torch.stack([depth[:, y:y + size, x:x + size] for y, x in positions])
    return image_crops, depth_crops


@dataclass(frozen=True)
class PreparedImage:
    """Everything the models need from one image, computed on the CPU before any model runs.

    Attributes:
        rgb_small: uint8 ``(h, w, 3)`` image with its shorter side resized to ``short_side``.
        depth_input: float32 ``(3, h', w')`` Depth Anything input.
        height: Height of the decoded image (the depth map is resized back to it, as published).
        width: Width of the decoded image.
    """

    rgb_small: np.ndarray
    depth_input: torch.Tensor
    height: int
    width: int

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The arrays to ship between Ray stages."""
        return {"rgb_small": self.rgb_small, "depth_input": self.depth_input.numpy()}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], height: int, width: int) -> PreparedImage:
        """Rebuild from ``to_arrays`` output."""
        return cls(rgb_small=arrays["rgb_small"], depth_input=torch.from_numpy(arrays["depth_input"]),
                   height=height, width=width)


def prepare_image(rgb: np.ndarray, config: PreprocessConfig = PreprocessConfig(),
                  size: tuple[int, int] | None = None) -> PreparedImage:
    """Do the model-independent work for one decoded image: both resizes, depth normalisation.

    Args:
        rgb: The decoded image.
        config: Preprocessing settings.
        size: ``(height, width)`` of the full image when ``rgb`` was decoded smaller (draft mode); every
            model-input size follows the full size. Defaults to the array's own.
    """
    height, width = size or rgb.shape[:2]
    return PreparedImage(rgb_small=resize_short_side(rgb, config, (height, width)),
                         depth_input=depth_model_input(rgb, config, (height, width)), height=height, width=width)


def prepare_bytes(data: bytes, config: PreprocessConfig = PreprocessConfig(), decode: str = "cpu"):
    """Decode (in draft mode if configured) and prepare one encoded image.

    With ``decode="gpu"`` a JPEG is only checked from its header here and decoded on the scorer's device
    (``pipeline.scoring.device_decode``); the result is then an ``EncodedImage``.

    Raises:
        ImageError: The bytes are not a scorable image.
    """
    if decode == "gpu":
        from pipeline.scoring.device_decode import prepare_for_device

        return prepare_for_device(data, config)
    rgb, height, width = decode_for_scoring(data, config)
    return prepare_image(rgb, config, (height, width))


prepare_bytes.uses_options = frozenset({"decode"})  # read by pipeline.scorers.registry


# Bytes per pixel held while decoding: Pillow's pixels (4 for RGB, at most 4 for any mode) and the RGB array (3),
# or, while a progressive JPEG loads, Pillow's pixels and the JPEG's coefficients (2 bytes per sample: 3 per pixel
# at 4:2:0, 6 at 4:4:4). Measured: 7.1 (baseline JPEG, PNG) and 10.0 (progressive 4:4:4 JPEG).
_DECODE_BYTES_PER_PIXEL = 10
# Band buffers, the model inputs, OpenCV's and the allocator's working memory: measured about 10 MiB.
_PEAK_OVERHEAD_BYTES = 16 << 20


def preprocess_peak_bytes(max_pixels: int, config: PreprocessConfig = PreprocessConfig()) -> int:
    """An upper bound of the memory ``prepare_bytes`` adds while preparing an image of ``max_pixels`` pixels.

    For sizing what runs many decodes side by side: a Ray task's ``memory`` or a pool's thread count. The
    encoded bytes themselves are not counted (the caller holds them), nor ``config.reference``'s float64 copy.
    The larger of two moments: decoding (Pillow's pixels beside the RGB array, ``_DECODE_BYTES_PER_PIXEL``) and
    the depth-input resize (the RGB array beside the float32 ``(H, new_w)`` intermediate of
    ``_bicubic_in_bands``, at most 12 bytes x the depth input's short side x the image's long side, which
    ``max_aspect`` bounds), plus a constant. It holds for JPEG (baseline and progressive) and PNG, as
    ``bench/bench_preprocess_memory.py`` measures; WebP exceeds it (16.5 bytes per pixel measured: Pillow's WebP
    plugin keeps libwebp's canvas and a bytes copy of the pixels beside its own until the image is dropped).

    Args:
        max_pixels: Pixels of the largest image to be prepared, usually ``config.max_pixels``.
        config: The depth input's lower bound and multiple, and ``max_aspect``.
    """
    long_side = math.sqrt(max_pixels * config.max_aspect)
    intermediate = 12 * (config.depth_input_size + config.depth_multiple) * long_side
    peak = max(_DECODE_BYTES_PER_PIXEL * max_pixels, 3 * max_pixels + intermediate)
    return int(peak) + _PEAK_OVERHEAD_BYTES


def quality_inputs(rgb_small: np.ndarray, depth_map: np.ndarray,
                   config: PreprocessConfig = PreprocessConfig()) -> tuple[torch.Tensor, torch.Tensor]:
    """From the resized image and its full-size uint8 depth map (gray or 3 equal channels) to DGIQA's crops."""
    image = normalize_to_tensor(rgb_small)
    depth = normalize_to_tensor(resize_short_side(depth_map, config))
    return crops(image, depth, config)
