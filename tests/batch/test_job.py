"""The scoring job end to end on a local Ray: local folders and an S3 server on 127.0.0.1 as the bucket."""

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pytest
import ray

from pipeline.batch.job import JobConfig, run_job
from pipeline.batch.output import RESULT_SCHEMA
from pipeline.scoring.preprocess import PreprocessConfig
from pipeline.scoring.sample import write_random_dgiqa
from pipeline.scoring.scorer import Scorer, ScorerConfig

REPO = Path(__file__).resolve().parents[2]
FAST_JOB = {"crops": 1, "depth_input_size": 70, "batch_size": 2, "log_every_s": 0}
# A job row's score against the same image scored alone: both run fp32 on the CPU and differ by rounding only, but
# the job's actor puts several images' crops into one forward pass, which reorders sums (measured: 1.5e-5).
PAIRING_TOLERANCE = 1e-4


@pytest.fixture(scope="module", autouse=True)
def local_ray(s3_server):
    # After the S3 server: Ray's workers find the (fake) credentials in their environment, as a real
    # cluster's nodes find their instance role.
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             _node_ip_address="127.0.0.1")
    yield
    ray.shutdown()


@pytest.fixture()
def bucket(tmp_path, photo_paths):
    """A local folder playing the bucket: three real photographs and a corrupt file."""
    images = tmp_path / "bucket" / "images"
    images.mkdir(parents=True)
    for path in photo_paths[:3]:
        shutil.copy(path, images / path.name)
    (images / "corrupt.jpg").write_bytes(photo_paths[3].read_bytes()[:2000])
    return tmp_path / "bucket"


@pytest.fixture(scope="module")
def direct_scorer(checkpoints) -> Scorer:
    """The CLI's scorer with the job's settings (1 crop, 70 px depth input), built here rather than by the job.

    It scores one image at a time in this process, where the job decodes in Ray tasks, batches images in an actor
    and writes rows through Parquet: a row paired with the wrong image shows as a score that is off.
    """
    config = ScorerConfig(weights=str(checkpoints["dgiqa"]), depth_weights=str(checkpoints["depth"]), device="cpu",
                          preprocess=PreprocessConfig(num_crops=1, depth_input_size=70))
    return Scorer(config)


def _assert_each_row_scores_its_own_image(rows: dict[str, float], images: dict[str, bytes],
                                          scorer: Scorer) -> None:
    """Each row's score is its image's direct score, and the images' scores lie far apart, so a swap would show."""
    assert sorted(rows) == sorted(images)
    direct = {uri: scorer.score_bytes(data).score for uri, data in images.items()}
    for uri, score in rows.items():
        assert score == pytest.approx(direct[uri], abs=PAIRING_TOLERANCE), uri
    values = sorted(direct.values())
    closest = min(b - a for a, b in zip(values, values[1:], strict=False))
    assert closest > 20 * PAIRING_TOLERANCE, direct


def _read(output) -> pa.Table:
    return pads.dataset(str(output), format="parquet", partitioning="hive").to_table()


def _job(checkpoints, manifest, output, **kw) -> JobConfig:
    weights = {"weights": str(checkpoints["dgiqa"]), "depth_weights": str(checkpoints["depth"])}
    return JobConfig(manifest=str(manifest), output=str(output), **{**weights, **FAST_JOB, **kw})


def test_every_actor_gets_the_jobs_model_options():
    config = JobConfig(manifest="m.csv", output="out", weights="w.pth", depth_weights="d.pth", crops=3,
                       precision="bf16", attention="math", draft_decode=True, max_pixels=1000)
    scorer = config.scorer_config()
    assert (scorer.precision, scorer.attention, scorer.compile) == ("bf16", "math", False)
    assert (scorer.preprocess.num_crops, scorer.preprocess.draft, scorer.preprocess.max_pixels) == (3, True, 1000)
    with pytest.raises(ValueError, match="attention must be one of"):
        JobConfig(manifest="m.csv", output="out", weights="w.pth", depth_weights="d.pth",
                  attention="flash").scorer_config()


