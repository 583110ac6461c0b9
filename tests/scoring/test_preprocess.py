import io
import json
import random
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from skimage import data as skimage_data

import pipeline.scoring.preprocess
from pipeline.scoring.preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageError,
    PreprocessConfig,
    crop_positions,
    crops,
    decode_for_scoring,
    decode_image,
    depth_input_size,
    depth_model_input,
    depth_to_map,
    normalize_to_tensor,
    prepare_bytes,
    preprocess_peak_bytes,
    resize_short_side,
    short_side_size,
)
from pipeline.scoring.sample import synthetic_photo

ROOT = Path(__file__).parents[2]


def _encode(array: np.ndarray, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, fmt, **kwargs)
    return buf.getvalue()


@pytest.fixture(params=["whole", "bands"])
def bands(request, monkeypatch):
    """Run a test with the default band size (small images: one band) and with bands of a few rows."""
    if request.param == "bands":
        monkeypatch.setattr(pipeline.scoring.preprocess, "_BAND_PIXELS", 500)  # 5 rows of 96 px: 64 rows end in 4


def _cv2_reference(data: bytes, tmp_path) -> np.ndarray:
    """What the published inference decodes: cv2.imread (EXIF orientation applied), as RGB."""
    path = tmp_path / "img.bin"
    path.write_bytes(data)
    return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)


def test_crop_positions_follow_the_published_draws():
    cfg = PreprocessConfig(num_crops=20)
    rng = random.Random(42)
    expected = []
    for _ in range(20):
        x = rng.randint(0, 577 - 224)
        y = rng.randint(0, 384 - 224)
        expected.append((y, x))
    assert crop_positions(384, 577, cfg) == expected
    # A fresh generator per image: the same size always gives the same crops.
    assert crop_positions(384, 577, cfg) == crop_positions(384, 577, cfg)
    three = PreprocessConfig(num_crops=3)
    assert crop_positions(384, 384, three) != crop_positions(384, 577, three)


@pytest.mark.parametrize(("hw", "expected"), [
    ((480, 640), (518, 686)),    # 640 * 518/480 = 690.7 -> 49.3 patches -> 49 * 14
    ((333, 500), (518, 784)),    # 500 * 518/333 = 777.8 -> 55.6 -> 56 * 14
    ((1001, 517), (1008, 518)),  # width needs the larger scale: 1001 * 518/517 = 1002.9 -> 71.6 -> 72 * 14
    ((518, 539), (518, 532)),    # 539 / 14 = 38.5 rounds half to even: 38 * 14
    ((518, 525), (518, 532)),    # 525 / 14 = 37.5 rounds half to even: 38 * 14
    ((518, 518), (518, 518)),
    ((2000, 3000), (518, 784)),  # downscale: 3000 * 518/2000 = 777 -> 55.5 rounds half to even: 56 * 14
])
def test_depth_input_size_lower_bound_multiple_of_14(hw, expected):
    h, w = depth_input_size(*hw)
    assert (h, w) == expected
    assert h % 14 == 0 and w % 14 == 0 and min(h, w) >= 518


@pytest.mark.parametrize(("hw", "expected"), [
    ((480, 640), (384, 512)),
    ((333, 500), (384, 577)),    # 500 * 384/333 = 576.6
    ((1001, 517), (743, 384)),   # 1001 * 384/517 = 743.5 (743.49...)
    ((384, 999), (384, 999)),
    ((229, 229), (384, 384)),    # small images are upscaled, as published
])
def test_short_side_rule(hw, expected):
    assert short_side_size(*hw) == expected
    resized = resize_short_side(np.zeros((*hw, 3), np.uint8))
    assert resized.shape == (*expected, 3)


def test_depth_model_input_matches_published_arithmetic():
    rgb = synthetic_photo(100, 150, seed=3)
    cfg = PreprocessConfig(depth_input_size=70)
    x = depth_model_input(rgb, PreprocessConfig(depth_input_size=70, reference=True))
    h, w = depth_input_size(100, 150, cfg)
    assert x.shape == (3, h, w) and x.dtype == torch.float32
    # Bicubic on float RGB in [0, 1] (not on uint8), then ImageNet mean/std.
    ref = cv2.resize(rgb.astype(np.float64) / 255.0, (w, h), interpolation=cv2.INTER_CUBIC)
    ref = ((ref - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)).transpose(2, 0, 1)
    np.testing.assert_allclose(x.numpy(), ref, atol=1e-6)
    np.testing.assert_allclose(depth_model_input(rgb, cfg).numpy(), ref, atol=3e-6)  # the float32 default
    assert x.min() < (0 - IMAGENET_MEAN[0]) / IMAGENET_STD[0] + 0.5  # unclipped float input


