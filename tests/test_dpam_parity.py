"""DPAM-IQA scores equal the authors' code's, through ``dgiqa score`` and through the nightly job.

The numbers in tests/data/dpam_published_scores.json were computed by the published code (Roc-3/DPAM_IQA) run
beside this project on seeded random weights that ``write_random_dpam`` regenerates bit for bit here; the file
says how. Those weights make every input count (see ``write_random_dpam``), and the test photographs' scores lie
at least 5e-4 apart, fifty times the tolerance, so a score paired with the wrong image, a wrong superpixel or
texture input, or a crop cut in the wrong place cannot hide under it.
"""

import json
import shutil
from itertools import combinations

import numpy as np
import pyarrow.dataset as pads
import pytest
import ray

from pipeline.batch.job import JobConfig, run_job
from pipeline.cli import main
from pipeline.scoring.sample import write_random_dpam
from tests.conftest import DATA, SKIMAGE_DATA, assert_regenerated

GOLDEN = json.loads((DATA / "dpam_published_scores.json").read_text())
TOLERANCE = GOLDEN["tolerance"]  # 1e-5: float32 on the CPU, one image per forward pass as the authors run it
# The job's actor puts two images into one forward pass, which reorders some sums.
JOB_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = write_random_dpam(tmp_path_factory.mktemp("dpam") / "dpam_random.safetensors")
    assert_regenerated(path, GOLDEN["weights"]["sha256"], "dpam")
    return path


def _path(entry: dict) -> str:
    return str((DATA if entry["source"] == "tests/data" else SKIMAGE_DATA) / entry["image"])


def _score(capsys, weights, paths: list[str], *flags: str) -> list[dict]:
    capsys.readouterr()
    assert main(["score", *paths, "--model", "dpam", "--weights", str(weights), "--device", "cpu", "--json",
                 "--allow-prefix", str(SKIMAGE_DATA), "--allow-prefix", str(DATA), *flags]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


@pytest.mark.parametrize("trained_on", sorted({e["trained_on"] for e in GOLDEN["scores"]}))
def test_dgiqa_score_gives_the_authors_scores(capsys, weights, trained_on):
    expected = [e for e in GOLDEN["scores"] if e["trained_on"] == trained_on]
    rows = _score(capsys, weights, [_path(e) for e in expected], "--trained-on", trained_on)
    for entry, row in zip(expected, rows, strict=True):
        assert row["status"] == "ok" and row["num_crops"] == 1 and row["score_std"] is None
        named = "" if trained_on == "livec" else f"+trained-on={trained_on}"  # the default is not named
        assert row["model_id"] == f"dpam@{GOLDEN['weights']['sha256']}{named}"
        assert row["score"] == pytest.approx(entry["score"], abs=TOLERANCE), entry
    gaps = [abs(a["score"] - b["score"]) for a, b in combinations(expected, 2)]
    assert all(gap > 10 * TOLERANCE for gap in gaps)


def test_the_training_set_preset_changes_the_score_as_the_authors_loaders_do():
    """The same photograph under two loaders: LIVE Challenge's (500x500 SLIC) and KonIQ's (native-size SLIC)."""
    chelsea = {e["trained_on"]: e["score"] for e in GOLDEN["scores"] if e["image"] == "chelsea.png"}
    assert abs(chelsea["livec"] - chelsea["koniq10k"]) > 10 * TOLERANCE  # so the preset test above can fail


def test_a_synthetic_set_preset_averages_the_five_point_crops(capsys, weights):
    crops = [e for e in GOLDEN["crop_scores"] if e["trained_on"] == "kadid10k"]
    [row] = _score(capsys, weights, [_path(crops[0])], "--trained-on", "kadid10k")
    per_crop = np.array([e["score"] for e in crops])
    assert row["num_crops"] == 5
    assert row["score"] == pytest.approx(per_crop.mean(), abs=TOLERANCE)
    assert row["score_std"] == pytest.approx(per_crop.std(), abs=TOLERANCE)
    assert per_crop.std() > 10 * TOLERANCE  # the crops differ, so a crop cut elsewhere would show


def test_the_nightly_job_scores_dpam_through_the_registry(tmp_path, weights, s3_server):
    livec = {e["image"]: e["score"] for e in GOLDEN["scores"] if e["trained_on"] == "livec"}
    images = tmp_path / "bucket" / "images"
    images.mkdir(parents=True)
    for name in ("astronaut.png", "coffee.png", "chelsea.png"):
        shutil.copy(SKIMAGE_DATA / name, images / name)
    (images / "corrupt.jpg").write_bytes((SKIMAGE_DATA / "rocket.jpg").read_bytes()[:2000])
    output = tmp_path / "out"
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    try:
        summary = run_job(JobConfig(manifest=str(images), output=str(output), weights=str(weights), model="dpam",
                                    batch_size=2, log_every_s=0, run_date="2026-12-02"))
    finally:
        ray.shutdown()
    assert summary["model"] == "dpam" and summary["model_id"] == f"dpam@{GOLDEN['weights']['sha256']}"
    assert "min-max" in summary["score_scale"]
    rows = {r["uri"].rsplit("/", 1)[1]: r for r in pads.dataset(output, partitioning="hive").to_table().to_pylist()}
    assert rows.pop("corrupt.jpg")["status"] == "error"
    assert set(rows) == {"astronaut.png", "coffee.png", "chelsea.png"}
    for name, row in rows.items():
        assert row["status"] == "ok" and row["scorer"] == "dpam" and row["aux_model"] is None
        assert row["score"] == pytest.approx(livec[name], abs=JOB_TOLERANCE), name