def _key(config: JobConfig | None = None, **kw) -> str:
    """The job's run key for a fixed manifest, plan and model_id; of ``config``, or of JobConfig fields ``kw``."""
    from types import SimpleNamespace

    from pipeline.batch.job import _run_key

    config = config or JobConfig(**{"manifest": "s3://b/manifest.csv", "output": "out", "weights": "w.pth", **kw})
    reader = SimpleNamespace(source="s3://b/manifest.csv", files=[("s3://b/manifest.csv", "etag-1")])
    return _run_key(config, reader, "some-model@sha", "2026-11-21", SimpleNamespace(fingerprint="f" * 16))


def test_dgiqa_run_keys_are_those_of_earlier_versions():
    # Computed with the run key of commit 11faf7c, before options were declared per scorer: DGIQA runs staged by
    # it resume after the upgrade.
    assert _key(depth_weights="d.pth") == "ee4223c157b8-c0b6b05c4a09"
    assert _key(depth_weights="d.pth", crops=3, depth_input_size=70, draft_decode=True, encoder="vits",
                depth_version="v2") == "77a9f70d48c6-c0b6b05c4a09"


def test_dgiqa_options_that_change_rows_change_the_run_key():
    keys = {_key(depth_weights="d.pth"), _key(depth_weights="d.pth", crops=3),
            _key(depth_weights="d.pth", depth_input_size=70), _key(depth_weights="d.pth", draft_decode=True),
            _key(depth_weights="d.pth", decode="gpu")}
    assert len(keys) == 5


def test_the_students_run_key_ignores_dgiqa_options_and_names_its_exif_option():
    student = JobConfig(manifest="s3://b/manifest.csv", output="out", weights="w.pth", model="dpiqa-student")
    with pytest.raises(ValueError, match="--crops is not used by --model dpiqa-student"):
        JobConfig(manifest="m.csv", output="out", weights="w.pth", model="dpiqa-student", crops=3)
    # JobConfig refuses DGIQA's options for the student; were one set anyway (bypassing the check), the run key
    # would still not see it, as nothing reads it.
    for name, value in {"crops": 3, "depth_input_size": 70, "draft_decode": True, "encoder": "vits",
                        "depth_version": "v2", "depth_weights": "d.pth"}.items():
        forced = copy.copy(student)
        object.__setattr__(forced, name, value)
        assert _key(forced) == _key(student), name
    assert _key(model="dpiqa-student", exif_transpose=True) != _key(student)


