"""The real submission path: a local Ray head, ``ray job submit --working-dir``, Parquet read back."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pytest

from tests.conftest import S3_ENV, _free_port
from tests.processes import stop_process_tree

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory, s3_server):
    """``ray start --head --block`` on 127.0.0.1, in a process group of its own, on ports no other Ray holds.

    The ports Ray would otherwise take at fixed numbers (GCS 6379, dashboard 8265, client server 10001, dashboard
    agent 52365, workers 10002-19999) are free ports or ports the OS picks, so another Ray on the machine is
    neither disturbed nor in the way. Ready when the job server answers; stopped by signalling its own process
    group and the processes it spawned, never by ``ray stop`` (which stops every Ray on the host).

    Started after the S3 server, so the cluster's processes find the (fake) credentials in their environment,
    as nodes of a real cluster find their instance role.
    """
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    gcs, dashboard, client, agent = (_free_port() for _ in range(4))
    # A short folder under /tmp: Ray's dashboard binds Unix sockets in it, whose paths may not exceed 107 bytes,
    # and pytest's own folders (with xdist's popen-gwN level) are longer than that.
    temp_dir = Path(tempfile.mkdtemp(prefix="rayh", dir="/tmp"))
    log = (temp_dir / "head.log").open("wb")
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--ray-client-server-port={client}",
         f"--dashboard-agent-listen-port={agent}", "--min-worker-port=0", "--max-worker-port=0", "--num-cpus=2",
         "--include-dashboard=true", f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        _wait_for_job_server(head, address, temp_dir / "head.log")
        yield address, env
    finally:
        stop_process_tree(head)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _wait_for_job_server(head: subprocess.Popen, address: str, log: Path, timeout_s: float = 600) -> None:
    """Return once the head's job server answers; fail at once, with the head's output, if the head exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert head.poll() is None, f"ray start exited with {head.returncode}:\n{log.read_text()[-5000:]}"
        try:
            with urllib.request.urlopen(f"{address}/api/version", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"the job server at {address} did not answer in {timeout_s:.0f}s:\n"
                         f"{log.read_text()[-5000:]}")


@pytest.mark.slow
def test_ray_job_submit_scores_full_size_images_from_s3(ray_head, s3, checkpoints, photo_paths):
    """Full-size architecture (518 px depth input, DGIQA on 224 px crops) on two images, submitted for real."""
    address, env = ray_head
    fs, options = s3
    fs.mkdir("library")
    for path in photo_paths[:2]:
        fs.pipe(f"library/photos/{path.name}", path.read_bytes())
    fs.pipe("library/manifest.csv", ("uri,album\n" + "".join(f"photos/{p.name},demo\n" for p in photo_paths[:2])
                                     + "s3://elsewhere/x.jpg,hostile\n").encode())
    proc = subprocess.run(
        [RAY, "job", "submit", "--address", address, "--working-dir", str(REPO), "--",
         "python", "jobs/score_bucket.py", "--manifest", "s3://library/manifest.csv", "--output",
         "s3://library/scores", "--weights", str(checkpoints["dgiqa"]), "--depth-weights", str(checkpoints["depth"]),
         "--crops", "2", "--run-date", "2026-11-22", "--storage-options", json.dumps(options)],
        env=env, capture_output=True, text=True, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log
    assert "succeeded" in log
    assert '"ok": 2' in log and '"rejected": 1' in log  # the run summary, printed by the job
    assert "scored 2/2 images" in log  # the progress line
    handler = pafs.PyFileSystem(pafs.FSSpecHandler(fs))
    table = pads.dataset("library/scores", filesystem=handler, format="parquet", partitioning="hive").to_table()
    assert table.num_rows == 3
    ok = table.filter(pc.field("status") == "ok")
    assert ok.num_rows == 2 and set(ok.column("album").to_pylist()) == {"demo"}
    assert set(table.column("run_date").to_pylist()) == {"2026-11-22"}
    assert all(0 < s < 1 for s in ok.column("score").to_pylist())
    assert set(ok.column("num_crops").to_pylist()) == {2}
    # Credentials never reach logs or outputs.
    secret = S3_ENV["AWS_SECRET_ACCESS_KEY"]
    assert secret not in log
    for path in fs.find("library/scores"):
        assert secret.encode() not in fs.cat(path)


@pytest.mark.slow
def test_ray_job_submit_fine_tunes_with_ray_train(ray_head, checkpoints, tmp_path):
    """``jobs/train.py`` submitted for real: Ray Train's workers import ``pipeline`` from the working dir."""
    from tests.training.test_train import write_distortion_set

    address, env = ray_head
    labels = write_distortion_set(tmp_path / "ratings")
    labels.write_text("\n".join(labels.read_text().splitlines()[:13]) + "\n")  # 12 images, 4 levels
    output = tmp_path / "run"
    proc = subprocess.run(
        [RAY, "job", "submit", "--address", address, "--working-dir", str(REPO), "--",
         "python", "jobs/train.py", str(labels), "--images-prefix", str(labels.parent), "--output",
         str(output), "--init", f"dgiqa:{checkpoints['dgiqa']}", "--depth-weights", str(checkpoints["depth"]),
         "--depth-input-size", "70", "--epochs", "1", "--batch-size", "4", "--consistency-weight", "0",
         "--val-crops", "1", "--val-fraction", "0.3", "--freeze-backbones", "--freeze-bn", "--loader-workers", "0",
         "--cpus-per-worker", "1", "--no-baseline"],
        env=env, capture_output=True, text=True, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    assert "succeeded" in log and '"epochs_done": 1' in log
    metrics = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in metrics] == [1] and metrics[0]["train_crops"] == 8
    assert (output / "best.pth").stat().st_size > 0 and (labels.parent / "depth_cache").is_dir()
