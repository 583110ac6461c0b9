"""Fault injection on this machine: flaky S3, an actor that dies, a driver killed mid-run.

Each test checks the row accounting: one output row per manifest row, none duplicated, none lost.
"""

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pytest
import ray
from PIL import Image

from pipeline.batch.job import JobConfig, run_job
from pipeline.batch.stages import ScoreActor
from pipeline.scoring.sample import synthetic_photo
from tests import s3proxy
from tests.processes import kill_process_tree
from tests.s3proxy import FaultyProxy

FAST_JOB = {"crops": 1, "depth_input_size": 70, "batch_size": 1, "log_every_s": 0}
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def local_ray(s3_server):
    """A Ray of this test's own whose workers run s3fs with its retries off (see ``s3fs_retries_off``).

    The flaky-S3 test's faults then reach the job's own retry layer; the other tests here read local files.
    """
    ray.cloudpickle.register_pickle_by_value(s3proxy)  # the hook runs before the workers can import ``tests``
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             _node_ip_address="127.0.0.1", runtime_env={"worker_process_setup_hook": s3proxy.s3fs_retries_off})
    yield
    ray.shutdown()


def _jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(synthetic_photo(120, 160, seed=seed)).save(buf, "JPEG", quality=85)
    return buf.getvalue()


def _counts_close(table, manifest_rows: int) -> None:
    uris = table.column("uri").to_pylist()
    assert table.num_rows == manifest_rows
    assert len(set(zip(uris, table.column("run_date").to_pylist(), strict=True))) == manifest_rows  # no duplicates


def test_flaky_s3_is_retried_and_counts_close(local_ray, s3, checkpoints):
    fs, options = s3
    fs.mkdir("lib")
    fs.mkdir("other")
    fs.pipe("other/secret.jpg", _jpeg(99))
    for i in range(6):
        fs.pipe(f"lib/img/{i}.jpg", _jpeg(i))
    rows = [f"img/{i}.jpg" for i in range(6)] + ["s3://other/secret.jpg", "s3://lib/../other/secret.jpg"]
    fs.pipe("lib/manifest.csv", ("uri\n" + "\n".join(rows) + "\n").encode())
    kinds = ["503", "throttle", "reset"]
    # aiohttp re-sends an idempotent request once, by itself, when the connection drops before a response
    # (RFC 9112 9.3.1), so the job sees one error for every two resets.
    drops_per_error = {"503": 1, "throttle": 1, "reset": 2}

    def policy(method, path, seen):
        if method != "GET" or not path.startswith("/lib/img/"):
            return None
        number = int(path.rsplit("/", 1)[1].split(".")[0])
        if number == 5:
            return "503"  # never recovers
        kind = kinds[number % 3]
        return kind if seen < 2 * drops_per_error[kind] else None  # the job sees two errors, then a read

    with FaultyProxy(options["client_kwargs"]["endpoint_url"], policy) as proxy:
        # botocore's retries are off here (one attempt in all; its ``max_attempts`` counts retries only), s3fs's
        # in the workers (local_ray): the job's retry layer is what is tested.
        flaky = {"client_kwargs": {"endpoint_url": proxy.url},
                 "config_kwargs": {"retries": {"total_max_attempts": 1, "mode": "standard"}}}
        summary = run_job(JobConfig(manifest="s3://lib/manifest.csv", output="s3://lib/scores",
                                    weights=str(checkpoints["dgiqa"]), depth_weights=str(checkpoints["depth"]),
                                    storage_options=flaky, run_date="2026-11-22", **FAST_JOB))
    handler = pafs.PyFileSystem(pafs.FSSpecHandler(fs))
    table = pads.dataset("lib/scores", filesystem=handler, format="parquet", partitioning="hive").to_table()
    assert summary["status_counts"] == {"ok": 5, "error": 1, "rejected": 2}
    # Every fault reached the job's retry layer, none was absorbed by s3fs or botocore: images 0-4 give the job
    # two errors each and are read on its third try (10 retries it counts), image 5 fails all its 4 tries.
    assert dict(proxy.faults) == {"503": 2 * 2 + 4, "throttle": 2 * 2, "reset": 2 * 2}
    assert summary["read_retries"] == 5 * 2
    assert not any("/other/" in p for p in proxy.paths())  # rejected URIs were never requested
    _counts_close(table, 8)
    failed = [r for r in table.to_pylist() if r["status"] == "error"]
    assert failed[0]["uri"] == "s3://lib/img/5.jpg" and "after 4 attempts" in failed[0]["error"]
    print(f"\nflaky S3: faults injected {dict(proxy.faults)}, retried by the job {summary['read_retries']}, "
          f"rows in 8, rows out {table.num_rows}, duplicates 0, lost 0")


