"""The scores equal the published inference's: numbers recorded from ``uf-robopi/DGIQA``'s own script.

``tests/data/dgiqa_published_scores.json`` holds what the published ``single_image_inference.py`` (at the commit
recorded there) printed and computed when it was run beside this project, on the seeded random weights that
``pipeline.scoring.sample`` writes (their SHA-256 recorded there too) and on images the tests can read again:
scikit-image's photographs, a checked-in EXIF-rotated JPEG and a generated 12 MP JPEG. Its depth maps for the
small images are checked in as PNGs under ``tests/data/dgiqa_published_depth/``. No code of the published
repository is here, only its numbers.

The weights are calibrated so that the scores spread across [0, 1] (``write_random_dgiqa``), and every tolerance
below is at most a tenth of that spread: a swap of two images, crops cut elsewhere, a dropped EXIF rotation or
another resize all move a score by far more than the tolerance that guards it.
"""

import hashlib
import io
import json

import cv2
import numpy as np
import pyarrow.dataset as pads
import pytest
import torch
from PIL import Image

from pipeline.cli import main as dgiqa
from pipeline.scoring.preprocess import PreprocessConfig, prepare_bytes
from pipeline.scoring.sample import depth_random_name, synthetic_photo, write_random_depth_anything
from pipeline.scoring.scorer import Scorer, ScorerConfig
from tests.conftest import DATA, SKIMAGE_DATA, assert_regenerated

GOLDEN = json.loads((DATA / "dgiqa_published_scores.json").read_text())
LARGE = "generated_12mp.jpg"
SMALL = [name for name in GOLDEN["images"] if name != LARGE]
# Float32 everywhere, the published explicit attention products against the fused kernel: measured up to 8.2e-6.
FP32_TOLERANCE = 1e-5
# The Ray job's actor runs its models on one thread, where the depth model's float32 sums round a few more depth-map
# pixels across a level: measured 9.4e-6.
JOB_TOLERANCE = 2e-5
# bf16 autocast on the CPU: measured up to 7.1e-2 on a CPU with AVX-512 BF16 and 8.3e-2 on one with AVX2 only
# (the bf16 kernels differ by instruction set; a random network's features vary little from image to image, so
# bf16 rounding weighs more than it does in trained weights). It guards gross errors only: the recorded scores
# span 0.78, under ten times this tolerance.
BF16_TOLERANCE = 1e-1
# JPEG draft-mode decode of the 12 MP photo: measured 1.1e-2.
DRAFT_TOLERANCE = 2e-2
# --decode gpu run on the CPU (torchvision's decode, PyTorch's resizes): measured at most 1.1e-4 on the JPEGs.
DEVICE_DECODE_TOLERANCE = 1e-3


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _image_bytes(name: str) -> bytes:
    """The bytes the published script read, made or found again; a changed input fails here, by name."""
    record = GOLDEN["images"][name]
    if record["source"] == "scikit-image":
        data = (SKIMAGE_DATA / name).read_bytes()
    elif record["source"] == "tests/data":
        data = (DATA / name).read_bytes()
    else:
        recipe = record["recipe"]
        buf = io.BytesIO()
        Image.fromarray(synthetic_photo(recipe["height"], recipe["width"], seed=recipe["seed"])).save(
            buf, "JPEG", quality=recipe["jpeg_quality"])
        data = buf.getvalue()
    assert _sha256(data) == record["sha256"], f"{name} is not the file the published code scored"
    return data


def _published(name: str, crops: int | None = None) -> float:
    """The published score of ``name`` with its first ``crops`` crops: the script draws crop positions one after
    another from ``random.seed(42)``, so a run with fewer crops scores the first ones of the recorded run."""
    crop_scores = GOLDEN["images"][name]["crop_scores"][:crops]
    return torch.tensor(crop_scores, dtype=torch.float32).mean().item()


def _scorer(checkpoints, crops: int = GOLDEN["crops"], **options) -> Scorer:
    preprocess = PreprocessConfig(num_crops=crops, reference=options.pop("reference", False),
                                  draft=options.pop("draft", False))
    options.setdefault("device", "cpu")
    return Scorer(ScorerConfig(weights=str(checkpoints["dgiqa"]), depth_weights=str(checkpoints["depth"]),
                               encoder=GOLDEN["encoder"], preprocess=preprocess, **options))


