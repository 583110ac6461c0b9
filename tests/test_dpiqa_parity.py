"""DP-IQA scores equal the authors' code's, through ``dgiqa score`` and through the nightly job.

The numbers in tests/data/dpiqa_published_scores.json were computed by the published code (RomGai/DP-IQA) run
beside this project, with the small ``tiny`` configuration, on seeded random weights and prompt features that
``write_random_dpiqa`` and ``write_random_prompts`` regenerate here; the file says how. The authors' latent is
an unseeded draw; their run was seeded with ``torch.manual_seed(0)`` before each image's pass, which is the draw
this project makes for every image (``pipeline.scoring.diffusion_prior``). The photographs' scores lie at least
0.04 apart, four thousand times the tolerance, and another seed moves a score by about 0.02, so a mix-up of
images, a wrong noise or a wrong prompt input cannot hide under it.
"""

import hashlib
import json
import shutil
from itertools import combinations

import pyarrow.dataset as pads
import pytest
import ray

from pipeline.batch.job import JobConfig, run_job
from pipeline.cli import main
from pipeline.scoring.sample import write_random_dpiqa, write_random_prompts
from tests.conftest import DATA, SKIMAGE_DATA, assert_regenerated

GOLDEN = json.loads((DATA / "dpiqa_published_scores.json").read_text())
TOLERANCE = GOLDEN["tolerance"]  # 1e-5: float32 on the CPU, one image per pass as the authors run it
JOB_TOLERANCE = 1e-4  # the job's actor passes two images at once, which reorders some sums


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dpiqa")
    weights = write_random_dpiqa(folder / "dpiqa_random.safetensors")
    assert_regenerated(weights, GOLDEN["weights"]["sha256"], "dpiqa_tiny")
    prompts = write_random_prompts(folder / "prompts.pth", count=495, dim=32)
    assert hashlib.sha256(prompts.read_bytes()).hexdigest() == GOLDEN["prompts"]["sha256"]
    return {"weights": weights, "prompts": prompts, "folder": folder}


def _path(entry: dict) -> str:
    return str((DATA if entry["source"] == "tests/data" else SKIMAGE_DATA) / entry["image"])


