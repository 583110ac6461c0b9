"""Shared fixtures: random-weight checkpoints, real photographs and generated images. No network."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import skimage

from pipeline.scoring.preprocess import PreprocessConfig
from pipeline.scoring.sample import depth_random_name, write_random_depth_anything, write_random_dgiqa
from pipeline.scoring.scorer import Scorer, ScorerConfig, make_scorer

DATA = Path(__file__).parent / "data"

# Two xdist workers on two cores start Ray clusters side by side with model-loading jobs: Ray's own start-up
# waits (GCS 30 s, dashboard 60 s) are too short for such a machine. Every Ray a test starts, in this process
# or in a subprocess that copies this environment, waits longer instead of failing to start.
os.environ.setdefault("RAY_gcs_server_port_wait_time_s", "180")
os.environ.setdefault("RAY_DASHBOARD_STARTUP_TIMEOUT_S", "300")
SKIMAGE_DATA = Path(os.path.dirname(skimage.__file__)) / "data"
# Real photographs shipped with scikit-image.
PHOTOS = ["astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "motorcycle_left.png"]

# Small depth inputs keep most tests fast; the full 518 px path has its own tests.
FAST = PreprocessConfig(num_crops=2, depth_input_size=70)


# The longest modules, started first: the suite runs on two xdist workers one module at a time
# (``--dist loadfile``, pyproject.toml), and a long module picked up last would leave one worker idle at the end.
RUN_FIRST = ("tests/training/test_train.py", "tests/test_faults.py", "tests/test_job_submit.py")


def weights_fingerprint(path: Path) -> dict[str, list[float]]:
    """Per tensor of a safetensors file: its float64 sum and its dot product with a fixed random sign pattern.

    A file made with another seed, another calibration or another key differs in every tensor by far more
    than ``assert_regenerated`` allows; the last-bit differences of timm's truncated-normal initialisation
    between instruction sets (see there) move these numbers by about 1e-7 of their size.
    """
    import numpy as np
    from safetensors.numpy import load_file

    out = {}
    for key, value in sorted(load_file(str(path)).items()):
        flat = value.astype(np.float64).ravel()
        signs = np.random.default_rng(len(flat)).integers(0, 2, len(flat)) * 2 - 1
        out[key] = [float(flat.sum()), float(flat @ signs)]
    return out


def assert_regenerated(path: Path, sha256: str, fingerprint_name: str) -> None:
    """``path`` is the recorded file: the same bytes, or where the init's kernels differ, the same weights.

    The random test weights come from seeded PyTorch initialisation, and timm's truncated-normal init (Swin,
    ViT, DINOv2) gives last-bit differences from one instruction set to another (measured on one machine: the
    DGIQA file changes with ``ATEN_CPU_CAPABILITY=default`` or ``MKL_CBWR=AVX2``), so the SHA-256 recorded
    beside the published numbers holds on machines of the recording one's kind. Elsewhere the per-tensor
    fingerprints in ``random_weights_fingerprints.json`` must agree within 1e-5 of each tensor's size.
    """
    import hashlib
    import json
    import math

    if hashlib.sha256(path.read_bytes()).hexdigest() == sha256:
        return
    recorded = json.loads((DATA / "random_weights_fingerprints.json").read_text())["files"][fingerprint_name]
    got = weights_fingerprint(path)
    assert got.keys() == recorded.keys()
    for key, (total, projection) in got.items():
        scale = max(abs(recorded[key][0]), abs(recorded[key][1]), 1.0)
        assert math.isclose(total, recorded[key][0], rel_tol=0, abs_tol=1e-5 * scale), key
        assert math.isclose(projection, recorded[key][1], rel_tol=0, abs_tol=1e-5 * scale), key


def pytest_collection_modifyitems(config, items) -> None:
    """Move the ``RUN_FIRST`` modules to the front, longest first; the rest keep pytest's order (a stable sort)."""
    items.sort(key=lambda item: RUN_FIRST.index(path) if (path := item.nodeid.split("::")[0]) in RUN_FIRST
               else len(RUN_FIRST))


def read_layout(name: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """A published checkpoint layout: key -> (shape, dtype)."""
    layout = {}
    for line in (DATA / f"{name}_checkpoint_layout.tsv").read_text().splitlines()[1:]:
        key, shape, dtype = line.split("\t")
        dims = shape.strip("()").replace(" ", "").split(",")
        layout[key] = (tuple(int(d) for d in dims if d), dtype)
    return layout


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("weights")
    return {
        "dgiqa": write_random_dgiqa(folder / "dgiqa_random.safetensors"),
        "depth": write_random_depth_anything(folder / depth_random_name("vits")),
    }


@pytest.fixture(scope="session")
def dpiqa_student(tmp_path_factory) -> Path:
    """Random DP-IQA student weights (written once: EfficientNet-B7 is large)."""
    from pipeline.scoring.sample import write_random_dpiqa_student

    return write_random_dpiqa_student(tmp_path_factory.mktemp("dpiqa") / "student.safetensors")


@pytest.fixture(scope="session")
def fast_scorer(checkpoints) -> Scorer:
    """DGIQA at the tests' fast settings, made as the job's actors make it (``make_scorer``)."""
    return make_scorer(ScorerConfig(weights=str(checkpoints["dgiqa"]), depth_weights=str(checkpoints["depth"]),
                                    device="cpu", preprocess=FAST))


@pytest.fixture(scope="session")
def photo_paths() -> list[Path]:
    paths = [SKIMAGE_DATA / name for name in PHOTOS]
    missing = [p for p in paths if not p.exists()]
    assert not missing, f"scikit-image photographs missing: {missing}"
    return paths


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """An S3 server on 127.0.0.1 (moto's server mode, as s3fs's own tests use); yields its endpoint URL.

    Credentials are fake and set in the environment, where fsspec (and Ray workers started later) read them.
    """
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    saved = {k: os.environ.get(k) for k in S3_ENV}
    os.environ.update(S3_ENV)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


S3_ENV = {"AWS_ACCESS_KEY_ID": "testing-key-id", "AWS_SECRET_ACCESS_KEY": "testing-secret-value",
          "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


@pytest.fixture()
def s3(s3_server):
    """A fresh s3fs filesystem on the test server, and its storage options; buckets are emptied afterwards."""
    import s3fs

    options = {"client_kwargs": {"endpoint_url": s3_server}}
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem(**options)
    yield fs, options
    for bucket in fs.ls(""):
        fs.rm(bucket, recursive=True)
    fs.invalidate_cache()


@contextlib.contextmanager
def local_ray_without_auth(num_cpus: int = 2) -> Iterator[None]:
    """A Ray of the test's own on 127.0.0.1 (``address="local"``: never someone else's cluster), token
    authentication off for it only (a test head on the loopback), stopped and the setting restored afterwards.

    Start it after the S3 server when the test reads from S3: Ray's workers inherit the credentials then.
    """
    import ray

    saved = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
             _node_ip_address="127.0.0.1")
    try:
        yield
    finally:
        ray.shutdown()
        if saved is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = saved
