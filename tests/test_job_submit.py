"""The real submission path: a local Ray head, ``ray job submit --working-dir``, Parquet read back."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.dataset as pads
import pytest

from tests.conftest import _free_port

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """``ray start --head`` on 127.0.0.1 with its job server (the dashboard) on a free port."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    gcs, dashboard = _free_port(), _free_port()
    temp_dir = tmp_path_factory.mktemp("ray")
    subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)
    start = subprocess.run([RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}",
                            "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--num-cpus=2",
                            "--include-dashboard=true", f"--temp-dir={temp_dir}", "--disable-usage-stats"],
                           env=env, capture_output=True, text=True, timeout=300)
    assert start.returncode == 0, start.stdout + start.stderr
    try:
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)


@pytest.mark.slow
def test_ray_job_submit_scores_full_size_images(ray_head, checkpoints, photo_paths, tmp_path):
    """Full-size architecture (518 px depth input, DGIQA on 224 px crops) on two images, submitted for real."""
    address, env = ray_head
    bucket = tmp_path / "bucket"
    bucket.mkdir()
    for path in photo_paths[:2]:
        shutil.copy(path, bucket / path.name)
    (bucket / "manifest.csv").write_text("uri\n" + "".join(f"{p.name}\n" for p in photo_paths[:2]))
    output = tmp_path / "scores"
    proc = subprocess.run(
        [RAY, "job", "submit", "--address", address, "--working-dir", str(REPO), "--",
         "python", "jobs/score_bucket.py", "--manifest", str(bucket / "manifest.csv"), "--output", str(output),
         "--weights", str(checkpoints["dgiqa"]), "--depth-weights", str(checkpoints["depth"]),
         "--crops", "2", "--run-date", "2026-11-22"],
        env=env, capture_output=True, text=True, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log
    assert "succeeded" in log
    assert '"ok": 2' in log  # the run summary, printed by the job
    table = pads.dataset(str(output), format="parquet", partitioning="hive").to_table()
    assert table.num_rows == 2
    assert set(table.column("status").to_pylist()) == {"ok"}
    assert set(table.column("run_date").to_pylist()) == {"2026-11-22"}
    assert all(0 < s < 1 for s in table.column("score").to_pylist())
    assert set(table.column("num_crops").to_pylist()) == {2}
