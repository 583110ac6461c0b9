"""The job's output: Hive-partitioned Parquet with one explicit schema, written exactly once per run.

Layout under the output URI::

    run_date=2026-11-22/part-<run_key>.parquet        one file per run, rows sorted by score
    run_date=2026-11-22/_summary-<run_key>.json       counts by status, speed, model ids
    _staging/<run_date>_<run_key>/shard-000012.parquet   finished shards of a run in progress
    _staging/<run_date>_<run_key>/plan/plan-000003.parquet   its rows to score, one file per decode task

How a run stays exactly-once when it is killed at any point and started again with the same arguments:

* The run key is a hash of everything that decides the run's rows (manifest, run date, model id, options,
  the manifest files' versions and a fingerprint of every row still to write). The same arguments over the
  same output and manifest give the same key; a manifest replaced at the same URI gives another.
* Pending rows are cut into fixed shards in manifest order. A shard is written to staging only when all its
  rows are in, in one put (object stores) or write-then-rename (local disks), so a shard file is whole or
  absent. A rerun reads the finished shards and scores only the others.
* Commit: the shards are merged by score out of core (DuckDB) and streamed into one part file, which
  becomes visible whole: when its multipart upload completes (object stores) or when its hidden name is
  renamed (local disks). Readers see all of the run's rows or none. Then the summary, then staging is removed.
* Rows already in this ``run_date`` for the same model (any status) are never written again, so a rerun after
  the commit writes nothing twice.

Readers (pyarrow, DuckDB globs on ``*.parquet``, Spark) skip names starting with ``_`` or ``.``.
"""

from __future__ import annotations

import contextlib
import json
import posixpath
import uuid
from collections.abc import Iterator, Mapping
from typing import IO

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.batch.error_reasons import error_reason_sql

STATUS_OK = "ok"
STATUS_ERROR = "error"
STATUS_REJECTED = "rejected"
STATUSES = (STATUS_OK, STATUS_ERROR, STATUS_REJECTED)
PARTITION = "run_date"
STAGING = "_staging"
ROW_GROUP_SIZE = 16_384
# Columns the job's stages use beside the result's: a manifest column of one of these names is renamed too.
INTERNAL_COLUMNS = ("row_index", "shard", "data", "prepared")

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
    # What model_id names, as columns (before 2026-12 partitions had ``encoder`` instead: see README's migration).
    pa.field("scorer", pa.string(), nullable=False),
    pa.field("weights_sha256", pa.string(), nullable=False),
    pa.field("aux_model", pa.string()),
    pa.field("scored_at", pa.timestamp("us", tz="UTC"), nullable=False),
    pa.field("run_id", pa.string(), nullable=False),
])


def output_schema(extras: pa.Schema) -> pa.Schema:
    """The result schema followed by the manifest's extra columns.

    An extra column whose name is a result column, the partition or one of the stages' ``INTERNAL_COLUMNS``
    is renamed ``manifest_<name>``.
    """
    fields = list(RESULT_SCHEMA)
    taken = set(RESULT_SCHEMA.names) | {PARTITION, *INTERNAL_COLUMNS}
    for f in extras:
        name = f.name if f.name not in taken else f"manifest_{f.name}"
        fields.append(pa.field(name, f.type))
        taken.add(name)
    return pa.schema(fields)


def extra_column_names(extras: pa.Schema) -> dict[str, str]:
    """Manifest column name -> output column name, as ``output_schema`` names them."""
    schema = output_schema(extras)
    return dict(zip(extras.names, schema.names[len(RESULT_SCHEMA):], strict=True))


def protocol(fs: fsspec.AbstractFileSystem) -> str:
    """An fsspec file system's protocol, ``file`` for the local disk (which fsspec also calls ``local``)."""
    proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return "file" if proto in ("file", "local") else proto


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    """Whether an fsspec file system is the local disk (renames are atomic, files can be memory-mapped)."""
    return protocol(fs) == "file"


