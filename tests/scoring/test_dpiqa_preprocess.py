import dataclasses
import hashlib
import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from torchvision import transforms

from pipeline.scoring.dpiqa_preprocess import DpiqaPreprocessConfig, prepare_dpiqa, to_tensor
from pipeline.scoring.preprocess import ImageError, PreprocessConfig
from tests.conftest import PHOTOS, SKIMAGE_DATA
from tests.models.test_dpiqa import GOLDEN, golden_image

EXIF_ORIENTATION = 0x0112


def encode(array: np.ndarray, fmt: str = "PNG", mode: str | None = None, **params) -> bytes:
    image = Image.fromarray(array)
    if mode:
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def noise(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def reference(data: bytes) -> np.ndarray:
    """The authors' decode and resize, written out with Pillow alone."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((512, 512), Image.BILINEAR))


@pytest.mark.parametrize(("height", "width", "fmt", "mode"), [
    (16, 16, "PNG", None),
    (300, 200, "JPEG", None),
    (200, 1000, "PNG", "L"),
    (33, 17, "PNG", "RGBA"),
    (512, 512, "WEBP", None),
    (101, 1000, "PNG", "P"),
    (700, 650, "TIFF", None),
])
def test_any_size_and_mode_gives_512_uint8(height, width, fmt, mode):
    data = encode(noise(height, width), fmt, mode)
    array, out_height, out_width = prepare_dpiqa(data)
    assert array.shape == (512, 512, 3)
    assert array.dtype == np.uint8
    assert array.flags.c_contiguous and array.flags.writeable
    assert (out_height, out_width) == (height, width)
    np.testing.assert_array_equal(array, reference(data))


@pytest.mark.parametrize("name", PHOTOS)
def test_real_photographs_match_the_authors_transform(name):
    data = (SKIMAGE_DATA / name).read_bytes()
    array, height, width = prepare_dpiqa(data)
    original = Image.open(SKIMAGE_DATA / name)
    assert (height, width) == (original.height, original.width)
    np.testing.assert_array_equal(array, reference(data))
    # The whole input equals the authors' torchvision pipeline on the PIL image, bit for bit.
    authors = transforms.Compose([transforms.Resize((512, 512)), transforms.ToTensor()])
    expected = authors(original.convert("RGB"))
    ours = to_tensor(array[None])[0]
    assert ours.dtype == expected.dtype == torch.float32
    assert torch.equal(ours, expected)


@pytest.mark.parametrize("entry", GOLDEN["images"], ids=lambda entry: entry["name"])
def test_inputs_of_the_recorded_images_equal_the_published_transform(entry):
    # Hashes recorded from the authors' own transform when the published scores were made: a failure here says
    # that the pixels changed (Pillow, the generator), not the model.
    data = golden_image(entry)
    decoded = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert hashlib.sha256(decoded.tobytes()).hexdigest() == entry["decoded_rgb_sha256"]
    array, _, _ = prepare_dpiqa(data)
    tensor = to_tensor(array[None])[0]
    assert hashlib.sha256(tensor.numpy().astype("<f4").tobytes()).hexdigest() == entry["input_sha256"]


def test_resize_ignores_aspect_ratio_and_smooths():
    # A 100x400 image squashed to a square: each input column pair spans about 1.3 output columns.
    stripes = np.zeros((100, 400, 3), np.uint8)
    stripes[:, ::2] = 255
    array, _, _ = prepare_dpiqa(encode(stripes))
    assert array.shape == (512, 512, 3)
    # Bilinear downscaling in x averages the 1-px stripes (Pillow's resize is antialiased); y is only stretched.
    assert 100 < array.mean() < 155
    assert np.ptp(array[:, 256]) == 0


def test_to_tensor_scales_without_normalising():
    batch = np.zeros((3, 512, 512, 3), np.uint8)
    batch[1] = 255
    batch[2, 10, 20] = (1, 128, 254)
    tensor = to_tensor(batch)
    assert tensor.shape == (3, 3, 512, 512)
    assert tensor.dtype == torch.float32
    assert tensor.min() == 0 and tensor.max() == 1
    assert torch.all(tensor[0] == 0) and torch.all(tensor[1] == 1)
    expected = torch.tensor([1, 128, 254], dtype=torch.float32) / 255
    assert torch.equal(tensor[2, :, 10, 20], expected)


def test_to_tensor_accepts_a_list_and_read_only_arrays():
    first, second = noise(512, 512, 1), noise(512, 512, 2)
    first.flags.writeable = False
    tensor = to_tensor([first, second], device="cpu")
    assert tensor.shape == (2, 3, 512, 512)
    assert torch.equal(tensor[0], transforms.ToTensor()(Image.fromarray(first)))
    assert torch.equal(tensor[1], transforms.ToTensor()(Image.fromarray(second)))


@pytest.mark.parametrize("bad", [
    np.zeros((2, 512, 512, 3), np.float32),
    np.zeros((512, 512, 3), np.uint8),
    np.zeros((2, 512, 512, 4), np.uint8),
])
def test_to_tensor_refuses_other_arrays(bad):
    with pytest.raises(ValueError, match=r"uint8 images of shape \(N, H, W, 3\)"):
        to_tensor(bad)


@pytest.fixture(scope="module")
def sideways_jpeg() -> bytes:
    """A landscape JPEG, left half red and right half blue, tagged 'rotate 90 degrees clockwise to view'."""
    stored = np.zeros((40, 80, 3), np.uint8)
    stored[:, :40] = (255, 0, 0)
    stored[:, 40:] = (0, 0, 255)
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    return encode(stored, "JPEG", quality=95, exif=exif)


def test_exif_orientation_is_ignored_by_default(sideways_jpeg):
    assert Image.open(io.BytesIO(sideways_jpeg)).getexif()[EXIF_ORIENTATION] == 6
    array, height, width = prepare_dpiqa(sideways_jpeg)
    assert (height, width) == (40, 80)
    np.testing.assert_array_equal(array, reference(sideways_jpeg))
    # Stored orientation: red on the left, blue on the right.
    assert array[:, :200, 0].mean() > 200 and array[:, :200, 2].mean() < 50
    assert array[:, -200:, 2].mean() > 200 and array[:, -200:, 0].mean() < 50


def test_exif_orientation_is_applied_on_request(sideways_jpeg):
    array, height, width = prepare_dpiqa(sideways_jpeg, DpiqaPreprocessConfig(exif_transpose=True))
    assert (height, width) == (80, 40)
    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(sideways_jpeg))).convert("RGB")
    np.testing.assert_array_equal(array, np.asarray(upright.resize((512, 512), Image.BILINEAR)))
    # Turned clockwise: the stored left (red) half is now on top.
    assert array[:200, :, 0].mean() > 200 and array[:200, :, 2].mean() < 50
    assert array[-200:, :, 2].mean() > 200 and array[-200:, :, 0].mean() < 50


def test_the_scorer_config_carries_the_exif_option_to_the_students_preprocessing(sideways_jpeg):
    # The road every scored image takes (CLI, actors): registry -> prepare_item -> prepare_for_scoring.
    from pipeline.scoring.scorer import ScorerConfig, prepare_item

    plain, upright = (prepare_item(sideways_jpeg, ScorerConfig(weights="w", model="dpiqa-student", exif_transpose=on))
                      for on in (False, True))
    assert (plain.height, plain.width, upright.height, upright.width) == (40, 80, 80, 40)
    np.testing.assert_array_equal(plain.pixels, prepare_dpiqa(sideways_jpeg)[0])
    np.testing.assert_array_equal(upright.pixels,
                                  prepare_dpiqa(sideways_jpeg, DpiqaPreprocessConfig(exif_transpose=True))[0])


def test_animated_image_gives_its_first_frame():
    frames = [Image.new("RGB", (32, 32), color) for color in ((255, 0, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert Image.open(io.BytesIO(buffer.getvalue())).n_frames == 2
    array, _, _ = prepare_dpiqa(buffer.getvalue())
    assert np.all(array == (255, 0, 0))


def truncated_jpeg(height: int = 200, width: int = 200) -> bytes:
    data = encode(noise(height, width), "JPEG")
    return data[:len(data) // 2]


@pytest.mark.parametrize(("data", "config", "message"), [
    (b"", DpiqaPreprocessConfig(), "empty file"),
    (b"quality,score\nphoto.jpg,0.5\n", DpiqaPreprocessConfig(), "not a recognised image format"),
    (truncated_jpeg(), DpiqaPreprocessConfig(), "truncated or corrupt image data"),
    (encode(noise(200, 200)), DpiqaPreprocessConfig(max_pixels=10_000), "over the limit of 10000 (max_pixels)"),
    # Refused from the header: a truncated file over the limit is reported as too large, never decoded.
    (truncated_jpeg(), DpiqaPreprocessConfig(max_pixels=10_000), "40000 pixels, over the limit"),
    (encode(noise(10, 100)), DpiqaPreprocessConfig(), "shorter side must be at least 16 px"),
    (encode(noise(20, 300)), DpiqaPreprocessConfig(), "aspect ratio 15.0"),
])
def test_unscorable_data_raises_image_error(data, config, message):
    with pytest.raises(ImageError) as info:
        prepare_dpiqa(data, config)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_config_is_frozen_with_the_project_limits():
    config = DpiqaPreprocessConfig()
    assert config.exif_transpose is False
    limits = PreprocessConfig()
    assert (config.max_pixels, config.min_side, config.max_aspect) == (
        limits.max_pixels, limits.min_side, limits.max_aspect)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.exif_transpose = True
    with pytest.raises(ValueError):
        DpiqaPreprocessConfig(max_aspect=0.5)
    cli = PreprocessConfig(max_pixels=1234, min_side=20, max_aspect=3.0)
    assert DpiqaPreprocessConfig.from_preprocess(cli, exif_transpose=True) == DpiqaPreprocessConfig(
        exif_transpose=True, max_pixels=1234, min_side=20, max_aspect=3.0)
