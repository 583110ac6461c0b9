"""``--decode gpu`` on the CPU: JPEGs shipped encoded, decoded and resized by torchvision/PyTorch in the actor.

Its numbers against the published ones are checked in ``tests/test_published_parity.py``; here, the path itself:
what ships between the stages, rows that stay with their images, errors that stay rows, settings refused, and
EXIF orientations turned as the CPU decode turns them.
"""

import dataclasses
import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
import torchvision.io
from PIL import Image

from pipeline.batch.stages import ScoreActor, _unpack, pack_arrays, prepare_batch
from pipeline.scoring import device_decode
from pipeline.scoring.device_decode import EncodedImage, decode_on_device, decode_oriented, prepare_for_device
from pipeline.scoring.preprocess import PreparedImage, PreprocessConfig, decode_image, prepare_bytes
from pipeline.scoring.scorer import Scorer, ScorerConfig, make_scorer

DATA = Path(__file__).parents[1] / "data"
CPU = torch.device("cpu")


def _jpeg(path, quality=90, orientation=None) -> bytes:
    buf = io.BytesIO()
    image = Image.open(path).convert("RGB")
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    image.save(buf, "JPEG", quality=quality, exif=exif)
    return buf.getvalue()


@pytest.fixture(scope="module")
def gpu_decode(fast_scorer) -> Scorer:
    return make_scorer(dataclasses.replace(fast_scorer.config, decode="gpu"))


def test_jpegs_ship_encoded_and_score_in_the_actor_beside_cpu_decoded_images(fast_scorer, gpu_decode,
                                                                            photo_paths):
    jpeg, rotated = _jpeg(photo_paths[0]), _jpeg(photo_paths[1], orientation=6)
    png = photo_paths[2].read_bytes()
    truncated = jpeg[:len(jpeg) // 3]
    batch = pa.table({"row_index": pa.array(range(4), pa.int64()), "status": ["ok"] * 4,
                      "error": pa.nulls(4, pa.string()), "data": [jpeg, rotated, png, truncated]})
    prepared = prepare_batch(batch, gpu_decode.config)
    rows = prepared.to_pylist()
    kinds = [type(_unpack(row, PreparedImage)).__name__ if row["prepared"] else None for row in rows]
    assert kinds == ["EncodedImage", "EncodedImage", "PreparedImage", "EncodedImage"]  # PNGs decode on the CPU
    width, height = Image.open(photo_paths[1]).size
    assert (rows[1]["width"], rows[1]["height"]) == (height, width)  # the header's EXIF orientation, read early

    out = ScoreActor(gpu_decode.config, gpu_decode.model_id)(prepared).to_pylist()
    assert [r["status"] for r in out] == ["ok", "ok", "ok", "error"]
    assert "scoring failed" in out[3]["error"] and "corrupt" in out[3]["error"]
    on_cpu = [fast_scorer.score_bytes(data) for data in (jpeg, rotated, png)]
    spread = max(r.score for r in on_cpu) - min(r.score for r in on_cpu)
    for row, expected in zip(out, on_cpu, strict=False):
        assert (row["width"], row["height"]) == (expected.width, expected.height)
        assert row["score"] == pytest.approx(expected.score, abs=1e-3)  # measured: at most 1.1e-4
    assert spread > 1e-2  # so a row given another image's score would fail above


def test_encoded_images_cross_the_stages_as_their_bytes_and_orientation():
    item = EncodedImage(np.frombuffer(b"\xff\xd8\xffdata", np.uint8).copy(), 3, 4, orientation=6)
    back = _unpack({"prepared": pack_arrays(item.to_arrays()), "height": 3, "width": 4}, PreparedImage)
    assert isinstance(back, EncodedImage) and back.data.tobytes() == b"\xff\xd8\xffdata"
    assert (back.height, back.width, back.orientation) == (3, 4, 6)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"decode": "gpu", "preprocess": PreprocessConfig(draft=True)}, "--draft-decode and --decode gpu exclude"),
    ({"decode": "npu"}, "decode must be one of cpu, gpu"),
    ({"decode": "gpu", "model": "dpiqa-student", "depth_weights": None}, "--decode is not used by --model dpiqa"),
])
def test_settings_that_cannot_work_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ScorerConfig(**{"weights": "w", "depth_weights": "d", **kwargs})