def test_every_manifest_row_gives_one_row_with_the_right_status(checkpoints, bucket, tmp_path, direct_scorer):
    outside = tmp_path / "elsewhere.jpg"
    outside.write_bytes((bucket / "images" / "coffee.png").read_bytes())
    (bucket / "images" / "link.jpg").symlink_to(outside)  # inside the allowed folder, pointing out of it
    (bucket / "images" / "huge.jpg").write_bytes(os.urandom(3_000_000))  # over the job's max_bytes below
    shutil.copy(bucket / "images" / "chelsea.png", bucket / "images" / "stated.png")
    manifest = bucket / "manifest.csv"
    manifest.write_text("\n".join([
        "uri,label,size_bytes",
        "images/astronaut.png,person,",
        "images/coffee.png,food,",
        "images/chelsea.png,cat,",
        "images/missing.jpg,none,",
        "images/corrupt.jpg,broken,",
        f"{outside},outside,",
        "file:///etc/passwd,hostile,",
        "http://169.254.169.254/latest/meta-data/,hostile,",
        "images/link.jpg,link,",
        "images/huge.jpg,huge,",
        "images/stated.png,stated,5000000000",  # the manifest says 5 GB: refused unread
    ]) + "\n")
    output = tmp_path / "out"
    summary = run_job(_job(checkpoints, manifest, output, run_date="2026-11-20", max_bytes=2_000_000))

    table = _read(output)
    assert table.num_rows == 11 == summary["rows_written"]
    assert table.schema.names[:len(RESULT_SCHEMA)] == RESULT_SCHEMA.names
    rows = {r["label"] if r["label"] != "hostile" else r["uri"]: r for r in table.to_pylist()}
    for label in ("person", "food", "cat"):
        assert rows[label]["status"] == "ok" and 0 < rows[label]["score"] < 1 and rows[label]["error"] is None
        assert rows[label]["num_crops"] == 1 and rows[label]["width"] > 0
        assert rows[label]["uri"].startswith(f"file://{bucket}/images/")
        assert rows[label]["run_date"] == "2026-11-20" and rows[label]["model_id"].startswith("dgiqa@")
    assert rows["none"]["status"] == "error" and "not found" in rows["none"]["error"]
    assert rows["broken"]["status"] == "error" and "truncated or corrupt" in rows["broken"]["error"]
    for key in ("outside", "file:///etc/passwd", "http://169.254.169.254/latest/meta-data/"):
        assert rows[key]["status"] == "rejected" and "outside the allowed prefixes" in rows[key]["error"]
        assert rows[key]["score"] is None
    assert rows["link"]["status"] == "rejected" and "link that leads outside" in rows["link"]["error"]
    assert rows["huge"]["status"] == "error" and "over the limit of 2000000 bytes" in rows["huge"]["error"]
    assert rows["stated"]["status"] == "error" and "is 5000000000 bytes" in rows["stated"]["error"]
    assert summary["status_counts"] == {"ok": 3, "error": 4, "rejected": 4}
    # Three images in batches of two: rows of one batch swapped, or a batch's scores shifted, fail here.
    _assert_each_row_scores_its_own_image(
        {rows[label]["uri"]: rows[label]["score"] for label in ("person", "food", "cat")},
        {f"file://{bucket}/images/{name}": (bucket / "images" / name).read_bytes()
         for name in ("astronaut.png", "coffee.png", "chelsea.png")}, direct_scorer)
    # Reading and decoding ran as CPU tasks of their own, not fused into the scoring actor (on this 2-core
    # machine both ask for one CPU, which is when Ray would fuse them).
    actor_ops = [op for op in summary["ray_operators"] if "ScoreActor" in op]
    assert actor_ops == ["MapBatches(ScoreActor)"], summary["ray_operators"]
    assert "MapBatches(prepare_plan_files)" in summary["ray_operators"]
    # An ordinary reader: partition column, filter on score.
    good = pads.dataset(str(output), format="parquet", partitioning="hive").to_table(
        filter=(pc.field("score") > 0) & (pc.field("run_date") == "2026-11-20"))
    assert good.num_rows == 3
    summary_file = output / "run_date=2026-11-20" / f"_summary-{summary['run_id'].removeprefix('2026-11-20-')}.json"
    assert summary["summary_path"] == str(summary_file)
    assert json.loads(summary_file.read_text())["status_counts"] == summary["status_counts"]
    assert not (output / "_staging").exists()
    assert [p.name for p in (output / "run_date=2026-11-20").iterdir() if not p.name.startswith("_")] == [
        f"part-{summary['run_id'].removeprefix('2026-11-20-')}.parquet"]