@contextlib.contextmanager
def atomic_target(fs: fsspec.AbstractFileSystem, path: str) -> Iterator[str]:
    """The name to write ``path`` under so that readers see the old file or the new one, never a part.

    An object store makes an object visible only when its upload completes, so there it is ``path`` itself. On
    a local disk it is a hidden, unique sibling, renamed over ``path`` when the block succeeds and removed when
    it fails; readers of the folder (pyarrow datasets included) skip hidden names.
    """
    target = path
    if is_local(fs):
        target = posixpath.join(posixpath.dirname(path), f".tmp-{uuid.uuid4().hex}-{posixpath.basename(path)}")
    try:
        yield target
    except BaseException:
        if target != path and fs.exists(target):
            fs.rm(target)
        raise
    if target != path:
        fs.mv(target, path)


@contextlib.contextmanager
def atomic_open(fs: fsspec.AbstractFileSystem, path: str) -> Iterator[IO[bytes]]:
    """``path`` open for writing, seen by readers whole or not at all, also when the block fails part-way.

    Closing an object store's file completes its upload with whatever was written, and so would the file's
    finaliser; a block that raises therefore abandons the upload instead (``discard``: s3fs aborts the multipart
    upload and its stored parts) and marks the file closed. On a local disk the file is closed and its hidden
    name removed (``atomic_target``).
    """
    with atomic_target(fs, path) as target:
        f = fs.open(target, "wb")
        try:
            yield f
        except BaseException:
            if is_local(fs):
                f.close()
            else:
                if callable(getattr(f, "discard", None)):
                    f.discard()
                f.closed = True
            raise
        f.close()


def write_parquet_atomically(fs: fsspec.AbstractFileSystem, path: str, table: pa.Table) -> None:
    """Write a Parquet file that readers see whole or not at all (see ``atomic_open``)."""
    with atomic_open(fs, path) as f:
        pq.write_table(table, f, row_group_size=ROW_GROUP_SIZE, compression="zstd")


class OutputError(ValueError):
    """An output location that cannot be written; the message names it, why, and what to do."""


_OUTPUT_REASONS = {
    FileNotFoundError: "a folder on its path does not exist or cannot be created",
    NotADirectoryError: "a part of its path is a file, not a folder",
    FileExistsError: "a part of its path is a file, not a folder",
    IsADirectoryError: "it is a folder, where a file is expected",
    PermissionError: "permission denied",
}


def check_writable(uri: str, storage_options: Mapping | None = None, *, flag: str = "--output",
                   folder: bool = True) -> None:
    """Make sure a command can write where it was told, before it reads weights or data.

    A folder output (the job's, training's) is created, a probe object written into it and removed, and the
    folders made for the probe are removed again; a file output (a report page, a selection) must not be a
    folder, and its folder is probed the same way. On an
    object store the probe is one small PUT and DELETE, so a missing bucket, a wrong endpoint or a read-only
    role fail here and not after minutes of reading weights.

    Raises:
        OutputError: One line: the flag, the URI (redacted), why, and that nothing was read.
    """
    from pipeline.batch.allowlist import redact_text, redact_uri

    try:
        fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
        path = path.rstrip("/") or "/"
        if folder and fs.isfile(path):
            raise OutputError(f"{flag} {redact_uri(uri)} is a file; give a folder (or bucket prefix)")
        if not folder and fs.isdir(path):
            raise OutputError(f"{flag} {redact_uri(uri)} is a folder; give a file name")
        target = path if folder else posixpath.dirname(path) or "."
        created = []
        if is_local(fs):  # (s3fs would create a missing bucket: a typo must not do that)
            missing = target
            while missing not in ("", "/") and not fs.exists(missing):
                created.append(missing)
                missing = posixpath.dirname(missing)
            fs.makedirs(target, exist_ok=True)
        probe = posixpath.join(target, f".dgiqa-probe-{uuid.uuid4().hex}")
        fs.pipe_file(probe, b"")
        fs.rm_file(probe)
        for folder_made in created:  # leave no trace: the command creates them when it writes
            fs.rmdir(folder_made)
    except OutputError:
        raise
    except Exception as exc:  # noqa: BLE001 - any backend's failure, told in one line
        reason = next((text for kind, text in _OUTPUT_REASONS.items() if isinstance(exc, kind)), None)
        if isinstance(exc, FileNotFoundError) and "://" in uri and not uri.startswith("file:"):
            reason = "its bucket or container does not exist"
        elif isinstance(exc, FileNotFoundError):
            existing = posixpath.dirname(uri.removeprefix("file://").rstrip("/")) or "/"
            while existing not in ("", "/") and not posixpath.isdir(existing):
                existing = posixpath.dirname(existing)
            reason = (f"a folder on its path does not exist, and none can be created under {existing or '/'} "
                      "(a read-only or virtual file system?)")
        reason = reason or redact_text(f"{type(exc).__name__}: {exc}".splitlines()[0])
        raise OutputError(f"cannot write to {flag} {redact_uri(uri)}: {reason}") from None