def test_depth_to_map_min_max_truncation():
    ramp = torch.linspace(0, 3, 50).repeat(40, 1)
    out = depth_to_map(ramp, 40, 50)
    assert out.shape == (40, 50) and out.dtype == np.uint8
    assert out.min() == 0 and out.max() == 255
    # Truncation, not rounding: a value 0.9 of the way to the next level stays on the lower level.
    exact = (ramp.numpy() / 3 * 255)
    assert np.array_equal(out, exact.astype(np.uint8))
    resized = depth_to_map(ramp, 80, 100)
    assert resized.shape == (80, 100)
    assert (depth_to_map(torch.ones(10, 10), 10, 10) == 0).all()  # flat depth: no division by zero


def test_depth_to_map_equals_the_published_numpy_arithmetic():
    depth = torch.rand(37, 49, generator=torch.Generator().manual_seed(0)) * 7 + 1
    full = F.interpolate(depth[None, None], (301, 402), mode="bilinear", align_corners=False)[0, 0].numpy()
    reference = ((full - full.min()) / (full.max() - full.min() + np.float32(1e-8)) * 255).astype(np.uint8)
    assert np.array_equal(depth_to_map(depth, 301, 402), reference)


def test_normalization_equals_imagenet_formula():
    img = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    t = normalize_to_tensor(img)
    ref = ((img / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)).transpose(2, 0, 1)
    assert t.shape == (3, 30, 40) and t.dtype == torch.float32
    np.testing.assert_allclose(t.numpy(), ref, atol=2e-6)


def test_crops_are_aligned_between_image_and_depth():
    cfg = PreprocessConfig(num_crops=5)
    image = torch.arange(3 * 384 * 500, dtype=torch.float32).reshape(3, 384, 500)
    depth = image * 2
    a, b = crops(image, depth, cfg)
    assert a.shape == b.shape == (5, 3, 224, 224)
    assert torch.equal(b, a * 2)
    y, x = crop_positions(384, 500, cfg)[0]
    assert a[0, 0, 0, 0] == image[0, y, x]


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_like_cv2_imread(orientation, tmp_path, bands):
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _encode(synthetic_photo(60, 90, seed=orientation), "JPEG", quality=90, exif=exif.tobytes())
    decoded = decode_image(data)
    assert decoded.shape == ((90, 60, 3) if orientation >= 5 else (60, 90, 3))
    assert np.array_equal(decoded, _cv2_reference(data, tmp_path))


@pytest.mark.parametrize("kind", ["jpeg", "progressive", "png", "gray", "palette", "rgba", "16bit_gray", "16bit_rgb"])
def test_decode_equals_published_decoder(kind, tmp_path, bands):
    rgb = synthetic_photo(64, 96, seed=1)
    if kind == "jpeg":
        data = _encode(rgb, "JPEG", quality=85)
    elif kind == "progressive":
        data = _encode(rgb, "JPEG", quality=75, progressive=True, subsampling=2)
    elif kind == "png":
        data = _encode(rgb, "PNG")
    elif kind == "gray":
        data = _encode(rgb[..., 0], "PNG")
    elif kind == "palette":
        buf = io.BytesIO()
        Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE).save(buf, "PNG")
        data = buf.getvalue()
    elif kind == "rgba":
        alpha = np.full((64, 96, 1), 7, np.uint8)
        data = _encode(np.concatenate([rgb, alpha], axis=2), "PNG")
    else:
        wide = rgb.astype(np.uint16) * 257 + 3
        path = tmp_path / "w.png"
        cv2.imwrite(str(path), wide[..., 0] if kind == "16bit_gray" else wide[..., ::-1])
        data = path.read_bytes()
    decoded = decode_image(data)
    assert decoded.dtype == np.uint8 and decoded.shape == (64, 96, 3)
    assert np.array_equal(decoded, _cv2_reference(data, tmp_path))


