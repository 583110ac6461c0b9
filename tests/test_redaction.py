"""Secrets given to the nightly job appear in no log line, summary or output file; its log says what matters.

The job runs for real (``jobs/score_bucket.py`` in a process of its own, its own local Ray, the moto S3 server)
with a presigned manifest URL. Its standard output and error (the driver's logs and the workers' logs Ray
forwards) and every byte it wrote are searched. (S3 credentials are checked the same way by
``tests/test_job_submit.py``.)
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import boto3
import pyarrow.dataset as pads
import pytest
from botocore.config import Config

from tests.conftest import S3_ENV
from tests.test_faults import _jpeg

REPO = Path(__file__).resolve().parents[1]
FAST = ["--crops", "1", "--depth-input-size", "70", "--batch-size", "2", "--log-every", "0",
        "--run-date", "2026-12-01"]


def _bucket(endpoint: str) -> boto3.client:
    client = boto3.client("s3", endpoint_url=endpoint, config=Config(signature_version="s3v4"),
                          region_name="us-east-1")
    client.create_bucket(Bucket="lib")
    for i in range(3):
        client.put_object(Bucket="lib", Key=f"img/{i}.jpg", Body=_jpeg(i))
    client.put_object(Bucket="lib", Key="img/broken.jpg", Body=b"<html>not an image</html>")
    rows = [f"s3://lib/img/{i}.jpg" for i in range(3)] + ["s3://lib/img/broken.jpg", "s3://lib/img/missing.jpg"]
    client.put_object(Bucket="lib", Key="manifest.csv", Body=("uri\n" + "\n".join(rows) + "\n").encode())
    return client


def _run(args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "jobs" / "score_bucket.py"), *args, *FAST], env=env,
                          capture_output=True, text=True, timeout=600)


def _assert_nowhere(secrets: list[str], proc: subprocess.CompletedProcess, output: Path) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert summary["status_counts"] == {"ok": 3, "error": 2, "rejected": 0}  # the run did read and write
    files = [p for p in output.rglob("*") if p.is_file()]
    assert any(p.name.startswith("_summary-") for p in files) and any(p.suffix == ".parquet" for p in files)
    for secret in secrets:
        assert secret not in proc.stdout and secret not in proc.stderr, secret
        for path in files:
            assert secret.encode() not in path.read_bytes(), (secret, path)
    rows = pads.dataset(str(output), format="parquet", partitioning="hive").to_table().to_pylist()
    assert {r["status"] for r in rows} == {"ok", "error"}  # error rows were written, and they hold no secret


def _assert_quiet(log: str) -> None:
    """A successful run's log: the plan, progress and summary lines, without Ray's notices that ask nothing.

    Outside a terminal Ray Data would print a ten-line progress block every ten seconds; Ray would warn that
    token authentication is on; ``ray_remote_args_fn`` would raise a deprecation warning.
    """
    for noise in ("Total Progress", "Token authentication is enabled", "Progress bars disabled", "Deprecat"):
        assert noise not in log, noise
    assert "planned in" in log and "scored 5/5 images (100%)" in log and " done: " in log
    job_lines = [line for line in log.splitlines() if (" pipeline." in line or " score_bucket:" in line)
                 and " scored " not in line]  # progress lines: one a batch here (--log-every 0)
    assert len(job_lines) <= 8, job_lines


@pytest.fixture()
def job_env(s3_server, s3):
    """The environment of a job process: its own local Ray, the test server as every S3 client's endpoint."""
    return {**os.environ, **S3_ENV, "RAY_ADDRESS": "local", "PYTHONUNBUFFERED": "1",
            "AWS_ENDPOINT_URL_S3": s3_server, "AWS_DEFAULT_REGION": "us-east-1"}


def test_a_presigned_manifest_url_leaks_nowhere(s3_server, job_env, checkpoints, tmp_path):
    client = _bucket(s3_server)
    url = client.generate_presigned_url("get_object", Params={"Bucket": "lib", "Key": "manifest.csv"},
                                        ExpiresIn=3600)
    signature = url.split("X-Amz-Signature=")[1].split("&")[0]
    credential = url.split("X-Amz-Credential=")[1].split("&")[0]
    assert len(signature) == 64
    output = tmp_path / "out"
    proc = _run(["--manifest", url, "--output", str(output), "--allow-prefix", "s3://lib/img/",
                 "--weights", str(checkpoints["dgiqa"]), "--depth-weights", str(checkpoints["depth"])], job_env)
    _assert_nowhere([signature, credential], proc, output)
    _assert_quiet(proc.stderr)
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert summary["manifest"].endswith("X-Amz-Signature=***") and "X-Amz-Credential=***" in summary["manifest"]

