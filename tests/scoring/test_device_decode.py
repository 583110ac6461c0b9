"""``--decode gpu`` on the CPU: JPEGs shipped encoded, decoded and resized by torchvision/PyTorch in the actor.

Its numbers against the published ones are checked in ``tests/test_published_parity.py``; here, the path itself:
what ships between the stages, rows that stay with their images, errors that stay rows, settings refused.
"""

import dataclasses
import io

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from pipeline.batch.stages import ScoreActor, _unpack, prepare_batch
from pipeline.scoring.device_decode import EncodedImage
from pipeline.scoring.preprocess import PreparedImage, PreprocessConfig
from pipeline.scoring.scorer import Scorer, ScorerConfig


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
    return Scorer(dataclasses.replace(fast_scorer.config, decode="gpu"))


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


def test_encoded_images_cross_the_stages_as_their_bytes():
    item = EncodedImage(np.frombuffer(b"\xff\xd8\xffdata", np.uint8).copy(), 3, 4)
    back = EncodedImage.from_arrays(item.to_arrays(), 3, 4)
    assert back.data.tobytes() == b"\xff\xd8\xffdata" and (back.height, back.width) == (3, 4)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"decode": "gpu", "preprocess": PreprocessConfig(draft=True)}, "--draft-decode and --decode gpu exclude"),
    ({"decode": "npu"}, "decode must be one of cpu, gpu"),
    ({"decode": "gpu", "model": "dpiqa-student", "depth_weights": None}, "--decode is not used by --model dpiqa"),
])
def test_settings_that_cannot_work_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ScorerConfig(**{"weights": "w", "depth_weights": "d", **kwargs})
