"""The prepared GPU check (``bench/gpu_check.sh``) runs every kind of phase here, on the CPU, before a GPU is lent.

A GPU machine is lent for minutes, once: a crash in its last phase would waste the loan. The dry run is the same
code on tiny inputs, and the report's writer is checked to leave valid JSON whenever the run is killed.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from bench.gpu_check import write_json_atomic

REPO = Path(__file__).resolve().parents[1]
KINDS = {"env", "pytest", "setup", "decode", "forward", "score"}


def test_the_dry_run_records_every_phase_with_its_figures(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHONPATH": str(REPO), "PYTHON": sys.executable}
    # In its own process group, ended whole if it runs too long: killing bash alone on a timeout once left the
    # Python under it, and its decode workers, running (and holding 2.5 GB) long after the test had failed.
    proc = subprocess.Popen(["bash", "bench/gpu_check.sh", "--dry-run", "--workers", "2"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    log = (out / "gpu_check.log").read_text()
    assert "gpu_check: {'ok':" in log and (out / "pytest_gpu.log").exists()
    assert report["status"] == "complete" and report["dry_run"] is True
    phases = {row["phase"]: row for row in report["phases"]}
    assert all(row["status"] == "ok" for row in phases.values()), [r for r in phases.values() if r["status"] != "ok"]
    assert {row["kind"] for row in phases.values()} == KINDS
    assert set(phases["matmul_peak"]["peak_tflops"]) == {"fp32", "bf16"}
    assert all(v > 0 for v in phases["matmul_peak"]["peak_tflops"].values())
    assert phases["pytest_gpu"]["returncode"] == 0 and "skipped" in phases["pytest_gpu"]["summary"]
    sizes = report["plan"]["sizes"]
    for size in sizes:
        for decoder in ("pillow", "opencv", "prepare_bytes"):
            assert phases[f"decode_cpu_{decoder}_{size}"]["images_per_s"] > 0
        for batch in (1, 2):
            row = phases[f"decode_torchvision_cpu_b{batch}_{size}"]
            assert row["device"] == "cpu" and row["images_per_s"] > 0 and row["peak_gpu_mib"] is None
    assert set(phases["setup_vits"]["tflop_per_image"]) == set(sizes)
    expected = ["forward_vits_bf16_b1"]  # bf16 on a CPU is slow: forward passes only in a dry run
    expected += [f"forward_vits_fp32_b{b}" for b in (1, 2)]
    expected += [f"score_vits_fp32_b{b}_{size}" for b in (1, 2) for size in sizes]
    for name in expected:
        row = phases[name]
        assert row["images_per_s"] > 0 and row["achieved_tflops"] > 0 and row["fraction_of_peak"] > 0, row
        assert row["peak_gpu_mib"] is None and row["peak_rss_mib"] > 0 and row["planned_images"] >= 1, row
        if row["kind"] == "score":
            # Same weights, same images, fp32 on the CPU: the reference itself.
            tolerance = 1e-4 if row["precision"] == "fp32" else 0.5  # batch 2 vs 1: rounding
            assert 0 <= row["max_abs_score_delta_vs_cpu_fp32"] <= tolerance, row
    # --decode gpu with the CPU as the device: torchvision's decode and PyTorch's resizes against OpenCV's pixels.
    decoded = phases["score_decode_device_vits_fp32"]
    assert decoded["images"] == len(sizes) and decoded["images_per_s"] > 0, decoded
    assert set(decoded["max_abs_score_delta_by_size"]) == set(sizes)
    assert 0 < decoded["max_abs_score_delta_vs_cpu_fp32"] <= 1e-2, decoded


def test_a_budget_too_small_skips_phases_and_says_why(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHONPATH": str(REPO), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run", "--workers", "1", "--budget-s", "12"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    phases = json.loads((out / "gpu_check.json").read_text())["phases"]
    skipped = [row for row in phases if row["status"] == "skipped"]
    assert phases[0]["status"] == "ok" and skipped and all("budget" in row["reason"] for row in skipped)


def test_the_report_on_disk_is_always_a_whole_document(tmp_path):
    """Each rewrite replaces the file in one rename: an interrupted write leaves the previous report."""
    path = tmp_path / "gpu_check.json"
    write_json_atomic(path, {"phases": [{"phase": "a", "status": "ok"}]})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"phases": [object()]})
    with pytest.raises(ValueError):
        write_json_atomic(path, {"rate": float("nan")})  # NaN is not JSON: refused, not written
    assert json.loads(path.read_text()) == {"phases": [{"phase": "a", "status": "ok"}]}
    assert [p.name for p in tmp_path.iterdir()] == ["gpu_check.json"]  # no temporary file left behind
