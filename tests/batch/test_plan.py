"""The out-of-core planner: decisions per row, shards, fingerprints, and a driver that does not grow with N."""

import json
import os
import subprocess
import sys
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from pipeline.batch.allowlist import Allowlist
from pipeline.batch.manifest import open_manifest
from pipeline.batch.output import RESULT_SCHEMA, HistoryUnreadable, RunOutput, output_schema
from pipeline.batch.plan import PlannerConfig, make_plan

REPO = Path(__file__).resolve().parents[2]
MODEL = "dgiqa@test"


def _history(output: Path, rows: list[dict], run_date: str, model_id: str = MODEL) -> None:
    """Committed rows of an earlier run, written through RunOutput as the job writes them."""
    schema = output_schema(pa.schema([]))
    n = len(rows)
    table = pa.table({
        "row_index": list(range(n)), "uri": [r["uri"] for r in rows], "etag": [r.get("etag") for r in rows],
        "size_bytes": [r.get("size") for r in rows], "width": [1] * n, "height": [1] * n,
        "score": [0.5] * n, "score_std": [0.0] * n, "num_crops": [1] * n,
        "status": [r.get("status", "ok") for r in rows], "error": [None] * n, "model_id": [model_id] * n,
        "scorer": ["dgiqa"] * n, "weights_sha256": ["aaaa"] * n, "aux_model": [None] * n,
        "scored_at": pa.array([0] * n, pa.timestamp("us", tz="UTC")),
        "run_id": ["r"] * n})
    out = RunOutput(str(output), run_date, f"hist{abs(hash(run_date + model_id)) % 10**6}-x", schema)
    out.write_shard(0, table.cast(pa.schema([pa.field("row_index", pa.int64()), *schema])))
    out.commit({})


def _plan(manifest: Path, output: Path, shard_rows: int = 2, incremental: bool = True, **kw):
    reader = open_manifest(str(manifest))
    fs, root = fsspec.core.url_to_fs(str(output))
    return make_plan(reader, Allowlist([reader.home]), fs, root, MODEL, "2026-11-30", incremental, shard_rows,
                     config=PlannerConfig(memory_mb=64), **kw)


def _work(plan) -> list[dict]:
    rows = [*plan.rows(scored=False), *plan.rows(scored=True)]
    return sorted((r for b in rows for r in pa.Table.from_batches([b]).to_pylist()), key=lambda r: r["row_index"])


def test_a_copy_of_a_row_refused_for_its_own_fault_is_scored(tmp_path):
    """Row 0 has bytes that are no UTF-8 in a carried column (its own error row); row 1 names the same object
    cleanly and is scored, not called a duplicate of a row that was never scored."""
    (tmp_path / "m.csv").write_bytes(b"uri,caption\na.jpg,caf\xe9\na.jpg,cafe\nb.jpg,ok\na.jpg,again\n")
    plan = _plan(tmp_path / "m.csv", tmp_path / "out")
    try:
        rows = {r["row_index"]: (r["status"], r["error"]) for r in _work(plan)}
    finally:
        plan.close()
    assert rows[0][0] == "error" and "UTF-8" in rows[0][1]
    assert rows[1] == ("ok", None) and rows[2] == ("ok", None)
    assert rows[3][0] == "error" and rows[3][1].startswith("duplicate of manifest row 1 ")


