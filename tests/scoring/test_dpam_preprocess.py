"""DPAM-IQA's inputs against the authors' data loaders, recorded as SHA-256s of their arrays in tests/data."""

import hashlib
import json

import cv2
import numpy as np
import pytest

from pipeline.scoring.dpam_preprocess import (
    PRESETS,
    five_crop_corners,
    prepare_dpam,
    superpixel_features,
    texture_image,
    to_tensors,
)
from pipeline.scoring.preprocess import ImageError
from tests.conftest import DATA, SKIMAGE_DATA

GOLDEN = json.loads((DATA / "dpam_published_scores.json").read_text())


def image_bytes(entry: dict) -> bytes:
    folder = DATA if entry["source"] == "tests/data" else SKIMAGE_DATA
    return (folder / entry["image"]).read_bytes()


def _sha256(tensor) -> str:
    return hashlib.sha256(np.ascontiguousarray(tensor.numpy()).tobytes()).hexdigest()


@pytest.mark.parametrize("entry", GOLDEN["preprocessing"], ids=lambda e: f"{e['trained_on']}-{e['image']}")
def test_the_three_inputs_equal_the_authors_loader_bit_for_bit(entry):
    """ViT input, texture image and superpixel colours, as the loader of the checkpoint's training set makes them.

    The cases cover the random draws (chelsea has 24 superpixels where KonIQ's loader wants 135; coffee has
    superpixels of fewer pixels than SPAQ's 600), an EXIF-rotated JPEG, and a synthetic set's crop.
    """
    prepared = prepare_dpam(image_bytes(entry), trained_on=entry["trained_on"])
    rgb, texture, superpixels = to_tensors([prepared])
    crop = 0
    if entry["top_left"] is not None:  # the authors' random crop, fixed at one of the five-point positions
        crop = five_crop_corners(prepared.height, prepared.width).index(tuple(entry["top_left"]))
    got = {"d_img_org": rgb[crop], "d_img_texture": texture[crop], "d_img_slic": superpixels[crop]}
    assert {k: list(v.shape) for k, v in got.items()} == entry["shapes"]
    assert {k: _sha256(v) for k, v in got.items()} == entry["sha256"]


def test_the_recorded_cases_take_the_random_paths_and_draw_the_same_whatever_the_global_generator():
    bgr = cv2.imread(str(SKIMAGE_DATA / "chelsea.png"))
    preset = PRESETS["koniq10k"]
    np.random.seed(1)
    first = superpixel_features(bgr, preset)
    np.random.seed(2)
    assert np.array_equal(superpixel_features(bgr, preset), first)  # its own generator, not NumPy's global one
    assert not np.array_equal(superpixel_features(bgr, preset, seed=1), first)  # the draws are used
    assert first.shape == (135, 1200, 3) and first.dtype == np.uint8


def test_five_crop_presets_cut_the_authors_five_points_and_refuse_small_images():
    assert five_crop_corners(300, 451) == [(0, 0), (0, 227), (76, 0), (76, 227), (38, 113)]
    prepared = prepare_dpam((SKIMAGE_DATA / "chelsea.png").read_bytes(), trained_on="kadid10k")
    assert prepared.rgb.shape == (5, 224, 224, 3) and prepared.texture.shape == (5, 224, 224, 3)
    assert len({crop.tobytes() for crop in prepared.rgb}) == 5
    whole = prepare_dpam((SKIMAGE_DATA / "chelsea.png").read_bytes(), trained_on="livec")
    assert whole.rgb.shape == (1, 224, 224, 3) and (whole.height, whole.width) == (300, 451)

    small = cv2.imencode(".png", np.full((200, 300, 3), 128, np.uint8))[1].tobytes()
    with pytest.raises(ImageError, match="image is 300x200; the kadid10k preset scores 224x224 crops"):
        prepare_dpam(small, trained_on="kadid10k")
    assert prepare_dpam(small, trained_on="livec").rgb.shape == (1, 224, 224, 3)


def test_the_texture_keeps_the_authors_uint8_wrap():
    """Darker-than-blurred details wrap to values near 1 (255 - d), as the authors' uint8 subtraction gives."""
    step = np.zeros((224, 224, 3), np.uint8)
    step[:, 112:] = 200
    texture = texture_image(step)
    left_of_edge, right_of_edge = texture[112, 110, 0], texture[112, 113, 0]
    assert left_of_edge > 0.5  # 0 - blur: negative, wrapped to nearly 255
    assert 0 < right_of_edge < 0.5  # 200 - blur: a positive detail


@pytest.mark.parametrize(("height", "width"), [(20, 20), (37, 300), (300, 37)])
def test_slic_at_the_image_size_refuses_a_side_it_would_crash_on(height, width):
    """OpenCV's SLICO places no seed in a side of at most region_size // 2 px and then segfaults the process.

    KonIQ-10k's loader runs SLIC (region size 74) at the image's own size: 37 px crashes, 38 px works.
    """
    data = cv2.imencode(".png", np.random.default_rng(0).integers(0, 256, (height, width, 3), np.uint8))[1]
    with pytest.raises(ImageError, match=f"image is {width}x{height}; SLIC superpixels of region size 74 need "
                                         "both sides at least 38 px"):
        prepare_dpam(data.tobytes(), trained_on="koniq10k")


def test_slic_takes_the_smallest_sides_that_do_not_crash():
    rng = np.random.default_rng(0)
    koniq, kadid = PRESETS["koniq10k"], PRESETS["kadid10k"]  # SLIC at the image's size, region sizes 74 and 45
    for height, width in [(38, 300), (300, 38)]:
        features = superpixel_features(rng.integers(0, 256, (height, width, 3), np.uint8), koniq)
        assert features.shape == (135, 1200, 3) and features.dtype == np.uint8
    assert superpixel_features(rng.integers(0, 256, (23, 300, 3), np.uint8), kadid).shape == (99, 600, 3)
    with pytest.raises(ImageError, match="image is 300x22; SLIC superpixels of region size 45 need both sides "
                                         "at least 23 px"):
        superpixel_features(rng.integers(0, 256, (22, 300, 3), np.uint8), kadid)