def test_the_test_weights_are_the_ones_the_published_code_ran(checkpoints):
    assert_regenerated(checkpoints["dgiqa"], GOLDEN["weights"]["dgiqa"]["sha256"], "dgiqa")
    assert_regenerated(checkpoints["depth"], GOLDEN["weights"]["depth"]["sha256"], "depth_anything_v1_vits14")


def test_the_weights_check_refuses_other_weights(tmp_path):
    """Another seed's file fails the fingerprint comparison that tolerates the init's last-bit differences."""
    other = write_random_depth_anything(tmp_path / depth_random_name("vits"), seed=1)
    with pytest.raises(AssertionError, match=r"^(depth_head|pretrained)\."):
        assert_regenerated(other, GOLDEN["weights"]["depth"]["sha256"], "depth_anything_v1_vits14")


def test_recorded_scores_spread_far_beyond_every_tolerance():
    scores = [record["score"] for record in GOLDEN["images"].values()]
    spread = max(scores) - min(scores)
    for tolerance in (FP32_TOLERANCE, JOB_TOLERANCE, DRAFT_TOLERANCE, DEVICE_DECODE_TOLERANCE):
        assert spread >= 10 * tolerance
    assert spread >= 7 * BF16_TOLERANCE
    # The crops of one image differ too, so crops cut at other places would show.
    assert all(np.ptp(record["crop_scores"]) > 100 * FP32_TOLERANCE for record in GOLDEN["images"].values())
    assert _published("rocket.jpg") == pytest.approx(GOLDEN["images"]["rocket.jpg"]["score"], abs=1e-7)
    print(f"\npublished scores span {min(scores):.3f}..{max(scores):.3f}")


@pytest.mark.slow
def test_default_path_gives_the_published_scores_and_depth_maps(checkpoints):
    """All small images in one call: their crops share forward passes, so a mix-up inside a batch shows."""
    scorer = _scorer(checkpoints)
    prepared = [prepare_bytes(_image_bytes(name), scorer.config.preprocess) for name in SMALL]
    results = scorer.score_prepared(prepared)
    worst = 0.0
    for name, result in zip(SMALL, results, strict=True):
        record = GOLDEN["images"][name]
        assert [result.width, result.height] == record["size"], name  # EXIF orientation applied
        assert result.score == pytest.approx(record["score"], abs=FP32_TOLERANCE), name
        assert result.score_std == pytest.approx(np.std(record["crop_scores"]), abs=FP32_TOLERANCE), name
        worst = max(worst, abs(result.score - record["score"]))
    levels, share = 0, 0.0
    for name, depth_map in zip(SMALL, scorer.depth_maps(prepared), strict=True):
        published = cv2.imread(str(DATA / GOLDEN["images"][name]["depth_map"]), cv2.IMREAD_UNCHANGED)
        assert published.shape == depth_map.shape, name
        differ = published != depth_map
        levels = max(levels, int(np.abs(published.astype(int) - depth_map.astype(int)).max()))
        share = max(share, float(differ.mean()))
    # Float rounding in attention moves a few pixels across a truncation boundary, by one level.
    assert levels <= 1 and share <= 2e-3
    print(f"\ndefault path vs published: max |delta score| = {worst:.1e}; depth maps within {levels} level on at "
          f"most {share:.2%} of pixels")


@pytest.mark.slow
def test_a_12_mp_jpeg_scores_as_published_full_reference_and_draft(checkpoints):
    data = _image_bytes(LARGE)
    published = GOLDEN["images"][LARGE]["score"]
    deltas = {}
    for label, options in [("default", {}), ("reference", {"reference": True, "attention": "math"}),
                           ("draft", {"draft": True})]:
        result = _scorer(checkpoints, **options).score_bytes(data)
        assert [result.width, result.height] == GOLDEN["images"][LARGE]["size"]
        deltas[label] = abs(result.score - published)
    assert deltas["default"] <= FP32_TOLERANCE and deltas["reference"] <= FP32_TOLERANCE
    assert 0 < deltas["draft"] <= DRAFT_TOLERANCE
    print("\n12 MP JPEG vs published: " + ", ".join(f"{k} {v:.1e}" for k, v in deltas.items()))