class RunOutput:
    """Where one run's rows go: shards in staging, then one committed part file and a summary.

    Args:
        output: Output root URI.
        run_date: Partition value (``YYYY-MM-DD``).
        run_key: Deterministic key of the run (see the module docstring).
        schema: The full output schema (``output_schema``).
        storage_options: fsspec options.
    """

    def __init__(self, output: str, run_date: str, run_key: str, schema: pa.Schema,
                 storage_options: Mapping | None = None):
        self.run_date, self.run_key, self.schema = run_date, run_key, schema
        self.fs, root = fsspec.core.url_to_fs(output, **(storage_options or {}))
        self.root = root.rstrip("/")
        self.staging = posixpath.join(self.root, STAGING, f"{run_date}_{run_key}")
        self.partition = posixpath.join(self.root, f"{PARTITION}={run_date}")
        self.part_path = posixpath.join(self.partition, f"part-{run_key}.parquet")
        self.fs.makedirs(self.staging, exist_ok=True)

    def _shard_path(self, shard: int) -> str:
        return posixpath.join(self.staging, f"shard-{shard:06d}.parquet")

    def _staged_shards(self) -> list[str]:
        staged = self.fs.ls(self.staging, detail=False) if self.fs.exists(self.staging) else []
        return sorted(p for p in staged if posixpath.basename(p).startswith("shard-"))

    def finished_shards(self, expected: Mapping[int, int]) -> dict[int, int]:
        """Shards a killed attempt of this run already finished: shard -> its number of rows.

        A shard counts only if its file is readable Parquet holding exactly the number of rows it should (the
        run key already pins which rows those are); anything else is removed and done again. Only the files'
        footers are read.
        """
        found = {}
        for path in self._staged_shards():
            name = posixpath.basename(path)
            try:
                shard = int(name.removeprefix("shard-").removesuffix(".parquet"))
                with self.fs.open(path, "rb") as f:
                    rows = pq.read_metadata(f).num_rows
            except Exception:  # noqa: BLE001 - an unreadable or stray shard is redone
                shard, rows = None, None
            if shard is not None and rows == expected.get(shard):
                found[shard] = rows
            else:
                self.fs.rm(path)
        return found

    def write_shard(self, shard: int, table: pa.Table) -> None:
        """Stage one finished shard: ``row_index`` plus the output schema's columns, sorted by score."""
        columns = ["row_index", *self.schema.names]
        table = table.select(columns).sort_by([("score", "ascending"), ("row_index", "ascending")])
        write_parquet_atomically(self.fs, self._shard_path(shard), table)

    def _staged_stream(self) -> pa.RecordBatchReader | None:
        """The staged shards' rows, streamed file by file (Arrow's dataset scanner reads too far ahead)."""
        shards = self._staged_shards()
        if not shards:
            return None
        schema = pa.schema([pa.field("row_index", pa.int64()), *self.schema])

        def batches():
            for path in shards:
                with self.fs.open(path, "rb") as f:
                    for batch in pq.ParquetFile(f, pre_buffer=False).iter_batches(batch_size=ROW_GROUP_SIZE):
                        yield batch.cast(schema)

        return pa.RecordBatchReader.from_batches(schema, batches())

    def staged_counts(self, memory_mb: int = 256) -> tuple[dict[str, int], dict[str, int]]:
        """Counts of the staged rows by status, and the 20 commonest causes of failure (``error_reasons``)."""
        from pipeline.batch.plan import duckdb_connection

        if not self._staged_shards():
            return {}, {}
        with duckdb_connection(memory_mb) as con:
            con.register("staged", self._staged_stream())
            statuses = dict(con.sql("SELECT status, count(*) FROM staged GROUP BY status").fetchall())
            con.register("staged", self._staged_stream())
            reasons = con.sql(f"""
                SELECT {error_reason_sql('error')} AS reason, count(*) AS n FROM staged
                WHERE error IS NOT NULL AND error <> '' GROUP BY reason ORDER BY n DESC, reason LIMIT 20""")
            return statuses, dict(reasons.fetchall())

    def commit(self, summary: Mapping, memory_mb: int = 256) -> str:
        """Turn the staged shards into the run's part file, then write the summary; returns its path.

        The shards are merged by score out of core (DuckDB, ``memory_mb`` of memory, spilling to local disk)
        and streamed into one Parquet object in batches, so no part of the night sits whole in the driver.
        Readers see the whole file or none: an object store makes it visible when its (multipart) upload
        completes, a local disk when its hidden name is renamed; a failure part-way leaves no file (``atomic_open``).

        Idempotent: after a kill anywhere in here, running it again finishes the same commit.
        """
        from pipeline.batch.plan import duckdb_connection

        staged = self._staged_stream()
        if not self.fs.exists(self.part_path) and staged is not None:
            self.fs.makedirs(self.partition, exist_ok=True)
            columns = ", ".join('"' + n.replace('"', '""') + '"' for n in self.schema.names)
            with duckdb_connection(memory_mb) as con:
                con.register("staged", staged)
                merged = con.sql(f"SELECT {columns} FROM staged ORDER BY score ASC NULLS LAST, row_index")
                with (atomic_open(self.fs, self.part_path) as f,
                      pq.ParquetWriter(f, self.schema, compression="zstd") as writer):
                    for batch in merged.to_arrow_reader(ROW_GROUP_SIZE):
                        writer.write_table(pa.Table.from_batches([batch]).cast(self.schema),
                                           row_group_size=ROW_GROUP_SIZE)
        summary_path = posixpath.join(self.partition, f"_summary-{self.run_key}.json")
        self.fs.makedirs(self.partition, exist_ok=True)
        with self.fs.open(summary_path, "w") as f:
            f.write(json.dumps(summary, indent=2, sort_keys=True))
        self.remove_staging()
        return summary_path

    def remove_staging(self) -> None:
        """Remove this run's staging folder, and leftovers of killed attempts of the same job on the same date.

        The same job is the part of the run key before ``-`` (manifest, model, options); other jobs writing to
        the same output keep their staging.
        """
        base = posixpath.join(self.root, STAGING)
        if not self.fs.exists(base):
            return
        same_job = f"{self.run_date}_{self.run_key.split('-')[0]}-"
        for path in self.fs.ls(base, detail=False):
            if posixpath.basename(path.rstrip("/")).startswith(same_job):
                self.fs.rm(path, recursive=True)
        try:
            self.fs.rmdir(base)  # only when empty: runs of other dates may be staging
        except OSError:
            pass


