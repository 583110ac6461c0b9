"""The job's output: Hive-partitioned Parquet with one explicit schema, and a run summary beside it.

Layout under the output URI::

    run_date=2026-11-22/part-<run_id>-00000.parquet    one or more files per run
    run_date=2026-11-22/_summary-<run_id>.json         counts by status, speed, model ids
    _staging/<run_id>/...                              files of a run still in progress

Part files are written under ``_staging/`` and moved into the partition only when the run has produced every
row, so readers (pyarrow, DuckDB, Spark all skip names starting with ``_``) never see a half-written run.
Rows in each file are sorted by score so row-group statistics let ``score`` filters skip most of a file.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Mapping
from dataclasses import dataclass, field

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

STATUS_OK = "ok"
STATUS_ERROR = "error"
STATUS_REJECTED = "rejected"
STATUSES = (STATUS_OK, STATUS_ERROR, STATUS_REJECTED)
PARTITION = "run_date"
STAGING = "_staging"
ROW_GROUP_SIZE = 16_384

RESULT_SCHEMA = pa.schema([
    pa.field("uri", pa.string(), nullable=False),
    pa.field("etag", pa.string()),
    pa.field("size_bytes", pa.int64()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("score", pa.float32()),
    pa.field("score_std", pa.float32()),
    pa.field("num_crops", pa.int32()),
    pa.field("status", pa.string(), nullable=False),
    pa.field("error", pa.string()),
    pa.field("model_id", pa.string(), nullable=False),
    pa.field("encoder", pa.string(), nullable=False),
    pa.field("scored_at", pa.timestamp("us", tz="UTC"), nullable=False),
    pa.field("run_id", pa.string(), nullable=False),
])


def output_schema(extras: pa.Schema) -> pa.Schema:
    """The result schema followed by the manifest's extra columns (renamed ``manifest_<name>`` on a clash)."""
    fields = list(RESULT_SCHEMA)
    taken = set(RESULT_SCHEMA.names) | {PARTITION}
    for f in extras:
        name = f.name if f.name not in taken else f"manifest_{f.name}"
        fields.append(pa.field(name, f.type))
        taken.add(name)
    return pa.schema(fields)


def extra_column_names(extras: pa.Schema) -> dict[str, str]:
    """Manifest column name -> output column name, as ``output_schema`` names them."""
    schema = output_schema(extras)
    return dict(zip(extras.names, schema.names[len(RESULT_SCHEMA):], strict=True))


@dataclass
class PartitionWriter:
    """Writes one run's rows to staging, then commits them into ``run_date=<date>/`` in one step.

    Args:
        output: Output root URI.
        run_date: Partition value (``YYYY-MM-DD``).
        run_id: Unique id of this run; part and summary files carry it.
        schema: The full output schema (``output_schema``).
        storage_options: fsspec options.
        rows_per_file: Rows buffered before a part file is written.
    """

    output: str
    run_date: str
    run_id: str
    schema: pa.Schema
    storage_options: Mapping | None = None
    rows_per_file: int = 200_000
    _buffer: list[pa.Table] = field(default_factory=list)
    _buffered: int = 0
    _parts: list[str] = field(default_factory=list)
    rows_written: int = 0

    def __post_init__(self):
        self.fs, self.root = fsspec.core.url_to_fs(self.output, **(self.storage_options or {}))
        self.root = self.root.rstrip("/")
        self.staging = posixpath.join(self.root, STAGING, self.run_id)
        self.partition = posixpath.join(self.root, f"{PARTITION}={self.run_date}")
        self.fs.makedirs(self.staging, exist_ok=True)

    def write(self, table: pa.Table) -> None:
        """Buffer rows (already in ``schema``); a part file is written each ``rows_per_file`` rows."""
        self._buffer.append(table.select(self.schema.names).cast(self.schema))
        self._buffered += len(table)
        if self._buffered >= self.rows_per_file:
            self.flush()

    def flush(self) -> None:
        """Write the buffered rows as a part file in staging."""
        if not self._buffered:
            return
        table = pa.concat_tables(self._buffer)
        table = table.sort_by([("score", "ascending")])  # nulls (failed rows) last
        name = f"part-{self.run_id}-{len(self._parts):05d}.parquet"
        with self.fs.open(posixpath.join(self.staging, name), "wb") as f:
            pq.write_table(table, f, row_group_size=ROW_GROUP_SIZE, compression="zstd")
        self._parts.append(name)
        self.rows_written += len(table)
        self._buffer, self._buffered = [], 0

    def commit(self, summary: Mapping) -> str:
        """Move the part files into the partition and write the summary; returns the summary's path."""
        self.flush()
        self.fs.makedirs(self.partition, exist_ok=True)
        for name in self._parts:
            self.fs.mv(posixpath.join(self.staging, name), posixpath.join(self.partition, name))
        summary_path = posixpath.join(self.partition, f"_summary-{self.run_id}.json")
        with self.fs.open(summary_path, "w") as f:
            f.write(json.dumps(summary, indent=2, sort_keys=True))
        if self.fs.exists(self.staging):  # object stores have no empty folders
            self.fs.rm(self.staging, recursive=True)
        try:
            self.fs.rmdir(posixpath.dirname(self.staging))  # only when empty: other runs may be staging
        except OSError:
            pass
        return summary_path


def scored_keys(output: str, model_id: str, storage_options: Mapping | None = None) -> pa.Table:
    """``(uri, etag, size_bytes)`` of every image already scored ``ok`` by ``model_id``, in any partition.

    Error rows are not counted as scored, so a failed image is tried again on the next run.
    """
    fs, root = fsspec.core.url_to_fs(output, **(storage_options or {}))
    empty = pa.table({"uri": pa.array([], pa.string()), "etag": pa.array([], pa.string()),
                      "size_bytes": pa.array([], pa.int64())})
    if not fs.exists(root):
        return empty
    files = [p for p in fs.find(root) if p.endswith(".parquet")
             and not any(part.startswith(("_", ".")) for part in p[len(root.rstrip("/")):].split("/"))]
    if not files:
        return empty
    dataset = pads.dataset(files, filesystem=fs, format="parquet")
    flt = (pc.field("model_id") == model_id) & (pc.field("status") == STATUS_OK)
    return dataset.to_table(columns=["uri", "etag", "size_bytes"], filter=flt)