def test_incremental_runs_score_only_what_is_new_or_changed(checkpoints, bucket, tmp_path):
    manifest = bucket / "manifest.csv"
    rows = ["uri,etag", "images/astronaut.png,v1", "images/coffee.png,v1"]
    manifest.write_text("\n".join(rows) + "\n")
    output = tmp_path / "out"
    first = run_job(_job(checkpoints, manifest, output, run_date="2026-11-20"))
    assert first["status_counts"]["ok"] == 2

    again = run_job(_job(checkpoints, manifest, output, run_date="2026-11-21"))
    assert again["skipped_done_before"] == 2 and again["rows_written"] == 0

    manifest.write_text("\n".join(["uri,etag", "images/astronaut.png,v1", "images/coffee.png,v2",
                                   "images/chelsea.png,v1"]) + "\n")
    changed = run_job(_job(checkpoints, manifest, output, run_date="2026-11-21"))
    assert changed["skipped_done_before"] == 1 and changed["rows_written"] == 2
    table = _read(output).filter(pc.field("run_date") == "2026-11-21")
    assert sorted(table.column("uri").to_pylist()) == [f"file://{bucket}/images/{n}" for n in
                                                       ("chelsea.png", "coffee.png")]

    # Same run date again: rows of today's earlier run count as scored too.
    assert run_job(_job(checkpoints, manifest, output, run_date="2026-11-21"))["rows_written"] == 0

    other_weights = write_random_dgiqa(tmp_path / "other.safetensors", seed=1)
    rescored = run_job(_job(checkpoints, manifest, output, run_date="2026-11-22", weights=str(other_weights)))
    assert rescored["skipped_done_before"] == 0 and rescored["rows_written"] == 3

    # Another crop count makes other scores: named in model_id, so the night scores again and keeps both.
    recropped = run_job(_job(checkpoints, manifest, output, run_date="2026-11-22", crops=3))
    assert recropped["skipped_done_before"] == 0 and recropped["rows_written"] == 3
    assert recropped["model_id"].endswith("+crops=3,depth-input-size=70")
    assert run_job(_job(checkpoints, manifest, output, run_date="2026-11-23", crops=3))["skipped_done_before"] == 3

    full = run_job(_job(checkpoints, manifest, output, run_date="2026-11-22", incremental=False))
    assert full["rows_written"] == 3
    # --full scores everything again, but a rerun of the same night never writes a row twice.
    assert run_job(_job(checkpoints, manifest, output, run_date="2026-11-22", incremental=False))["rows_written"] == 0
    table = _read(output)
    per_night = table.group_by(["run_date", "model_id", "uri"]).aggregate([("uri", "count")])
    assert set(per_night.column("uri_count").to_pylist()) == {1}


def test_s3_bucket_in_and_out(checkpoints, s3, photo_paths, direct_scorer):
    fs, options = s3
    fs.mkdir("photos")
    fs.mkdir("other")
    for path in photo_paths[:2]:
        fs.pipe(f"photos/library/{path.name}", path.read_bytes())
    fs.pipe("other/secret.jpg", photo_paths[2].read_bytes())
    fs.pipe("photos/manifests/nightly.jsonl", "\n".join(json.dumps(r) for r in [
        {"uri": f"library/{photo_paths[0].name}", "id": 1},
        {"uri": f"s3://photos/library/{photo_paths[1].name}", "id": 2},
        {"uri": "s3://other/secret.jpg", "id": 3},
        {"uri": "s3://photos/../other/secret.jpg", "id": 4},
    ]).encode())
    summary = run_job(JobConfig(manifest="s3://photos/manifests/nightly.jsonl", output="s3://photos/scores",
                                weights=str(checkpoints["dgiqa"]), depth_weights=str(checkpoints["depth"]),
                                storage_options=options, run_date="2026-11-22", **FAST_JOB))
    assert summary["status_counts"] == {"ok": 2, "error": 0, "rejected": 2}
    import pyarrow.fs as pafs

    table = pads.dataset("photos/scores", filesystem=pafs.PyFileSystem(pafs.FSSpecHandler(fs)),
                         format="parquet", partitioning="hive").to_table()
    by_id = {r["id"]: r for r in table.to_pylist()}
    assert sorted(by_id) == [1, 2, 3, 4]
    assert by_id[1]["uri"] == f"s3://photos/library/{photo_paths[0].name}" and by_id[1]["status"] == "ok"
    assert by_id[1]["size_bytes"] is None and 0 < by_id[2]["score"] < 1
    assert by_id[3]["status"] == by_id[4]["status"] == "rejected"
    assert not [p for p in fs.find("photos/scores") if "_staging" in p]
    _assert_each_row_scores_its_own_image(
        {by_id[i]["uri"]: by_id[i]["score"] for i in (1, 2)},
        {f"s3://photos/library/{path.name}": path.read_bytes() for path in photo_paths[:2]}, direct_scorer)


