import datetime as dt
import json
import posixpath

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from pipeline.batch.output import (
    RESULT_SCHEMA,
    OutputError,
    RunOutput,
    atomic_open,
    atomic_target,
    check_writable,
    extra_column_names,
    iter_done_rows,
    output_schema,
    write_parquet_atomically,
)


def _rows(n: int, start: int = 0, model_id: str = "m1", status: str = "ok", extras: dict | None = None) -> pa.Table:
    now = dt.datetime(2026, 11, 22, tzinfo=dt.UTC)
    data = {
        "row_index": list(range(start, start + n)),
        "uri": [f"s3://b/{i}.jpg" for i in range(start, start + n)], "etag": [f"e{i}" for i in range(n)],
        "size_bytes": list(range(n)), "width": [10] * n, "height": [20] * n,
        "score": [((i * 37) % 100) / 100 if status == "ok" else None for i in range(n)],
        "score_std": [0.01] * n, "num_crops": [20] * n, "status": [status] * n,
        "error": [None if status == "ok" else "boom"] * n, "model_id": [model_id] * n, "scorer": ["dgiqa"] * n,
        "weights_sha256": ["aaaa"] * n, "aux_model": [None] * n, "scored_at": [now] * n, "run_id": ["r1"] * n,
    }
    data.update(extras or {})
    return pa.table(data)


def test_schema_is_explicit_and_extras_never_clash():
    extras = pa.schema([("label", pa.string()), ("score", pa.int64()), ("run_date", pa.string())])
    schema = output_schema(extras)
    assert schema.names[:len(RESULT_SCHEMA)] == RESULT_SCHEMA.names
    assert schema.names[len(RESULT_SCHEMA):] == ["label", "manifest_score", "manifest_run_date"]
    assert extra_column_names(extras) == {"label": "label", "score": "manifest_score",
                                          "run_date": "manifest_run_date"}
    assert schema.field("score").type == pa.float32()
    assert schema.field("scored_at").type == pa.timestamp("us", tz="UTC")


def test_shards_are_invisible_until_one_commit(tmp_path):
    schema = output_schema(pa.schema([("label", pa.string())]))
    out = RunOutput(str(tmp_path), "2026-11-22", "job1-rows1", schema)
    for shard, start in enumerate((0, 40, 80)):
        out.write_shard(shard, _rows(40, start, extras={"label": ["x"] * 40}))
    assert pads.dataset(str(tmp_path), format="parquet").count_rows() == 0  # staging is invisible to readers
    summary_path = out.commit({"rows": 120})
    table = pads.dataset(str(tmp_path), format="parquet", partitioning="hive").to_table()
    assert table.num_rows == 120 and set(table.column("run_date").to_pylist()) == {"2026-11-22"}
    assert "row_index" not in table.column_names
    parts = list((tmp_path / "run_date=2026-11-22").glob("*.parquet"))
    assert [p.name for p in parts] == ["part-job1-rows1.parquet"]
    scores = pq.read_table(parts[0]).column("score").to_pylist()
    assert scores == sorted(scores)  # sorted: row-group statistics on score are tight
    assert json.loads(open(summary_path).read()) == {"rows": 120}
    assert not (tmp_path / "_staging").exists()
    # Committing again (a rerun killed after the part was placed) changes nothing.
    out2 = RunOutput(str(tmp_path), "2026-11-22", "job1-rows1", schema)
    out2.commit({"rows": 120})
    assert pads.dataset(str(tmp_path), format="parquet").count_rows() == 120


def test_finished_shards_are_checked_before_reuse(tmp_path):
    schema = output_schema(pa.schema([]))
    out = RunOutput(str(tmp_path), "2026-11-22", "job1-rows1", schema)
    out.write_shard(1, _rows(3, 0))
    out.write_shard(2, _rows(3, 3))
    (tmp_path / "_staging" / "2026-11-22_job1-rows1" / "shard-000003.parquet").write_bytes(b"PAR1 torn write")
    expected = {1: 3, 2: 4, 3: 1, 4: 1}  # rows each shard should hold: shard 2 holds 3, a killed attempt's plan
    finished = out.finished_shards(expected)
    assert finished == {1: 3}
    staged = sorted(p.name for p in (tmp_path / "_staging" / "2026-11-22_job1-rows1").iterdir())
    assert staged == ["shard-000001.parquet"]  # the wrong and the torn shard are removed, to be redone


def test_leftovers_of_killed_attempts_of_the_same_job_are_removed(tmp_path):
    schema = output_schema(pa.schema([]))
    RunOutput(str(tmp_path), "2026-11-22", "job1-old", schema).write_shard(1, _rows(2))
    RunOutput(str(tmp_path), "2026-11-22", "job2-other", schema).write_shard(1, _rows(2))
    out = RunOutput(str(tmp_path), "2026-11-22", "job1-new", schema)
    out.write_shard(1, _rows(2))
    out.commit({})
    assert sorted(p.name for p in (tmp_path / "_staging").iterdir()) == ["2026-11-22_job2-other"]