@pytest.fixture(params=["cpu", "cuda"])
def torchvision_as_on(request, monkeypatch) -> str:
    """``decode_jpeg`` as torchvision runs it on that device.

    On CUDA (``decode_jpegs_cuda``, nvJPEG) torchvision ignores ``apply_exif_orientation``; no GPU is needed to
    see what that does to the device path: the CPU decoder, called as the CUDA branch calls it.
    """
    if request.param == "cuda":
        real = torchvision.io.decode_jpeg

        def as_on_cuda(input, mode, device, apply_exif_orientation=False):  # noqa: A002 - torchvision's name
            return real(input, mode=mode, device=device, apply_exif_orientation=False)

        monkeypatch.setattr(device_decode, "decode_jpeg", as_on_cuda)
    return request.param


@pytest.fixture(scope="module")
def small_photo(photo_paths) -> Image.Image:
    """A photograph, small and non-square (72 wide, 48 high), so that every flip and turn shows."""
    return Image.open(photo_paths[2]).convert("RGB").resize((72, 48), Image.Resampling.LANCZOS)


def _with_orientation(image: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90, exif=exif)
    return buf.getvalue()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_decodes_on_the_device_as_on_the_cpu(small_photo, orientation, torchvision_as_on):
    data = _with_orientation(small_photo, orientation)
    config = PreprocessConfig(num_crops=1, depth_input_size=70)
    expected = decode_image(data, config)
    assert expected.shape[:2] == ((72, 48) if orientation >= 5 else (48, 72))
    item = prepare_for_device(data, config)
    assert isinstance(item, EncodedImage) and item.orientation == orientation

    rgb = decode_oriented([item], CPU)[0].permute(1, 2, 0).numpy()
    assert rgb.shape == expected.shape
    # Both decoders are libjpeg-turbo here (measured: identical); 2 levels leaves room for another build's IDCT,
    # while a mirrored or turned photo is off by tens of levels on average.
    assert np.abs(rgb.astype(int) - expected).max() <= 2

    on_device = decode_on_device([item], config, CPU)[0]
    on_cpu = prepare_bytes(data, config)
    assert (on_device.height, on_device.width) == (on_cpu.height, on_cpu.width)
    assert np.abs(on_device.rgb_small.astype(int) - on_cpu.rgb_small).max() <= 2  # measured: 1 (resize rounding)
    assert torch.allclose(on_device.depth_input, on_cpu.depth_input, atol=1e-3)  # measured: 2.6e-4


@pytest.mark.parametrize("batched", [True, False])
def test_a_rotated_photograph_decodes_on_the_device_as_on_the_cpu(torchvision_as_on, batched, monkeypatch):
    data = (DATA / "chelsea_exif_rotated.jpg").read_bytes()
    config = PreprocessConfig(num_crops=1, depth_input_size=70)
    expected = decode_image(data, config)
    stored = Image.open(io.BytesIO(data))
    assert stored.getexif()[0x0112] == 6 and expected.shape[:2] == stored.size  # turned: width and height swap
    if not batched:  # a batch the batched decoder refuses is decoded one image at a time
        one_at_a_time = device_decode.decode_jpeg

        def refuse_lists(input, **kwargs):  # noqa: A002 - torchvision's name
            if isinstance(input, list):
                raise RuntimeError("batch refused")
            return one_at_a_time(input, **kwargs)

        monkeypatch.setattr(device_decode, "decode_jpeg", refuse_lists)
    rgb = decode_oriented([prepare_for_device(data, config)], CPU)[0].permute(1, 2, 0).numpy()
    assert rgb.shape == expected.shape and np.abs(rgb.astype(int) - expected).max() <= 2