class DyingScoreActor(ScoreActor):
    """Hard-exits (no cleanup, like an OOM kill) on its second batch, once per test."""

    marker = ""

    def __call__(self, batch):
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls == 2 and not os.path.exists(self.marker):
            Path(self.marker).write_text("died")
            os._exit(1)
        return super().__call__(batch)


def run_dying(marker: str, images: str, output: str, weights: str, depth_weights: str) -> None:
    """The job with ``DyingScoreActor`` on a Ray of this process's own; prints its summary as JSON.

    A process of its own: after an actor died, Ray Data may still be replacing actors of that process's Ray, and a
    job started next in the same process saw its own actor die (see ``tests/test_weights_changed.py``).
    """
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    DyingScoreActor.marker = marker
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             _node_ip_address="127.0.0.1")
    summary = run_job(JobConfig(manifest=images, output=output, actor_class=DyingScoreActor, weights=weights,
                                depth_weights=depth_weights, run_date="2026-11-22", **FAST_JOB))
    print(json.dumps(summary), flush=True)
    ray.shutdown()


def test_actor_that_dies_is_restarted_and_its_batch_redone(checkpoints, tmp_path):
    marker = tmp_path / "actor-died"
    images = tmp_path / "bucket"
    images.mkdir()
    for i in range(6):
        (images / f"{i}.jpg").write_bytes(_jpeg(i))
    code = "import sys; from tests.test_faults import run_dying; run_dying(*sys.argv[1:])"
    proc = subprocess.run([sys.executable, "-c", code, str(marker), str(images), str(tmp_path / "out"),
                           str(checkpoints["dgiqa"]), str(checkpoints["depth"])],
                          cwd=REPO, env={**JOB_ENV, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Ray prints its own lines ("(raylet) ...") on standard output too: the summary is the JSON line.
    summary = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("{")))
    assert marker.exists()  # the fault happened
    assert summary["status_counts"] == {"ok": 6, "error": 0, "rejected": 0}
    _counts_close(pads.dataset(str(tmp_path / "out"), format="parquet", partitioning="hive").to_table(), 6)


def _job_command(images: Path, output: Path, checkpoints) -> list[str]:
    return [sys.executable, str(REPO / "jobs" / "score_bucket.py"), "--manifest", str(images),
            "--output", str(output), "--weights", str(checkpoints["dgiqa"]),
            "--depth-weights", str(checkpoints["depth"]), "--crops", "1", "--depth-input-size", "70",
            "--batch-size", "1", "--shard-rows", "2", "--run-date", "2026-11-22", "--log-every", "0"]


def _jpeg_bucket(folder: Path, n: int) -> Path:
    folder.mkdir()
    for i in range(n):
        (folder / f"{i:02d}.jpg").write_bytes(_jpeg(i))
    return folder


JOB_ENV = {**os.environ, "RAY_ADDRESS": "local", "PYTHONUNBUFFERED": "1"}


