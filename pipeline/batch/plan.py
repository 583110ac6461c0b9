"""Planning a night out of core: manifest -> allowlist -> already done -> duplicates -> shards of work.

A nightly manifest can name every object of a bucket (10^8 rows) and the output history every row ever
written (10^9), so the driver holds neither. The manifest streams through in Arrow batches (normalised and
checked against the allowlist by Arrow compute, see ``pipeline.batch.manifest`` and ``pipeline.batch.allowlist``) into
a DuckDB database on local disk; DuckDB, with a memory limit and a spill folder, then does the set work:
the anti-join against the history (its done rows streamed from the output's Parquet into a table, see
``pipeline.batch.output.iter_done_rows``; the join in hash passes that each fit the memory limit), the
duplicates, and the numbering into shards. What comes back to the driver is counts: a number of rows per
shard and a fingerprint of the night's work. Rows leave DuckDB only as streams of batches, into staged
shards and into the plan files that the decode tasks read.

Why DuckDB rather than Ray Data for this: on one node it sorts, joins and aggregates out of core at millions
of rows a second with a bounded memory, without first moving the manifest into an object store; planning
needs no GPU and no cluster. See ``docs/ARCHITECTURE.md`` for the measurements.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from itertools import chain

import duckdb
import numpy as np
import pyarrow as pa

from pipeline.batch.allowlist import Allowlist
from pipeline.batch.manifest import ROW_ERROR, ManifestReader, extra_columns
from pipeline.batch.output import (
    STATUS_ERROR,
    STATUS_OK,
    STATUS_REJECTED,
    extra_column_names,
    iter_done_rows,
)
from pipeline.limits import DEFAULT_PLAN_MEMORY_MB

logger = logging.getLogger(__name__)

REJECTION = "__rejection__"
BATCH_ROWS = 65_536
# Columns of the plan that travel with a row to the output; the rest of the output is the result's.
PLAN_COLUMNS = ("row_index", "shard", "uri", "etag", "size_bytes", "status", "error")


@dataclass(frozen=True)
class PlannerConfig:
    """How much of the driver's node the planner may use.

    Attributes:
        memory_mb: DuckDB's memory limit; past it, joins, sorts and aggregates spill to ``spill_dir``.
        spill_dir: Local folder for DuckDB's database and spill files (default: a fresh temporary folder).
        threads: DuckDB threads (default: the node's CPUs).
    """

    memory_mb: int = DEFAULT_PLAN_MEMORY_MB
    spill_dir: str | None = None
    threads: int | None = None


@dataclass
class Plan:
    """A night's work, held in DuckDB; the driver keeps counts only.

    Attributes:
        manifest_rows: Rows read from the manifest (after ``--limit``).
        done_before: Manifest rows already done by the same weights (skipped).
        shard_rows: Rows each shard holds, by shard number (the last of each kind may hold fewer).
        decided_shards: Shards ``0 .. decided_shards - 1`` hold rows decided here (rejected, duplicates,
            unusable manifest rows); the others hold rows to score.
        fingerprint: Hash of every row to write (index, URI, ETag, size, decision): a night whose manifest
            changed in any of these gets other shards.
        extras: Output schema of the manifest's extra columns, already under their output names.
    """

    con: duckdb.DuckDBPyConnection = field(repr=False)
    manifest_rows: int
    done_before: int
    shard_rows: np.ndarray
    decided_shards: int
    fingerprint: str
    extras: pa.Schema
    _tmp: tempfile.TemporaryDirectory | None = field(default=None, repr=False)

    @property
    def rows_to_write(self) -> int:
        """Rows this run writes: every manifest row not done before."""
        return int(self.shard_rows.sum())

    @property
    def decided_rows(self) -> int:
        """Rows decided on the driver (no model needed)."""
        return int(self.shard_rows[:self.decided_shards].sum())

    def rows(self, scored: bool, skip_shards: Mapping[int, object] | None = None,
             batch_rows: int = BATCH_ROWS) -> pa.RecordBatchReader:
        """The plan's rows to score (``scored``) or decided here, in manifest order, outside ``skip_shards``.

        Columns: ``PLAN_COLUMNS`` and the extras.
        """
        skip = pa.table({"shard": pa.array(sorted(skip_shards or ()), pa.int64())})
        self.con.register("skip_shards", skip)
        columns = ", ".join(_quote(c) for c in (*PLAN_COLUMNS, *self.extras.names))
        op = "=" if scored else "<>"
        query = (f"SELECT {columns} FROM work WHERE status {op} '{STATUS_OK}' "
                 "AND shard NOT IN (SELECT shard FROM skip_shards) ORDER BY row_index")
        return self.con.sql(query).to_arrow_reader(batch_rows)

    def close(self) -> None:
        """Close DuckDB and remove its files."""
        self.con.close()
        if self._tmp is not None:
            self._tmp.cleanup()


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _connect(config: PlannerConfig) -> tuple[duckdb.DuckDBPyConnection, tempfile.TemporaryDirectory]:
    tmp = tempfile.TemporaryDirectory(prefix="dgiqa-plan-", dir=config.spill_dir)
    con = duckdb.connect(os.path.join(tmp.name, "plan.duckdb"), config={
        "memory_limit": f"{config.memory_mb}MB",
        "temp_directory": os.path.join(tmp.name, "spill"),
        "threads": config.threads or os.cpu_count() or 1,
        "preserve_insertion_order": False,
        "autoload_known_extensions": False,  # nothing is downloaded; the driver hands DuckDB its inputs
        "autoinstall_known_extensions": False,
    })
    return con, tmp


@contextlib.contextmanager
def duckdb_connection(memory_mb: int, spill_dir: str | None = None) -> Iterator[duckdb.DuckDBPyConnection]:
    """A DuckDB of its own for one out-of-core step (a merge, a count), removed with its spill files."""
    con, tmp = _connect(PlannerConfig(memory_mb=memory_mb, spill_dir=spill_dir))
    try:
        yield con
    finally:
        con.close()
        tmp.cleanup()


def _checked_batches(part: Iterator[pa.RecordBatch], allowlist: Allowlist, start: int,
                     limit: int | None) -> Iterator[pa.RecordBatch]:
    """A manifest file's batches numbered from ``start``, URIs checked; stops at ``limit`` rows in all."""
    offset = start
    schema = None
    for batch in part:
        if limit is not None and offset + batch.num_rows > limit:
            batch = batch.slice(0, max(0, limit - offset))
        if schema is None:
            schema = batch.schema
        elif batch.schema != schema:
            batch = batch.cast(schema)
        uris, errors = allowlist.check_array(batch.column("uri"))
        names = extra_column_names(pa.schema([batch.schema.field(n) for n in extra_columns(batch.schema.names)]))
        columns = {"row_index": pa.array(np.arange(offset, offset + batch.num_rows), pa.int64()), "uri": uris,
                   "etag": batch.column("etag"), "size_bytes": batch.column("size_bytes"),
                   ROW_ERROR: batch.column(ROW_ERROR), REJECTION: errors}
        columns.update({out: batch.column(name) for name, out in names.items()})
        offset += batch.num_rows
        yield pa.RecordBatch.from_pydict(columns)
        if limit is not None and offset >= limit:
            return


def _load_manifest(con: duckdb.DuckDBPyConnection, reader: ManifestReader, allowlist: Allowlist,
                   limit: int | None) -> int:
    """Stream every manifest file into its own DuckDB table, then one ``manifest`` table of them all.

    Files whose columns infer differently are united by name; a column whose type differs becomes text.
    """
    rows, tables = 0, []
    for k, part in enumerate(reader.parts()):
        if limit is not None and rows >= limit:
            break
        batches = _checked_batches(part, allowlist, rows, limit)
        first = next(batches, None)
        if first is None:
            continue
        _create_from_stream(con, f"manifest_{k}", "SELECT * FROM stream", first.schema, chain([first], batches))
        tables.append(f"manifest_{k}")
        rows += con.sql(f"SELECT count(*) FROM manifest_{k}").fetchall()[0][0]
    if not tables:
        raise AssertionError("a manifest yields at least one batch per file")
    if len(tables) == 1:
        con.execute(f"ALTER TABLE {tables[0]} RENAME TO manifest")
        return rows
    union = " UNION ALL BY NAME ".join(f"SELECT * FROM {t}" for t in tables)
    con.execute(f"CREATE TABLE manifest AS {union}")
    for t in tables:
        con.execute(f"DROP TABLE {t}")
    return rows


def _create_from_stream(con: duckdb.DuckDBPyConnection, table: str, query: str, schema: pa.Schema,
                        batches: Iterator[pa.RecordBatch]) -> None:
    """``CREATE TABLE table AS query``, where ``query`` reads ``batches`` as the relation ``stream``.

    DuckDB reports an exception raised inside a stream it reads as text only, in an error of its own; the
    exception itself is raised instead (a ``ManifestError`` naming the manifest, a ``HistoryUnreadable`` naming
    the part file), so a file that fails part-way is the one-line error its reader gives.
    """
    failures: list[BaseException] = []

    def kept() -> Iterator[pa.RecordBatch]:
        try:
            yield from batches
        except Exception as exc:
            failures.append(exc)
            raise

    con.register("stream", pa.RecordBatchReader.from_batches(schema, kept()))
    try:
        con.execute(f"CREATE TABLE {table} AS {query}")
    except duckdb.Error:
        if failures:
            raise failures[0] from None
        raise
    finally:
        con.unregister("stream")


JOIN_BYTES_PER_ROW = 40  # memory limit a history row needs in one anti-join pass (measured with a margin)


def _join_passes(history_rows: int, memory_mb: int) -> int:
    """Hash partitions of the anti-join, so that each pass's share of the history fits half the memory limit."""
    return max(1, -(-history_rows * JOIN_BYTES_PER_ROW // (memory_mb * 2**20 // 2)))


def make_plan(reader: ManifestReader, allowlist: Allowlist, output_fs, output_root: str, model_id: str,
              run_date: str, incremental: bool, shard_rows: int, limit: int | None = None,
              config: PlannerConfig | None = None) -> Plan:
    """Plan a night: which rows to write, decided how, cut into shards (see the module docstring).

    Args:
        reader: The opened manifest.
        allowlist: Where images may be read from; other rows are ``rejected``.
        output_fs: fsspec file system of the output.
        output_root: The output's root path on ``output_fs``.
        model_id: The weights' id: rows it scored ``ok`` before (or wrote tonight) are skipped.
        run_date: Tonight's partition.
        incremental: False to redo rows done on earlier nights (``--full``); tonight's are never redone.
        shard_rows: Rows per staged shard.
        limit: Plan only the first ``limit`` manifest rows.
        config: DuckDB's memory limit, spill folder and threads.

    Raises:
        ManifestError: The manifest cannot be read.
    """
    config = config or PlannerConfig()
    con, tmp = _connect(config)
    try:
        n = _load_manifest(con, reader, allowlist, limit)
        # The history's rows that count as done (see ``pipeline.batch.output.iter_done_rows``).
        done = pa.schema([("uri", pa.string()), ("etag", pa.string()), ("size_bytes", pa.int64())])
        history = iter_done_rows(output_fs, output_root, model_id, run_date, incremental, BATCH_ROWS)
        _create_from_stream(con, "done", "SELECT uri, coalesce(etag, '') AS e, coalesce(size_bytes, -1) AS s "
                                         "FROM stream", done, (b.cast(done) for b in history))
        # Not done before: an anti-join on the object version (URI, ETag, size). DuckDB's hash join spills,
        # but past a few tens of bytes of memory limit per history row it fails (30M rows against 256 MB,
        # measured); so the join runs in passes over hash partitions of the URI, each one's hash table
        # within the limit. A night whose history fits makes one pass.
        passes = _join_passes(con.sql("SELECT count(*) FROM done").fetchall()[0][0], config.memory_mb)
        con.execute("CREATE TABLE todo AS SELECT * FROM manifest LIMIT 0")
        for k in range(passes):
            part = f"hash(uri) % {passes} = {k}" if passes > 1 else "true"
            con.execute(f"""
                INSERT INTO todo SELECT m.* FROM (SELECT * FROM manifest WHERE {part}) m
                ANTI JOIN (SELECT * FROM done WHERE {part}) d
                ON d.uri = m.uri AND d.e = coalesce(m.etag, '') AND d.s = coalesce(m.size_bytes, -1)""")
        con.execute("DROP TABLE manifest")
        con.execute("DROP TABLE done")
        todo = con.sql("SELECT count(*) FROM todo").fetchall()[0][0]
        # Later rows naming the same object version as an earlier row are written once, as errors. Only rows that
        # will be scored count as earlier: a copy after a row refused for its own fault is scored itself.
        con.execute(f"""
            CREATE TABLE firsts AS SELECT uri, coalesce(etag, '') AS e, coalesce(size_bytes, -1) AS s,
                   min(row_index) AS first_row
            FROM todo WHERE {ROW_ERROR} IS NULL AND {REJECTION} IS NULL GROUP BY ALL HAVING count(*) > 1""")
        extras = [c for c in con.sql("SELECT * FROM todo LIMIT 0").columns
                  if c not in ("row_index", "uri", "etag", "size_bytes", ROW_ERROR, REJECTION)]
        extra_sql = "".join(f", t.{_quote(c)}" for c in extras)
        con.execute(f"""
            CREATE TABLE decided AS SELECT t.row_index, t.uri, t.etag, t.size_bytes{extra_sql},
                CASE WHEN t.{ROW_ERROR} IS NOT NULL THEN '{STATUS_ERROR}'
                     WHEN t.{REJECTION} IS NOT NULL THEN '{STATUS_REJECTED}'
                     WHEN f.first_row < t.row_index THEN '{STATUS_ERROR}'
                     ELSE '{STATUS_OK}' END AS status,
                CASE WHEN t.{ROW_ERROR} IS NOT NULL THEN t.{ROW_ERROR}
                     WHEN t.{REJECTION} IS NOT NULL THEN t.{REJECTION}
                     WHEN f.first_row < t.row_index THEN 'duplicate of manifest row ' || f.first_row ||
                          ' (same URI, ETag and size): scored once, there'
                     END AS error
            FROM todo t LEFT JOIN firsts f
            ON f.uri = t.uri AND f.e = coalesce(t.etag, '') AND f.s = coalesce(t.size_bytes, -1)""")
        con.execute("DROP TABLE todo")
        n_decided = con.sql(f"SELECT count(*) FROM decided WHERE status <> '{STATUS_OK}'").fetchall()[0][0]
        d_shards = -(-n_decided // shard_rows)
        # Decided rows fill shards 0 .. d_shards - 1, rows to score the ones after, both in manifest order.
        con.execute(f"""
            CREATE TABLE work AS SELECT *,
                CASE WHEN status = '{STATUS_OK}' THEN {d_shards} ELSE 0 END +
                (row_number() OVER (PARTITION BY status = '{STATUS_OK}' ORDER BY row_index) - 1) // {shard_rows}
                AS shard
            FROM decided""")
        con.execute("DROP TABLE decided")
        counts = con.sql("SELECT shard, count(*) FROM work GROUP BY shard ORDER BY shard").fetchnumpy()
        shard_sizes = np.zeros(int(counts["shard"].max()) + 1 if len(counts["shard"]) else 0, np.int64)
        shard_sizes[counts["shard"]] = counts["count_star()"]
        digest = con.sql("""
            SELECT count(*), bit_xor(h), sum(h::HUGEINT) FROM (
                SELECT hash(row_index, uri, etag, size_bytes, status, error, shard) AS h FROM work)""").fetchall()[0]
        fingerprint = hashlib.sha256(repr(digest).encode()).hexdigest()
        extras_schema = (con.sql(f"SELECT {', '.join(_quote(c) for c in extras)} FROM work LIMIT 0")
                         .to_arrow_table().schema if extras else pa.schema([]))
        logger.info("planned %d manifest rows: %d done before, %d decided on the driver, %d to score",
                    n, n - todo, n_decided, todo - n_decided)
        return Plan(con, n, n - todo, shard_sizes, d_shards, fingerprint, extras_schema, tmp)
    except BaseException:
        con.close()
        tmp.cleanup()
        raise