# A message's kind, for counting: URIs masked, the part before the first ': ', at most 80 characters.


DONE_COLUMNS = ("uri", "etag", "size_bytes")


def _partition_value(path: str, root: str) -> str | None:
    for part in path[len(root):].split("/"):
        if part.startswith(f"{PARTITION}="):
            return part.split("=", 1)[1]
    return None


def _may_hold(stats, value: str) -> bool:
    """Whether a row group whose statistics are ``stats`` may hold ``value`` (no statistics: it may)."""
    if stats is None or not stats.has_min_max:
        return True
    return stats.min <= value <= stats.max


def iter_done_rows(fs: fsspec.AbstractFileSystem, root: str, model_id: str, run_date: str,
                   incremental: bool = True, batch_rows: int = 65_536) -> Iterator[pa.RecordBatch]:
    """The history's rows that count as done for ``model_id`` tonight, as ``DONE_COLUMNS`` batches, streamed.

    Done means scored ``ok`` in any partition, or any row in ``run_date``'s own partition: error rows of
    earlier nights are tried again, while a rerun of the same night never writes a row twice. ``--full``
    (not ``incremental``) keeps only the second.

    File by file, row group by row group, only the key columns and the filter's: row groups of other models
    (a part file holds one) are skipped by their statistics. (Arrow's dataset scanner, with the same filter
    pushed down, held about 1 GB more at 30M rows: its read-ahead.)
    """
    root = root.rstrip("/")
    for path in visible_parquet_files(fs, root):
        tonight = _partition_value(path, root) == run_date
        if not (incremental or tonight):
            continue
        try:
            yield from _done_rows_of(fs, path, model_id, tonight, batch_rows)
        except FileNotFoundError:  # removed since it was listed
            continue
        except OSError as exc:
            # A 503, a timeout, a permission error: skipping the file would plan its rows again, and a rerun of
            # the same night would write them twice. The plan stops; nothing is written.
            from pipeline.batch.allowlist import redact_text, redact_uri

            raise HistoryUnreadable(
                f"cannot read {redact_uri(path)} to find the rows already written: "
                f"{redact_text(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)}; nothing was "
                "written, rerun when the store answers") from None