def _score(capsys, sources, paths: list[str], *flags: str, prompts=None) -> list[dict]:
    capsys.readouterr()
    assert main(["score", *paths, "--model", "dpiqa", "--weights", str(sources["weights"]), "--device", "cpu",
                 "--json", "--prompt-embeddings", str(prompts or sources["prompts"]),
                 "--allow-prefix", str(SKIMAGE_DATA), "--allow-prefix", str(DATA), *flags]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_dgiqa_score_gives_the_authors_scores(capsys, sources):
    expected = GOLDEN["scores"]
    rows = _score(capsys, sources, [_path(e) for e in expected])
    prompts_sha = GOLDEN["prompts"]["sha256"]
    for entry, row in zip(expected, rows, strict=True):
        assert row["status"] == "ok" and row["num_crops"] == 1 and row["score_std"] is None
        assert row["model_id"] == f"dpiqa@{GOLDEN['weights']['sha256']}+prompts@{prompts_sha}"
        assert row["score"] == pytest.approx(entry["score"], abs=TOLERANCE), entry
    assert all(abs(a["score"] - b["score"]) > 10 * TOLERANCE for a, b in combinations(expected, 2))
    # Another seed moves every score by far more than the tolerance: the seeded draw is what matched above.
    for entry, spread in zip(expected, GOLDEN["unseeded_spread"], strict=True):
        assert min(abs(s - entry["score"]) for s in spread["scores"]) > 10 * TOLERANCE


def test_the_latent_mean_option_is_deterministic_and_differs_from_the_draw(capsys, sources):
    expected = GOLDEN["scores"][:2]
    paths = [_path(e) for e in expected]
    mean = _score(capsys, sources, paths, "--latent", "mean")
    again = _score(capsys, sources, paths[::-1], "--latent", "mean")[::-1]
    for entry, row, repeat in zip(expected, mean, again, strict=True):
        assert row["score"] == repeat["score"]
        assert abs(row["score"] - entry["score"]) > 10 * TOLERANCE


def test_the_prompt_features_count(capsys, sources):
    """Another prompt file moves the scores: the prompts reach the U-Net's cross attention."""
    other = write_random_prompts(sources["folder"] / "other.pth", seed=1, count=495, dim=32)
    [row] = _score(capsys, sources, [_path(GOLDEN["scores"][0])], prompts=other)
    assert abs(row["score"] - GOLDEN["scores"][0]["score"]) > 10 * TOLERANCE
    assert row["model_id"].endswith("+prompts@" + hashlib.sha256(other.read_bytes()).hexdigest())


def test_without_or_with_both_prompt_sources_it_is_a_one_line_error(capsys, sources):
    base = ["score", _path(GOLDEN["scores"][0]), "--model", "dpiqa", "--weights", str(sources["weights"]),
            "--allow-prefix", str(SKIMAGE_DATA)]
    for extra in ([], ["--prompt-embeddings", str(sources["prompts"]), "--clip-text", str(sources["folder"])]):
        capsys.readouterr()
        assert main(base + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].endswith("--model dpiqa needs exactly one of --prompt-embeddings or --clip-text")
        assert not any("Traceback" in line for line in err)
    capsys.readouterr()
    assert main(["score", _path(GOLDEN["scores"][0]), "--weights", "x", "--depth-weights", "y",
                 "--latent", "mean"]) == 2
    assert "--latent is not used by --model dgiqa" in capsys.readouterr().err


def test_prompt_features_of_another_width_are_a_one_line_error(capsys, sources):
    wide = write_random_prompts(sources["folder"] / "wide.pth", count=495, dim=768)
    capsys.readouterr()
    code = main(["score", _path(GOLDEN["scores"][0]), "--model", "dpiqa", "--weights", str(sources["weights"]),
                 "--prompt-embeddings", str(wide), "--allow-prefix", str(SKIMAGE_DATA)])
    err = capsys.readouterr().err
    assert code != 0 and "the prompt features do not fit these DP-IQA weights" in err and "Traceback" not in err


def test_the_nightly_job_scores_dpiqa_through_the_registry(tmp_path, sources):
    expected = {e["image"]: e["score"] for e in GOLDEN["scores"] if e["source"] == "skimage.data"}
    images = tmp_path / "bucket" / "images"
    images.mkdir(parents=True)
    for name in expected:
        shutil.copy(SKIMAGE_DATA / name, images / name)
    (images / "corrupt.jpg").write_bytes((SKIMAGE_DATA / "rocket.jpg").read_bytes()[:2000])
    output = tmp_path / "out"
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    try:
        summary = run_job(JobConfig(manifest=str(images), output=str(output), weights=str(sources["weights"]),
                                    model="dpiqa", prompt_embeddings=str(sources["prompts"]), batch_size=2,
                                    log_every_s=0, run_date="2026-12-03"))
    finally:
        ray.shutdown()
    prompts = f"prompts@{GOLDEN['prompts']['sha256']}"
    assert summary["model"] == "dpiqa" and summary["model_id"] == f"dpiqa@{GOLDEN['weights']['sha256']}+{prompts}"
    rows = {r["uri"].rsplit("/", 1)[1]: r for r in pads.dataset(output, partitioning="hive").to_table().to_pylist()}
    assert rows.pop("corrupt.jpg")["status"] == "error"
    assert set(rows) == set(expected)
    for name, row in rows.items():
        assert row["status"] == "ok" and row["scorer"] == "dpiqa" and row["aux_model"] == prompts
        assert row["score"] == pytest.approx(expected[name], abs=JOB_TOLERANCE), name