def test_a_one_cpu_cluster_shares_its_cpu_between_the_actor_and_the_decode_tasks(checkpoints, bucket, tmp_path):
    """An actor that held the only CPU left the decode tasks feeding it unscheduled, and the run never ended.

    A Ray of one CPU of its own, in a child process (this module's Ray has two); the timeout only guards the
    suite against that hang.
    """
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(f"uri\n{bucket}/images/astronaut.png\n{bucket}/images/corrupt.jpg\n")
    child = f"""
import json
from tests.conftest import local_ray_without_auth
from pipeline.batch.job import JobConfig, _cluster_plan, run_job
config = JobConfig(manifest={str(manifest)!r}, output={str(tmp_path / "out")!r}, weights={str(checkpoints["dgiqa"])!r},
                   depth_weights={str(checkpoints["depth"])!r}, crops=1, depth_input_size=70, batch_size=2,
                   log_every_s=0)
with local_ray_without_auth(num_cpus=1):
    plan = _cluster_plan(config)
    print(json.dumps({{"plan": plan, "counts": run_job(config)["status_counts"]}}))
"""
    # This module's Ray set token authentication in the environment; Ray reads it on import, before the child's
    # own (loopback, no authentication) starts, and its actors would then be refused.
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
    proc = subprocess.run([sys.executable, "-c", child], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["plan"] == [0.0, 0.5, [1, 1], 0.5]  # GPUs, actor CPUs, pool, decode task CPUs
    assert result["counts"] == {"ok": 1, "error": 1, "rejected": 0}


def test_cluster_without_gpus_scores_on_cpu_with_a_warning(caplog):
    from pipeline.batch.job import _cluster_plan

    config = JobConfig(manifest="m", output="o", weights="w", depth_weights="d")
    with caplog.at_level("WARNING"):
        gpus, cpus, actors, decode_cpus = _cluster_plan(config)
    assert gpus == 0 and actors == (1, 1) and cpus >= 1 and decode_cpus == 1  # this module's Ray has 2 CPUs
    assert "no GPUs" in caplog.text
    forced = JobConfig(manifest="m", output="o", weights="w", depth_weights="d", gpus_per_actor=0.5, actors=(2, 4))
    assert _cluster_plan(forced)[0] == 0.5 and _cluster_plan(forced)[2] == (2, 4)


@pytest.mark.slow
def test_the_dpiqa_student_runs_through_the_same_job(bucket, tmp_path, dpiqa_student):
    student = dpiqa_student
    output = tmp_path / "out"
    summary = run_job(JobConfig(manifest=str(bucket / "images"), output=str(output), weights=str(student),
                                model="dpiqa-student", batch_size=2, log_every_s=0, run_date="2026-11-21"))
    assert summary["model"] == "dpiqa-student" and "MOS" in summary["score_scale"]
    assert summary["model_id"].startswith("dpiqa-student@")
    rows = {r["uri"].rsplit("/", 1)[1]: r for r in _read(output).to_pylist()}
    assert rows["corrupt.jpg"]["status"] == "error"
    ok = [r for name, r in rows.items() if name != "corrupt.jpg"]
    assert len(ok) == 3 and all(r["status"] == "ok" and r["num_crops"] == 1 and r["score_std"] is None
                                and r["scorer"] == "dpiqa-student" and r["aux_model"] is None for r in ok)
    assert len({r["score"] for r in ok}) == 3