def test_a_manifest_that_fails_part_way_is_the_readers_one_line_error(tmp_path):
    """A gzipped CSV cut short fails after its first batches, inside DuckDB's read of the stream: the plan raises
    the reader's ManifestError, not DuckDB's wrapper of its text."""
    import gzip

    from pipeline.batch.manifest import ManifestError

    text = "uri\n" + "".join(f"img/{i:08d}-a-name-long-enough-for-several-blocks.jpg\n" for i in range(400_000))
    data = gzip.compress(text.encode())
    (tmp_path / "m.csv.gz").write_bytes(data[:len(data) * 3 // 4])
    with pytest.raises(ManifestError, match=r"^cannot read manifest .*m\.csv\.gz: EOFError"):
        _plan(tmp_path / "m.csv.gz", tmp_path / "out")


def test_a_part_file_that_cannot_be_read_now_stops_the_plan_and_a_stray_file_is_passed_over(tmp_path, s3,
                                                                                              monkeypatch):
    """Tonight's committed part file on S3 answers 503: the plan fails (the rerun tries again) rather than plan
    its rows again and write them twice. A ``.parquet`` that is no Parquet file is no part of the history."""
    import s3fs

    from tests.s3proxy import FaultyProxy

    fs, options = s3
    fs.mkdir("lib")
    _history(tmp_path / "out", [{"uri": "s3://lib/img/a.jpg", "etag": "e1", "size": 1}], "2026-11-30")
    fs.put(str(tmp_path / "out") + "/", "lib/out/", recursive=True)
    fs.pipe("lib/out/run_date=2026-11-30/stray.parquet", b"not parquet")
    (tmp_path / "m.csv").write_text("uri,etag,size\ns3://lib/img/a.jpg,e1,1\ns3://lib/img/b.jpg,e2,2\n")
    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)  # s3fs's own retries would hide the fault
    monkeypatch.setattr(s3fs.core.S3File, "retries", 1)

    def plan_through(proxy):
        s3fs.S3FileSystem.clear_instance_cache()
        flaky = s3fs.S3FileSystem(client_kwargs={"endpoint_url": proxy.url},
                                  config_kwargs={"retries": {"total_max_attempts": 1, "mode": "standard"}})
        plan = make_plan(open_manifest(str(tmp_path / "m.csv")), Allowlist(["s3://lib/img/"]), flaky, "lib/out",
                         MODEL, "2026-11-30", True, 2, config=PlannerConfig(memory_mb=64))
        try:
            return plan.done_before, plan.rows_to_write
        finally:
            plan.close()

    endpoint = options["client_kwargs"]["endpoint_url"]
    with FaultyProxy(endpoint, lambda method, path, seen: None) as proxy:
        assert plan_through(proxy) == (1, 1)  # a.jpg was written tonight; the stray file is passed over
    with FaultyProxy(endpoint, lambda method, path, seen: "503" if "/part-" in path and method == "GET" else None) \
            as proxy, pytest.raises(HistoryUnreadable, match=r"^cannot read lib/out/run_date=2026-11-30/part-\S+"
                                                             r" to find the rows already written: .*rerun"):
        plan_through(proxy)
    assert proxy.faults["503"] >= 1


@pytest.mark.parametrize("join_bytes", [None, 2**26], ids=["one pass", "four passes"])
def test_each_row_is_decided_once_and_shards_follow_manifest_order(tmp_path, monkeypatch, join_bytes):
    """The same decisions whether the anti-join runs in one pass or over many hash partitions of the URIs."""
    import pipeline.batch.plan

    if join_bytes:
        monkeypatch.setattr(pipeline.batch.plan, "JOIN_BYTES_PER_ROW", join_bytes)
        assert pipeline.batch.plan._join_passes(2, 64) == 4
    home = f"file://{tmp_path}/"
    (tmp_path / "m.csv").write_text("\n".join([
        "uri,etag,size,label",
        "a.jpg,e1,1,x",        # done ok on an earlier night: skipped
        "b.jpg,e2,2,y",        # an error on an earlier night: tried again
        "c.jpg,e3,3,z",        # new
        "a.jpg,CHANGED,1,x",   # same URI, another version: new
        "c.jpg,e3,3,dup",      # duplicate of row 2: an error row, scored once there
        "/etc/passwd,,,evil",  # outside the manifest's folder: rejected
        "d.jpg,e4,4,w",
        "e.jpg,e5,5,v",
    ]) + "\n")
    out = tmp_path / "out"
    _history(out, [{"uri": home + "a.jpg", "etag": "e1", "size": 1},
                   {"uri": home + "b.jpg", "etag": "e2", "size": 2, "status": "error"}], "2026-11-29")
    _history(out, [{"uri": home + "d.jpg", "etag": "e4", "size": 4}], "2026-11-20", model_id="other@model")
    plan = _plan(tmp_path / "m.csv", out)
    try:
        assert (plan.manifest_rows, plan.done_before) == (8, 1)
        rows = _work(plan)
        decided = {r["row_index"]: (r["status"], r["error"]) for r in rows if r["status"] != "ok"}
        assert decided[4][0] == "error" and decided[4][1].startswith("duplicate of manifest row 2")
        assert decided[5][0] == "rejected" and "outside the allowed prefixes" in decided[5][1]
        assert set(decided) == {4, 5}
        assert [r["row_index"] for r in rows if r["status"] == "ok"] == [1, 2, 3, 6, 7]
        # Decided rows fill shard 0; the five to score fill shards 1, 2, 3 in manifest order.
        assert {r["row_index"]: r["shard"] for r in rows} == {4: 0, 5: 0, 1: 1, 2: 1, 3: 2, 6: 2, 7: 3}
        assert plan.shard_rows.tolist() == [2, 2, 2, 1] and plan.decided_shards == 1
        assert plan.extras.names == ["label"] and {r["row_index"]: r["label"] for r in rows}[3] == "x"
        assert rows[0]["uri"] == home + "b.jpg" and rows[0]["etag"] == "e2" and rows[0]["size_bytes"] == 2
        first = plan.fingerprint
    finally:
        plan.close()
    full = _plan(tmp_path / "m.csv", out, incremental=False)  # --full redoes earlier nights' rows too
    try:
        assert full.done_before == 0 and full.rows_to_write == 8
        assert full.fingerprint != first
    finally:
        full.close()


def test_fingerprint_follows_the_manifests_content_not_its_name(tmp_path):
    (tmp_path / "m.csv").write_text("uri,etag\na.jpg,1\nb.jpg,2\n")
    fingerprints = []
    for text in ("uri,etag\na.jpg,1\nb.jpg,2\n", "uri,etag\na.jpg,1\nb.jpg,2\n", "uri,etag\na.jpg,1\nb.jpg,3\n"):
        (tmp_path / "m.csv").write_text(text)
        plan = _plan(tmp_path / "m.csv", tmp_path / "out")
        fingerprints.append(plan.fingerprint)
        plan.close()
    assert fingerprints[0] == fingerprints[1] != fingerprints[2]


def test_skip_shards_leaves_out_the_finished_ones_and_limit_cuts_the_manifest(tmp_path):
    (tmp_path / "m.csv").write_text("uri\n" + "".join(f"{i}.jpg\n" for i in range(10)))
    plan = _plan(tmp_path / "m.csv", tmp_path / "out", shard_rows=3, limit=7)
    try:
        assert plan.manifest_rows == 7 and plan.shard_rows.tolist() == [3, 3, 1]
        left = pa.Table.from_batches(list(plan.rows(scored=True, skip_shards={0: 3, 2: 1})))
        assert left.column("row_index").to_pylist() == [3, 4, 5]
    finally:
        plan.close()


def test_manifest_files_whose_columns_differ_are_united(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    pq.write_table(pa.table({"uri": ["a.jpg"], "n": pa.array([7], pa.int64())}), folder / "1.parquet")
    pq.write_table(pa.table({"uri": ["b.jpg"], "n": ["seven"], "only_here": [True]}), folder / "2.parquet")
    plan = _plan(folder, tmp_path / "out")
    try:
        rows = _work(plan)
        assert [(r["n"], r["only_here"]) for r in rows] == [("7", None), ("seven", True)]
    finally:
        plan.close()


def _write_scale_case(folder: Path, n: int, model_id: str, scorer: str) -> tuple[Path, Path]:
    """A Parquet manifest of n rows, every one already scored ok by ``model_id``: a night with nothing to do."""
    folder.mkdir()
    uris = pc.binary_join_element_wise(f"file://{folder}/photos/", pc.cast(pa.array(np.arange(n)), pa.string()),
                                       ".jpg", "")
    manifest = pa.table({"uri": uris, "etag": pc.cast(pa.array(np.arange(n) * 31), pa.string()),
                         "size": pa.array(np.arange(n) + 100, pa.int64())})
    pq.write_table(manifest, folder / "manifest.parquet", row_group_size=100_000)
    (folder / "out" / "run_date=2026-11-29").mkdir(parents=True)
    history = {"uri": uris, "etag": manifest.column("etag"), "size_bytes": manifest.column("size"),
               "status": pa.repeat(pa.scalar("ok"), n), "model_id": pa.repeat(pa.scalar(model_id), n),
               "scorer": pa.repeat(pa.scalar(scorer), n), "weights_sha256": pa.repeat(pa.scalar("aaaa"), n),
               "run_id": pa.repeat(pa.scalar("r"), n),
               "scored_at": pa.repeat(pa.scalar(0, pa.timestamp("us", tz="UTC")), n)}
    history = pa.table({f.name: history.get(f.name, pa.nulls(n, f.type)) for f in RESULT_SCHEMA}).cast(RESULT_SCHEMA)
    pq.write_table(history, folder / "out" / "run_date=2026-11-29" / "part-h.parquet", row_group_size=16_384)
    return folder / "manifest.parquet", folder / "out"


@pytest.mark.slow
def test_driver_memory_does_not_grow_with_manifest_and_history(checkpoints, tmp_path):
    """1,000 rows and 2,000,000 rows through the real entry point, each in a fresh process, nothing to score.

    The code this replaced held about 820 bytes a manifest row in the driver (1.4 GB more at 2M rows); a
    per-row Python structure coming back would cost at least 100 bytes a row (200 MB more). What the planner
    may use is fixed instead: DuckDB's memory limit (128 MB here, which DuckDB overshoots by about as much
    again) and a few Arrow batches in flight: about 330 MB measured at 2M rows and under 350 MB at 10M.
    """
    from pipeline.scoring.scorer import ScorerConfig, check_models

    info = check_models(ScorerConfig(weights=str(checkpoints["dgiqa"]), depth_weights=str(checkpoints["depth"]),
                                     device="cpu"))
    peaks = {}
    for n in (1000, 2_000_000):
        manifest, output = _write_scale_case(tmp_path / f"n{n}", n, info.model_id, info.scorer)
        command = [sys.executable, str(REPO / "jobs" / "score_bucket.py"), "--manifest", str(manifest),
                   "--output", str(output), "--weights", str(checkpoints["dgiqa"]),
                   "--depth-weights", str(checkpoints["depth"]), "--run-date", "2026-11-30",
                   "--plan-memory-mb", "128", "--spill-dir", str(tmp_path)]
        run = subprocess.run(command, capture_output=True, text=True, timeout=600,
                             env={**os.environ, "RAY_ADDRESS": "local"})
        assert run.returncode == 0, run.stderr[-3000:]
        summary = json.loads(run.stdout[run.stdout.index("{"):])
        assert summary["skipped_done_before"] == n and summary["rows_written"] == 0
        # Sampled while planning: a child's ru_maxrss starts from this test process's at the fork.
        peaks[n] = summary["driver_rss_mib"]["planning_peak"]
    growth = peaks[2_000_000] - peaks[1000]
    print(f"\ndriver RSS while planning: {peaks[1000]:.0f} MiB at 1,000 rows, {peaks[2_000_000]:.0f} MiB at "
          f"2,000,000 (growth {growth:.0f} MiB)")
    assert growth < 480, f"the driver grew by {growth:.0f} MiB from 1,000 to 2,000,000 manifest rows"