@pytest.mark.slow
def test_decoding_on_the_device_stays_within_its_tolerance_of_the_published_scores(checkpoints):
    """``--decode gpu`` with the CPU as the device: the same arithmetic as on a GPU but nvJPEG's decode."""
    scorer = _scorer(checkpoints, decode="gpu")
    jpegs = [name for name in GOLDEN["images"] if name.endswith(".jpg")]
    deltas = {}
    for name in jpegs:
        result = scorer.score_bytes(_image_bytes(name))
        assert [result.width, result.height] == GOLDEN["images"][name]["size"], name  # EXIF orientation applied
        deltas[name] = abs(result.score - GOLDEN["images"][name]["score"])
    assert len(jpegs) == 3 and 0 < max(deltas.values()) <= DEVICE_DECODE_TOLERANCE
    print("\n--decode gpu on the CPU vs published: " + ", ".join(f"{k} {v:.1e}" for k, v in deltas.items()))


@pytest.mark.slow
def test_bf16_autocast_stays_within_its_tolerance_of_the_published_scores(checkpoints):
    # Three images: bf16 is emulated on CPUs without AVX-512 BF16, where six took 140 s.
    names = SMALL[:3]
    scorer = _scorer(checkpoints, crops=2, precision="bf16")
    results = scorer.score_prepared([prepare_bytes(_image_bytes(name), scorer.config.preprocess) for name in names])
    deltas = [abs(result.score - _published(name, 2)) for name, result in zip(names, results, strict=True)]
    assert max(deltas) <= BF16_TOLERANCE
    print(f"\nbf16 vs published (2 crops): max |delta score| = {max(deltas):.1e}")


@pytest.mark.slow
def test_dgiqa_score_prints_the_published_scores(checkpoints, tmp_path, capsys):
    names = ["chelsea_exif_rotated.jpg", "rocket.jpg"]
    paths = []
    for name in names:
        paths.append(tmp_path / name)
        paths[-1].write_bytes(_image_bytes(name))
    code = dgiqa(["score", *map(str, paths), "--weights", str(checkpoints["dgiqa"]), "--depth-weights",
                  str(checkpoints["depth"]), "--crops", "2", "--device", "cpu", "--json"])
    assert code == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [row["uri"] for row in rows] == list(map(str, paths))
    for name, row in zip(names, rows, strict=True):
        assert row["score"] == pytest.approx(_published(name, 2), abs=FP32_TOLERANCE), name
    worst = max(abs(row["score"] - _published(name, 2)) for name, row in zip(names, rows, strict=True))
    print(f"\ndgiqa score vs published (2 crops): max |delta score| = {worst:.1e}")


@pytest.fixture()
def local_ray():
    import ray  # here, not at the top: tests/test_gpu.py imports this module on machines without Ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             _node_ip_address="127.0.0.1")
    yield
    ray.shutdown()


@pytest.mark.slow
def test_the_ray_job_writes_the_published_scores(local_ray, checkpoints, tmp_path):
    """Decoded in Ray tasks, three images a batch in the scoring actor, written and read back as Parquet."""
    from pipeline.batch.job import JobConfig, run_job

    bucket = tmp_path / "bucket"
    bucket.mkdir()
    for name in SMALL:
        (bucket / name).write_bytes(_image_bytes(name))
    output = tmp_path / "out"
    summary = run_job(JobConfig(manifest=str(bucket), output=str(output), weights=str(checkpoints["dgiqa"]),
                                depth_weights=str(checkpoints["depth"]), crops=2, batch_size=3, log_every_s=0,
                                run_date="2026-12-02"))
    assert summary["status_counts"] == {"ok": len(SMALL), "error": 0, "rejected": 0}
    table = pads.dataset(str(output), format="parquet", partitioning="hive").to_table()
    scores = {uri.rsplit("/", 1)[-1]: score for uri, score in
              zip(table.column("uri").to_pylist(), table.column("score").to_pylist(), strict=True)}
    assert sorted(scores) == sorted(SMALL)
    for name in SMALL:
        assert scores[name] == pytest.approx(_published(name, 2), abs=JOB_TOLERANCE), name
    worst = max(abs(scores[name] - _published(name, 2)) for name in SMALL)
    print(f"\nRay job vs published (2 crops): max |delta score| = {worst:.1e}")