def test_cmyk_and_float_tiff_decode_to_rgb(bands):
    rgb = synthetic_photo(40, 50, seed=2)
    buf = io.BytesIO()
    Image.fromarray(rgb).convert("CMYK").save(buf, "JPEG", quality=95)
    cmyk = decode_image(buf.getvalue())
    assert cmyk.shape == (40, 50, 3) and np.abs(cmyk.astype(int) - rgb).mean() < 8
    buf = io.BytesIO()
    Image.fromarray(rgb[..., 0].astype(np.float32) / 255.0, mode="F").save(buf, "TIFF")
    gray = decode_image(buf.getvalue())
    assert gray.shape == (40, 50, 3) and np.abs(gray[..., 0].astype(int) - rgb[..., 0]).max() <= 1


def _png_with_declared_size(width: int, height: int) -> bytes:
    data = bytearray(_encode(np.zeros((1, 1, 3), np.uint8), "PNG"))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


@pytest.mark.parametrize(("data", "message"), [
    (b"", "empty file"),
    (b"<html><body>not found</body></html>", "not a recognised image format"),
    (_png_with_declared_size(12_000, 10_000), "12000x10000 = 120000000 pixels, over the limit of 100000000"),
    (_png_with_declared_size(50_000, 50_000), "decompression bomb"),
])
def test_bad_inputs_give_clear_errors(data, message):
    with pytest.raises(ImageError, match=message):
        decode_image(data)


