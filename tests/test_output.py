import datetime as dt
import json

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from pipeline.output import RESULT_SCHEMA, PartitionWriter, extra_column_names, output_schema, scored_keys


def _rows(n: int, start: int = 0, model_id: str = "m1", status: str = "ok", extras: dict | None = None) -> pa.Table:
    now = dt.datetime(2026, 11, 22, tzinfo=dt.timezone.utc)
    data = {
        "uri": [f"s3://b/{i}.jpg" for i in range(start, start + n)], "etag": [f"e{i}" for i in range(n)],
        "size_bytes": list(range(n)), "width": [10] * n, "height": [20] * n,
        "score": [((i * 37) % 100) / 100 if status == "ok" else None for i in range(n)],
        "score_std": [0.01] * n, "num_crops": [20] * n, "status": [status] * n,
        "error": [None if status == "ok" else "boom"] * n, "model_id": [model_id] * n, "encoder": ["vits"] * n,
        "scored_at": [now] * n, "run_id": ["r1"] * n,
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


def test_nothing_is_visible_before_commit_and_everything_after(tmp_path):
    schema = output_schema(pa.schema([("label", pa.string())]))
    writer = PartitionWriter(str(tmp_path), "2026-11-22", "r1", schema, rows_per_file=50)
    for start in (0, 40, 80):
        writer.write(_rows(40, start, extras={"label": ["x"] * 40}))
    writer.flush()
    assert writer.rows_written == 120
    assert pads.dataset(str(tmp_path), format="parquet").count_rows() == 0  # staging is invisible to readers
    summary_path = writer.commit({"rows": 120})
    table = pads.dataset(str(tmp_path), format="parquet", partitioning="hive").to_table()
    assert table.num_rows == 120 and set(table.column("run_date").to_pylist()) == {"2026-11-22"}
    parts = sorted((tmp_path / "run_date=2026-11-22").glob("part-r1-*.parquet"))
    assert len(parts) == 2
    for part in parts:
        scores = pq.read_table(part).column("score").to_pylist()
        assert scores == sorted(scores)  # sorted: row-group statistics on score are tight
        assert pq.ParquetFile(part).metadata.row_group(0).column(5).statistics.has_min_max
    assert json.loads(open(summary_path).read()) == {"rows": 120}
    assert not (tmp_path / "_staging" / "r1").exists()


def test_scored_keys_only_counts_ok_rows_of_the_same_model(tmp_path):
    schema = output_schema(pa.schema([]))
    for run, (model, status, start) in enumerate([("m1", "ok", 0), ("m1", "error", 100), ("m2", "ok", 200)]):
        writer = PartitionWriter(str(tmp_path), f"2026-11-2{run}", f"r{run}", schema)
        writer.write(_rows(3, start, model_id=model, status=status))
        writer.commit({})
    staged = PartitionWriter(str(tmp_path), "2026-11-23", "unfinished", schema)
    staged.write(_rows(3, 300))
    staged.flush()  # a run still in progress (or killed): not counted
    keys = scored_keys(str(tmp_path), "m1")
    assert sorted(keys.column("uri").to_pylist()) == ["s3://b/0.jpg", "s3://b/1.jpg", "s3://b/2.jpg"]
    assert scored_keys(str(tmp_path / "nothing-yet"), "m1").num_rows == 0


def test_writer_rejects_rows_of_another_schema(tmp_path):
    writer = PartitionWriter(str(tmp_path), "2026-11-22", "r1", output_schema(pa.schema([])))
    with pytest.raises(KeyError):
        writer.write(_rows(2).drop_columns(["score"]))