def test_done_keys(tmp_path):
    schema = output_schema(pa.schema([]))
    for day, model, status, start in [("2026-11-20", "m1", "ok", 0), ("2026-11-20", "m1", "error", 100),
                                      ("2026-11-21", "m2", "ok", 200), ("2026-11-22", "m1", "error", 300)]:
        out = RunOutput(str(tmp_path), day, f"{model}{status}-x", schema)
        out.write_shard(1, _rows(2, start, model_id=model, status=status))
        out.commit({})
    unfinished = RunOutput(str(tmp_path), "2026-11-22", "other-x", schema)
    unfinished.write_shard(1, _rows(2, 400))  # a run still in progress (or killed): not counted
    import fsspec

    fs = fsspec.filesystem("file")
    uris = [u for b in iter_done_rows(fs, str(tmp_path), "m1", "2026-11-22") for u in b.column("uri").to_pylist()]
    # ok rows of any night, and every row of tonight's partition; error rows of other nights are retried.
    assert sorted(uris) == ["s3://b/0.jpg", "s3://b/1.jpg", "s3://b/300.jpg", "s3://b/301.jpg"]
    assert list(iter_done_rows(fs, str(tmp_path / "nothing-yet"), "m1", "2026-11-22")) == []


def test_atomic_write_leaves_no_temporary_files(tmp_path):
    import fsspec

    fs = fsspec.filesystem("file")
    write_parquet_atomically(fs, str(tmp_path / "a.parquet"), _rows(2))
    assert [p.name for p in tmp_path.iterdir()] == ["a.parquet"]
    with pytest.raises(AttributeError):
        write_parquet_atomically(fs, str(tmp_path / "b.parquet"), "not a table")
    assert [p.name for p in tmp_path.iterdir()] == ["a.parquet"]


def test_atomic_target_replaces_whole_files_or_keeps_the_old_one(tmp_path):
    """The one write-then-rename step behind shards, part files, training checkpoints and the depth cache."""
    import fsspec

    fs = fsspec.filesystem("file")
    path = str(tmp_path / "best.pth")
    fs.pipe_file(path, b"old")
    with pytest.raises(OSError, match="disk full"), atomic_target(fs, path) as target:
        assert target != path and posixpath.basename(target).startswith(".tmp-")
        fs.pipe_file(target, b"half a fi")
        raise OSError("disk full")
    assert fs.cat_file(path) == b"old" and [p.name for p in tmp_path.iterdir()] == ["best.pth"]
    with atomic_target(fs, path) as target:
        fs.pipe_file(target, b"new")
        assert fs.cat_file(path) == b"old"  # readers still see the old file until the block ends
    assert fs.cat_file(path) == b"new" and [p.name for p in tmp_path.iterdir()] == ["best.pth"]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_streamed_parquet_file_that_fails_part_way_keeps_the_old_one(where, tmp_path, request):
    """The night's part file is streamed batch by batch; a failure after the first batch must not publish it.

    pyarrow's writer writes its footer when its block ends, even on an error, so a plain close of the file
    would commit a valid Parquet file holding only the batches before the failure.
    """
    import fsspec

    if where == "s3":
        fs, _ = request.getfixturevalue("s3")
        fs.mkdir("out")
        path = "out/run_date=2026-12-03/part-0.parquet"
    else:
        fs, path = fsspec.filesystem("file"), str(tmp_path / "part-0.parquet")
    old = pa.table({"score": [0.5]})
    write_parquet_atomically(fs, path, old)
    batch = pa.table({"score": [0.1, 0.2]})
    with (pytest.raises(RuntimeError, match="merge failed"), atomic_open(fs, path) as f,
          pq.ParquetWriter(f, batch.schema) as writer):
        writer.write_table(batch)
        raise RuntimeError("merge failed")
    fs.invalidate_cache()
    assert pq.read_table(fs.open(path, "rb")).equals(old)
    assert [posixpath.basename(p) for p in fs.ls(posixpath.dirname(path), detail=False)] == ["part-0.parquet"]


@pytest.mark.parametrize(("where", "folder", "expected"), [
    ("/proc/dgiqa-out", True, "cannot write to --output /proc/dgiqa-out: a folder on its path does not exist"),
    ("{tmp}/file.txt/out", True, "a part of its path is a file, not a folder"),
    ("{tmp}/file.txt", True, r"is a file; give a folder \(or bucket prefix\)"),
    ("{tmp}", False, "is a folder; give a file name"),
    ("{tmp}/readonly/out", True, "permission denied"),
    ("/sys/dgiqa-out", True, "permission denied"),  # refused to root too (sysfs)
])
def test_an_unwritable_output_is_one_line_naming_flag_place_and_reason(tmp_path, where, folder, expected):
    import os
    import re

    (tmp_path / "file.txt").write_text("not a folder")
    (tmp_path / "readonly").mkdir(mode=0o555)
    if os.geteuid() == 0 and "readonly" in where:
        pytest.skip("running as root: a read-only folder is writable to root, so permission cannot be denied")
    with pytest.raises(OutputError) as caught:
        check_writable(where.format(tmp=tmp_path), folder=folder)
    assert re.search(expected, str(caught.value)) and "\n" not in str(caught.value)


def test_a_writable_output_is_created_and_the_probe_leaves_nothing(tmp_path):
    check_writable(str(tmp_path / "a" / "b"))
    check_writable(str(tmp_path / "page" / "report.html"), folder=False, flag="--html")
    assert list(tmp_path.iterdir()) == []  # the folders made to probe are gone again
    (tmp_path / "existing").mkdir()
    check_writable(str(tmp_path / "existing"))
    assert [p.name for p in tmp_path.rglob("*")] == ["existing"]


def test_a_missing_bucket_is_found_before_anything_is_read(s3):
    _, options = s3
    with pytest.raises(OutputError, match="cannot write to --output s3://no-such-bucket/scores: "):
        check_writable("s3://no-such-bucket/scores", options)