def _kill_after_staged_shards(command: list[str], output: Path, shards: int, timeout_s: float = 900) -> None:
    """Start the job in a process group of its own; SIGKILL the driver and its local Ray (its process group and
    every process it spawned, Ray's workers included) once ``shards`` shards are staged, with no chance to clean up.

    The kill point is an event (staged shard files), not a time, so a slow or busy machine only makes the wait
    longer; ``timeout_s`` is a generous bound for a run that never gets there. The job's output goes to a file
    beside ``output``, not a pipe that nobody reads while it runs (a full pipe would stall the job).
    """
    log = output.with_name(output.name + "-killed-run.log")

    def staged() -> int:
        return len(list(output.glob("_staging/*/shard-*.parquet")))

    with log.open("wb") as sink:
        proc = subprocess.Popen(command, env=JOB_ENV, start_new_session=True, stdout=sink, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline and staged() < shards:
                assert proc.poll() is None, (f"the job exited ({proc.returncode}) before staging {shards} shards:\n"
                                             f"{log.read_text()[-3000:]}")
                time.sleep(0.2)
            assert staged() >= shards, (f"the job staged {staged()} of {shards} shards in {timeout_s:.0f}s, so it "
                                        f"never reached the kill point:\n{log.read_text()[-3000:]}")
        finally:
            kill_process_tree(proc)


@pytest.mark.slow
def test_driver_killed_mid_run_then_rerun_is_exactly_once(checkpoints, tmp_path):
    images = _jpeg_bucket(tmp_path / "bucket", 10)
    output = tmp_path / "out"
    command = _job_command(images, output, checkpoints)
    _kill_after_staged_shards(command, output, 3)
    assert not list(output.glob("run_date=*/*.parquet"))  # nothing committed, nothing visible

    rerun = subprocess.run(command, env=JOB_ENV, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    summary = json.loads(rerun.stdout[rerun.stdout.index("{"):])
    assert summary["resumed_rows"] >= 4  # finished shards were reused, not scored again
    assert summary["status_counts"]["ok"] == 10
    table = pads.dataset(str(output), format="parquet", partitioning="hive").to_table()
    _counts_close(table, 10)
    stray = [p for p in output.rglob("*") if p.is_file() and not (
        p.name.startswith("part-") or p.name.startswith("_summary-"))]
    assert stray == [] and not (output / "_staging").exists()
    print(f"\ndriver SIGKILL: rows in 10, rows out {table.num_rows}, resumed {summary['resumed_rows']}, "
          f"duplicates 0, lost 0")


def test_manifest_replaced_at_the_same_uri_after_a_kill_commits_only_the_new_one(checkpoints, tmp_path):
    """The nightly CronJob points at a fixed manifest path: a killed run, a new manifest, a rerun."""
    images = _jpeg_bucket(tmp_path / "bucket", 16)
    manifest = images / "manifest.csv"
    manifest.write_text("uri\n" + "".join(f"{i:02d}.jpg\n" for i in range(8)))
    output = tmp_path / "out"
    command = _job_command(manifest, output, checkpoints)
    _kill_after_staged_shards(command, output, 2)
    # Tonight's manifest is replaced by tomorrow's at the same URI: same row numbers, other images.
    manifest.write_text("uri\n" + "".join(f"{i:02d}.jpg\n" for i in range(8, 16)))
    rerun = subprocess.run(command, env=JOB_ENV, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    summary = json.loads(rerun.stdout[rerun.stdout.index("{"):])
    assert summary["resumed_rows"] == 0  # the old manifest's shards were not taken for the new one's
    table = pads.dataset(str(output), format="parquet", partitioning="hive").to_table()
    assert sorted(table.column("uri").to_pylist()) == [f"file://{images}/{i:02d}.jpg" for i in range(8, 16)]
    assert not (output / "_staging").exists()  # the killed attempt's staging went with the commit


def _hostile_corpus(folder: Path) -> dict[str, tuple[str, str | None]]:
    """Write every hostile or unusual input; returns file name -> (expected status, error fragment)."""
    photo = Image.fromarray(synthetic_photo(90, 120, seed=3))

    def save(name, image, fmt, **kw):
        buf = io.BytesIO()
        image.save(buf, fmt, **kw)
        (folder / name).write_bytes(buf.getvalue())

    expected = {}
    (folder / "zero.jpg").write_bytes(b"")
    expected["zero.jpg"] = ("error", "empty file")
    save("whole.jpg", photo, "JPEG")
    (folder / "truncated.jpg").write_bytes((folder / "whole.jpg").read_bytes()[:600])
    expected["truncated.jpg"] = ("error", "truncated or corrupt")
    save("whole.png", photo, "PNG")
    (folder / "truncated.png").write_bytes((folder / "whole.png").read_bytes()[:900])
    expected["truncated.png"] = ("error", "truncated or corrupt")
    (folder / "page.jpg").write_text("<!doctype html><html><body>Not Found</body></html>")
    expected["page.jpg"] = ("error", "not a recognised image format")
    (folder / "notes.jpg").write_text("just some text\n")
    expected["notes.jpg"] = ("error", "not a recognised image format")
    from tests.scoring.test_preprocess import _png_with_declared_size

    (folder / "bomb.png").write_bytes(_png_with_declared_size(60_000, 60_000))
    expected["bomb.png"] = ("error", "decompression bomb")
    (folder / "big-header.png").write_bytes(_png_with_declared_size(12_000, 10_000))
    expected["big-header.png"] = ("error", "over the limit")
    save("panorama.png", Image.new("RGB", (1000, 40), (20, 90, 200)), "PNG")
    expected["panorama.png"] = ("error", "aspect ratio")
    save("pixel.png", Image.new("RGB", (1, 1), (255, 0, 0)), "PNG")
    expected["pixel.png"] = ("error", "shorter side must be at least")
    frames = [photo, photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    for fmt, name in (("GIF", "animated.gif"), ("WEBP", "animated.webp")):
        buf = io.BytesIO()
        frames[0].save(buf, fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)
        (folder / name).write_bytes(buf.getvalue())
        expected[name] = ("ok", None)
    gray16 = Image.fromarray(np.asarray(photo.convert("L")).astype(np.uint16) * 257)
    save("gray16.tiff", gray16, "TIFF")
    save("float.tiff", Image.fromarray(np.asarray(photo.convert("L"), np.float32) / 255.0, mode="F"), "TIFF")
    save("cmyk.jpg", photo.convert("CMYK"), "JPEG")
    palette = photo.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    save("palette-transparent.png", palette, "PNG", transparency=0)
    save("photo.heic", photo, "HEIF")
    save("photo.avif", photo, "AVIF")
    for name in ("gray16.tiff", "float.tiff", "cmyk.jpg", "palette-transparent.png", "photo.heic", "photo.avif",
                 "whole.jpg", "whole.png"):
        expected[name] = ("ok", None)
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        save(f"exif-{orientation}.jpg", photo, "JPEG", exif=exif.tobytes())
        expected[f"exif-{orientation}.jpg"] = ("ok", None)
    return expected


def test_hostile_inputs_each_give_a_clear_row_and_spare_the_others(local_ray, checkpoints, tmp_path):
    bucket = tmp_path / "bucket"
    bucket.mkdir()
    expected = _hostile_corpus(bucket)
    other = tmp_path / "other-bucket"
    other.mkdir()
    (other / "x.jpg").write_bytes((bucket / "whole.jpg").read_bytes())
    lines = ["uri,note"] + [f"{name},corpus" for name in expected]
    lines += ["whole.jpg,duplicate", "", "   ", f"{other}/x.jpg,other bucket", "file:///etc/passwd,hostile",
              "http://169.254.169.254/latest/meta-data/,hostile", "../other-bucket/x.jpg,hostile",
              "a.jpg,too,many,fields", ",no uri"]
    body = ("\n".join(lines) + "\n").encode() + b"caf\xe9.jpg,bad utf-8\n"
    (bucket / "manifest.csv").write_bytes(body)
    summary = run_job(JobConfig(manifest=str(bucket / "manifest.csv"), output=str(tmp_path / "out"),
                                weights=str(checkpoints["dgiqa"]), depth_weights=str(checkpoints["depth"]),
                                run_date="2026-11-22", **FAST_JOB))
    table = pads.dataset(str(tmp_path / "out"), format="parquet", partitioning="hive").to_table()
    rows = table.to_pylist()
    manifest_rows = len(expected) + 8  # the blank lines are not rows
    assert table.num_rows == manifest_rows == summary["manifest_rows"]
    by_name = {}
    for row in rows:
        if row["note"] == "corpus":
            by_name[row["uri"].rsplit("/", 1)[1]] = row
    for name, (status, fragment) in expected.items():
        row = by_name[name]
        assert row["status"] == status, (name, row["error"])
        if fragment:
            assert fragment in row["error"], (name, row["error"])
        else:
            assert 0 < row["score"] < 1 and row["width"] > 0, name
    for orientation in range(5, 9):  # rotated by 90 degrees: width and height swap
        assert (by_name[f"exif-{orientation}.jpg"]["width"], by_name[f"exif-{orientation}.jpg"]["height"]) == (90, 120)
    extra = {row["note"]: row for row in rows if row["note"] != "corpus"}
    assert extra["duplicate"]["status"] == "error" and "duplicate of manifest row" in extra["duplicate"]["error"]
    assert extra["other bucket"]["status"] == "rejected"
    assert extra["bad utf-8"]["status"] == "error" and "not valid UTF-8" in extra["bad utf-8"]["error"]
    hostile = [row for row in rows if row["note"] == "hostile"]
    assert len(hostile) == 3 and {row["status"] for row in hostile} == {"rejected"}
    assert extra["no uri"]["status"] == "rejected" and "empty URI" in extra["no uri"]["error"]
    malformed = [row for row in rows if row["note"] is None]
    assert len(malformed) == 1 and malformed[0]["status"] == "error"
    assert "malformed manifest line (expected 2 fields, got 4): 'a.jpg,too,many,fields'" in malformed[0]["error"]
    print(f"\nhostile corpus: {manifest_rows} rows in, {table.num_rows} rows out, "
          f"by status {summary['status_counts']}")