def test_truncated_files_give_clear_errors():
    rgb = synthetic_photo(200, 300, seed=4)
    for fmt in ("JPEG", "PNG"):
        data = _encode(rgb, fmt)
        with pytest.raises(ImageError, match="truncated or corrupt"):
            decode_image(data[: len(data) // 2])


def test_size_limits_are_configurable():
    data = _encode(synthetic_photo(100, 120), "PNG")
    assert decode_image(data).shape == (100, 120, 3)
    with pytest.raises(ImageError, match="12000 pixels, over the limit of 11999"):
        decode_image(data, PreprocessConfig(max_pixels=11_999))
    with pytest.raises(ImageError, match="shorter side must be at least"):
        decode_image(_encode(np.zeros((1, 1, 3), np.uint8), "PNG"))
    with pytest.raises(ImageError, match="aspect ratio 12.0"):
        decode_image(_encode(np.zeros((20, 240, 3), np.uint8), "PNG"))


def test_animated_gif_scores_first_frame():
    frames = [Image.fromarray(np.full((40, 40, 3), v, np.uint8)) for v in (10, 200)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    assert decode_image(buf.getvalue()).mean() < 50


def test_one_channel_depth_map_gives_the_published_three_channel_numbers():
    gray = np.random.default_rng(1).integers(0, 256, (300, 451), dtype=np.uint8)
    three = np.repeat(gray[..., None], 3, axis=2)  # what the published code carries (cv2.COLOR_GRAY2RGB)
    assert np.array_equal(resize_short_side(three), np.repeat(resize_short_side(gray)[..., None], 3, axis=2))
    assert torch.equal(normalize_to_tensor(resize_short_side(three)), normalize_to_tensor(resize_short_side(gray)))


@pytest.mark.parametrize("hw", [(333, 500), (3000, 4000)])
def test_float32_depth_input_is_within_3e_6_of_the_float64_reference(hw):
    rgb = synthetic_photo(*hw, seed=5)
    fast = depth_model_input(rgb, PreprocessConfig())
    reference = depth_model_input(rgb, PreprocessConfig(reference=True))
    assert fast.shape == reference.shape
    # Normalised units (one 8-bit level is about 0.017): measured 1.4e-6 on both.
    assert (fast - reference).abs().max() < 3e-6


def _whole_image_float32(rgb: np.ndarray, use_ipp: bool) -> np.ndarray:
    """The default depth input as it was: a float32 copy of the whole image, resized in one call."""
    new_h, new_w = depth_input_size(*rgb.shape[:2])
    previous = cv2.ipp.useIPP()
    cv2.ipp.setUseIPP(use_ipp)
    try:
        resized = cv2.resize(rgb.astype(np.float32) * np.float32(1 / 255), (new_w, new_h),
                             interpolation=cv2.INTER_CUBIC)
    finally:
        cv2.ipp.setUseIPP(previous)
    resized -= np.array(IMAGENET_MEAN, np.float32)
    resized /= np.array(IMAGENET_STD, np.float32)
    return resized.transpose(2, 0, 1)


@pytest.mark.parametrize("band_pixels", [None, 3000, 30000])
@pytest.mark.parametrize("name", ["astronaut", "coffee", "chelsea", "tall"])
def test_depth_input_in_bands_equals_the_whole_image_resize(name, band_pixels, monkeypatch):
    """Photographs in one band or bands of a few to 66 rows; the generated 1001-row image ends in a partial band."""
    ipp = cv2.ipp.useIPP()
    if band_pixels:
        monkeypatch.setattr(pipeline.scoring.preprocess, "_BAND_PIXELS", band_pixels)
    rgb = synthetic_photo(1001, 517, seed=6) if name == "tall" else getattr(skimage_data, name)()
    banded = depth_model_input(rgb).numpy()
    # Bit for bit what OpenCV's own code gives on the whole float32 image (measured: 0 difference).
    np.testing.assert_array_equal(banded, _whole_image_float32(rgb, use_ipp=False))
    # Intel IPP's float32 bicubic, which the whole-image default used, is coarser: measured up to 1.0e-4 on these.
    assert np.abs(banded - _whole_image_float32(rgb, use_ipp=True)).max() < 5e-4
    reference = depth_model_input(rgb, PreprocessConfig(reference=True)).numpy()
    assert np.abs(banded - reference).max() < 3e-6  # measured up to 1.4e-6
    assert cv2.ipp.useIPP() == ipp  # the thread's IPP setting is restored


def test_preprocessing_peak_memory_stays_under_its_bound(tmp_path):
    """A 6 MP JPEG prepared in a fresh process (bench/bench_preprocess_memory.py measures it there).

    The bound is tight enough to catch a full-size float32 copy: the RGB array and such a copy alone take 15 bytes
    per pixel, more than the bound. The old whole-image path measured 20 bytes per pixel on this image, the
    band-by-band path 8.7 (of which 10 MB fixed costs).
    """
    from bench.bench_preprocess_memory import generate

    if not Path("/proc/self/status").exists():
        pytest.skip("peak RSS is read from /proc/self/status (Linux)")
    width, height = 2828, 2121
    path = tmp_path / "6mp.jpg"
    generate(width, height, "jpeg", str(path))
    bound = preprocess_peak_bytes(width * height, PreprocessConfig(max_aspect=width / height))
    assert bound < 15 * width * height
    out = subprocess.run([sys.executable, "-m", "bench.bench_preprocess_memory", "--measure", "after", str(path)],
                         cwd=ROOT, capture_output=True, text=True, check=True)
    measured = json.loads(out.stdout)
    assert measured["depth_input"] == [3, 518, 686]
    assert 0 < measured["peak_bytes"] < bound, f"{measured['peak_bytes'] / 2**20:.1f} MiB, bound {bound / 2**20:.1f}"


@pytest.mark.parametrize("orientation", [1, 6])
def test_draft_decode_shrinks_large_jpegs_but_keeps_every_model_input_shape(orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _encode(synthetic_photo(2400, 3600, seed=3), "JPEG", quality=90, exif=exif.tobytes())
    full_h, full_w = (3600, 2400) if orientation == 6 else (2400, 3600)
    draft = PreprocessConfig(draft=True)
    rgb, height, width = decode_for_scoring(data, draft)
    assert (height, width) == (full_h, full_w)
    assert rgb.shape == (full_h // 2, full_w // 2, 3)  # 1/2 keeps >= 2x the 518 px depth input's short side
    full, fast = prepare_bytes(data), prepare_bytes(data, draft)
    assert (fast.height, fast.width) == (full.height, full.width) == (full_h, full_w)
    assert fast.rgb_small.shape == full.rgb_small.shape
    assert fast.depth_input.shape == full.depth_input.shape
    # Averaged rather than sampled pixels: close, not equal.
    diff = np.abs(fast.rgb_small.astype(int) - full.rgb_small.astype(int))
    assert 0 < diff.mean() < 3


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_draft_decode_leaves_small_jpegs_and_other_formats_alone(fmt):
    rgb = synthetic_photo(900, 1200, seed=4) if fmt == "JPEG" else synthetic_photo(1600, 2400, seed=4)
    data = _encode(rgb, fmt)
    drafted, height, width = decode_for_scoring(data, PreprocessConfig(draft=True))
    assert (height, width) == rgb.shape[:2]
    assert np.array_equal(drafted, decode_image(data))