class HistoryUnreadable(OSError):
    """A committed part file could not be read while the night was planned (the message says which and why)."""


def _done_rows_of(fs: fsspec.AbstractFileSystem, path: str, model_id: str, tonight: bool,
                  batch_rows: int) -> Iterator[pa.RecordBatch]:
    """One part file's share of ``iter_done_rows``; nothing for a file that is no Parquet file (stray or torn)."""
    with fs.open(path, "rb") as f:
        try:
            parquet = pq.ParquetFile(f, pre_buffer=False)
        except pa.ArrowInvalid:
            return
        names = parquet.schema_arrow.names
        if not all(c in names for c in (*DONE_COLUMNS, "model_id", "status")):
            return
        model_col, status_col = names.index("model_id"), names.index("status")
        groups = [g for g in range(parquet.num_row_groups)
                  if _may_hold(parquet.metadata.row_group(g).column(model_col).statistics, model_id)
                  and (tonight or _may_hold(parquet.metadata.row_group(g).column(status_col).statistics,
                                            STATUS_OK))]
        for batch in parquet.iter_batches(batch_size=batch_rows, row_groups=groups,
                                          columns=[*DONE_COLUMNS, "model_id", "status"]) if groups else ():
            keep = pc.equal(batch.column("model_id"), model_id)
            if not tonight:
                keep = pc.and_(keep, pc.equal(batch.column("status"), STATUS_OK))
            yield batch.filter(pc.fill_null(keep, False)).select(list(DONE_COLUMNS))


def visible_parquet_files(fs: fsspec.AbstractFileSystem, root: str) -> list[str]:
    """The committed part files under an output root (staging and hidden files are not)."""
    root = root.rstrip("/")
    if not fs.exists(root):
        return []
    return sorted(p for p in fs.find(root) if p.endswith(".parquet")
                  and not any(part.startswith(("_", ".")) for part in p[len(root):].split("/")))
