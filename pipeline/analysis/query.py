"""Read the scores back: select images by score, date, model and status, latest result per image.

The job's output is Hive-partitioned by ``run_date`` and each part file is sorted by score in row groups of
16,384 rows, so a score range touches few row groups and a date range few files. Every selection here goes
through pyarrow dataset filters: partition pruning drops whole files by their ``run_date=`` folder, row-group
statistics drop row groups whose score range cannot match, and only then are rows read. ``ScanStats``
reports what was read, so users (and the tests) can see the pruning happen.

"Latest" means the newest ``run_date`` row for each ``(uri, model_id)``, whatever its status: the newest
attempt says what is true of the object now (a changed image that failed tonight must not keep yesterday's
score). Within one night an ``ok`` row wins over an error row of a duplicate manifest entry. Score and status
conditions apply to those latest rows.
"""

from __future__ import annotations

import contextlib
import math
import posixpath
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import BinaryIO

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from pipeline.analysis.formats import FORMATS
from pipeline.batch.output import PARTITION, RESULT_SCHEMA, STATUS_OK, STATUSES
from pipeline.batch.run_dates import check_run_date
from pipeline.limits import DEFAULT_PLAN_MEMORY_MB

PARTITIONING = pads.partitioning(pa.schema([pa.field(PARTITION, pa.string())]), flavor="hive")
KEY = ("uri", "model_id")
# The columns a selection writes unless asked otherwise: enough to feed the next job (uri, etag and size keep
# its incremental mode working) and to see why each row was chosen. Manifest columns the job carried follow.
DEFAULT_COLUMNS = ("uri", "score", "score_std", "model_id", PARTITION, "etag", "size_bytes", "width", "height")


class QueryError(ValueError):
    """The scores cannot be queried as asked (no output there, an impossible selection); the message says why."""


def open_scores(uri: str, storage_options: Mapping | None = None) -> pads.Dataset:
    """The job output under ``uri`` as a pyarrow dataset, ``run_date`` a string partition column.

    The schema is the union over all part files: runs over manifests with other extra columns add theirs.
    Staging folders and summaries (names starting with ``_``) are not part of it.

    Raises:
        QueryError: Nothing readable is there.
    """
    fs, root = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    root = root.rstrip("/")
    if not fs.isdir(root):
        raise QueryError(f"no scores at {uri}: not a folder or prefix")
    found = pads.dataset(root, filesystem=fs, format="parquet", partitioning=PARTITIONING,
                         exclude_invalid_files=True)
    if not found.files:
        raise QueryError(f"no scores at {uri}: no Parquet files under run_date=... partitions")
    schemas = [fragment.physical_schema for fragment in found.get_fragments()]
    merged = _merge_schemas([*schemas, PARTITIONING.schema])
    return pads.dataset(found.files, filesystem=found.filesystem, format="parquet", schema=merged,
                        partitioning=PARTITIONING, partition_base_dir=root)


def _merge_schemas(schemas: Sequence[pa.Schema]) -> pa.Schema:
    """The union of the part files' schemas, by name; a column whose types cannot be unified is read as text.

    The job carries manifest columns as read, so one night's ``id`` from a CSV is text and another's from Parquet
    an integer. Such a column becomes a string everywhere (Arrow casts each file's values as it reads them) rather
    than making the whole history unreadable.
    """
    try:
        return pa.unify_schemas(schemas, promote_options="permissive")
    except (pa.ArrowTypeError, pa.ArrowInvalid):
        pass
    types: dict[str, list[pa.DataType]] = {}
    for schema in schemas:
        for field in schema:
            types.setdefault(field.name, []).append(field.type)
    fields = []
    for name, found in types.items():
        try:
            merged = pa.unify_schemas([pa.schema([pa.field(name, t)]) for t in found], promote_options="permissive")
            fields.append(merged.field(name))
        except (pa.ArrowTypeError, pa.ArrowInvalid):
            if name in RESULT_SCHEMA.names:
                raise QueryError(f"the scores' column {name!r} has types {sorted(set(map(str, found)))} in "
                                 "different part files; these are not files the job wrote") from None
            fields.append(pa.field(name, pa.string()))
    return pa.schema(fields)


@dataclass(frozen=True)
class ScoreFilter:
    """Which rows a selection keeps. All conditions combine with AND; unset ones do not filter.

    Attributes:
        min_score: Keep scores >= this.
        max_score: Keep scores <= this.
        top: Keep the ``ceil(top * N)`` highest-scoring ``ok`` rows (ties broken by uri), N counted after the
            other conditions.
        bottom: The same for the lowest-scoring rows.
        quantiles: ``(lo, hi)``: keep scores between these quantiles of the ``ok`` rows' scores (inclusive).
        date_from: First ``run_date`` (inclusive, ``YYYY-MM-DD``).
        date_to: Last ``run_date`` (inclusive).
        model_id: Only this model's rows.
        statuses: Only rows with these statuses; ``None`` keeps all. A score condition keeps only ``ok`` rows,
            the only ones with scores.
        latest: One row per ``(uri, model_id)``: its newest ``run_date`` (see the module docstring). Off,
            every night's row is a candidate.
    """

    min_score: float | None = None
    max_score: float | None = None
    top: float | None = None
    bottom: float | None = None
    quantiles: tuple[float, float] | None = None
    date_from: str | None = None
    date_to: str | None = None
    model_id: str | None = None
    statuses: tuple[str, ...] | None = None
    latest: bool = True

    def __post_init__(self):
        if sum(v is not None for v in (self.top, self.bottom, self.quantiles)) > 1:
            raise QueryError("choose one of --top, --bottom and --quantiles")
        for name in ("top", "bottom"):
            value = getattr(self, name)
            if value is not None and not 0 < value <= 1:
                raise QueryError(f"--{name} is a fraction in (0, 1], got {value}")
        if self.quantiles is not None and not 0 <= self.quantiles[0] < self.quantiles[1] <= 1:
            raise QueryError(f"--quantiles must be LO,HI with 0 <= LO < HI <= 1, got {self.quantiles}")
        if self.min_score is not None and self.max_score is not None and self.min_score > self.max_score:
            raise QueryError(f"--min-score {self.min_score} is above --max-score {self.max_score}")
        for flag, value in (("--from", self.date_from), ("--until", self.date_to)):
            if value is not None:
                check_run_date(value, flag, QueryError)
        if self.date_from and self.date_to and self.date_from > self.date_to:
            raise QueryError(f"--from {self.date_from} is after --until {self.date_to}")
        unknown = set(self.statuses or ()) - set(STATUSES)
        if unknown:
            raise QueryError(f"unknown status {sorted(unknown)}; statuses are {', '.join(STATUSES)}")

    @property
    def ranked(self) -> bool:
        """Whether the selection depends on the score distribution (top, bottom, quantiles)."""
        return self.top is not None or self.bottom is not None or self.quantiles is not None


@dataclass
class ScanStats:
    """What a selection read: files and row groups after pruning, out of how many.

    Attributes:
        files_total: Part files in the dataset.
        files_read: Part files left after partition pruning.
        row_groups_total: Row groups in the files left after partition pruning.
        row_groups_read: Row groups whose statistics could match, the only ones whose rows were read.
        rows_read: Rows in the row groups read.
        rows_selected: Rows in the result.
        key_rows_read: Rows scanned (a few narrow columns) to find each image's latest row or the
            score distribution; 0 when neither was needed.
        rows_before_uris: With ``uris``: the rows the filter keeps before that restriction (of latest rows,
            the images the selection knows), counted in DuckDB; else None.
    """

    files_total: int = 0
    files_read: int = 0
    row_groups_total: int = 0
    row_groups_read: int = 0
    rows_read: int = 0
    rows_selected: int = 0
    key_rows_read: int = 0
    rows_before_uris: int | None = None

    def describe(self) -> str:
        """One line for people: what was selected and what was read to select it."""
        return (f"selected {self.rows_selected} rows; read {self.files_read} of {self.files_total} files, "
                f"{self.row_groups_read} of {self.row_groups_total} row groups ({self.rows_read} rows)"
                + (f", scanned {self.key_rows_read} rows of key columns" if self.key_rows_read else ""))


def _base_filter(flt: ScoreFilter, statuses: Sequence[str] | None) -> pc.Expression | None:
    """Conditions that do not depend on which row is the latest: dates, model, and the given statuses."""
    parts = []
    if flt.date_from:
        parts.append(pc.field(PARTITION) >= flt.date_from)
    if flt.date_to:
        parts.append(pc.field(PARTITION) <= flt.date_to)
    if flt.model_id:
        parts.append(pc.field("model_id") == flt.model_id)
    if statuses is not None:
        parts.append(pc.field("status").isin(list(statuses)))
    return _and(parts)


def _and(parts: Sequence[pc.Expression]) -> pc.Expression | None:
    out = None
    for part in parts:
        out = part if out is None else out & part
    return out


def _score_filter(low: float | None, high: float | None) -> pc.Expression | None:
    parts = []
    if low is not None:
        parts.append(pc.field("score") >= low)
    if high is not None:
        parts.append(pc.field("score") <= high)
    return _and(parts)


_WINNER = f"""row_number() OVER (PARTITION BY uri, model_id
                                  ORDER BY {PARTITION} DESC, (status = '{STATUS_OK}') DESC, scored_at DESC)"""
# Highest score first, then uri; rows without a score (or with a NaN one, which no run writes any more) last.
_ORDER = "score IS NULL, coalesce(isnan(score), false), score DESC, uri, model_id, run_date"
_ORDER_REVERSED = "score IS NULL, coalesce(isnan(score), false), score ASC, uri DESC, model_id DESC, run_date DESC"


def parquet_source(con, dataset: pads.Dataset, files: Sequence[str], columns: Sequence[str]) -> tuple[str, list]:
    """SQL for DuckDB's own Parquet reader over ``files`` of the dataset, and its parameter.

    No files (no partition of the selected dates): an empty table of ``columns``, in the dataset's types.

    DuckDB reads the files itself (a remote file system is handed to it through fsspec), so what it holds stays
    within its memory limit; an Arrow stream copied into a DuckDB table held about 100 bytes a row beyond it.
    Columns a file lacks (written before they existed) read as nulls; ``run_date`` comes from the folder name.
    """
    import pyarrow.fs as pafs

    if not files:
        con.register("no_rows", pa.schema([dataset.schema.field(c) for c in columns]).empty_table())
        return "no_rows", []
    if isinstance(dataset.filesystem, pafs.PyFileSystem):
        fs = dataset.filesystem.handler.fs
        protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
        if not protocols & set(con.list_filesystems()):
            con.register_filesystem(fs)
        paths = [fs.unstrip_protocol(f) for f in files]
    else:
        paths = list(files)
    return (f"read_parquet(?, hive_partitioning = true, union_by_name = true, "
            f"hive_types = {{'{PARTITION}': VARCHAR}})", [paths])


def _sql_filter(flt: ScoreFilter, statuses: Sequence[str] | None, low: float | None,
                high: float | None) -> tuple[str, list]:
    """``_base_filter`` and ``_score_filter`` as a SQL condition with its parameters."""
    parts, params = ["true"], []
    for condition, value in ((f"{PARTITION} >= ?", flt.date_from), (f"{PARTITION} <= ?", flt.date_to),
                             ("model_id = ?", flt.model_id), ("score >= ?", low), ("score <= ?", high)):
        if value is not None:
            parts.append(condition)
            params.append(value)
    if statuses is not None:
        parts.append(f"status IN ({', '.join('?' * len(statuses))})" if statuses else "false")
        params.extend(statuses)
    return " AND ".join(parts), params


def _rank_bounds(con, population: str, flt: ScoreFilter) -> tuple[float | None, float | None, int | None]:
    """Score bounds (and an exact row count for top/bottom) from the population's finite scores.

    A NaN score is no rank; the bounds are comparisons, which a NaN fails, so such rows are never selected.
    """
    finite = f"SELECT score::DOUBLE AS score FROM {population} WHERE score IS NOT NULL AND NOT isnan(score)"
    n = con.sql(f"SELECT count(*) FROM ({finite})").fetchall()[0][0]
    if n == 0:
        return None, None, 0
    if flt.quantiles is not None:
        lo, hi = con.sql(f"SELECT quantile_cont(score, [{flt.quantiles[0]!r}, {flt.quantiles[1]!r}]) "
                         f"FROM ({finite})").fetchall()[0][0]
        return float(lo), float(hi), None
    fraction = flt.top if flt.top is not None else flt.bottom
    count = min(n, math.ceil(fraction * n - 1e-9))
    direction = "DESC" if flt.top is not None else "ASC"
    bound = con.sql(f"SELECT score FROM ({finite}) ORDER BY score {direction} LIMIT 1 OFFSET {count - 1}")
    value = float(bound.fetchall()[0][0])
    return (value, None, count) if flt.top is not None else (None, value, count)


@contextlib.contextmanager
def selection(dataset: pads.Dataset, flt: ScoreFilter = ScoreFilter(), columns: Sequence[str] | None = None,
              memory_mb: int = DEFAULT_PLAN_MEMORY_MB, spill_dir: str | None = None,
              uris: pa.Array | None = None) -> Iterator[tuple[pa.RecordBatchReader, ScanStats]]:
    """Rows of the scores dataset that ``flt`` keeps, sorted by score (highest first), then uri, as a stream.

    The history can hold 10^9 rows: nothing here holds a column of it in Python. The narrow key columns of
    the selected dates, and then the rows the bounds let through, are streamed into DuckDB, which finds each
    image's latest row (a window over ``(uri, model_id)``), the rank bounds and the final order within
    ``memory_mb``, spilling to a temporary folder past it. The result is read back in batches while the caller
    writes it; ``ScanStats`` is complete when the stream is handed over.

    Args:
        dataset: From ``open_scores``.
        flt: The conditions.
        columns: Columns to return; default all. The key columns needed to pick rows are read regardless.
        memory_mb: DuckDB's memory limit.
        spill_dir: Local folder for DuckDB's files (default: a fresh temporary folder).
        uris: Keep only rows of these images (as the output writes ``uri``): a labelled set's, joined in DuckDB
            so that only they come back, whatever the history holds. Which row is an image's latest, and the
            ranks, are still those of the whole history; not combinable with a ranked filter.

    Yields:
        The rows (in the dataset schema's types) and what was read to find them.
    """
    from pipeline.batch.plan import duckdb_connection

    stats = ScanStats(files_total=len(dataset.files))
    names = dataset.schema.names
    wanted = list(columns) if columns else names
    missing = [c for c in wanted if c not in names]
    if missing:
        raise QueryError(f"no column {', '.join(missing)} in the scores; columns are {', '.join(names)}")
    statuses = flt.statuses
    if flt.min_score is not None or flt.max_score is not None or flt.ranked:
        statuses = tuple(s for s in (statuses or STATUSES) if s == STATUS_OK)
    if uris is not None and flt.ranked:
        raise QueryError("a selection of given images cannot also be ranked")
    key_cols = ["uri", "model_id", PARTITION, "status", "scored_at", "score"]
    # Nullable: partitions written before a column existed read it as nulls (see ``open_scores``).
    out_schema = pa.schema([dataset.schema.field(c).with_nullable(True) for c in wanted])

    with duckdb_connection(memory_mb, spill_dir) as con:
        low, high, count = flt.min_score, flt.max_score, None
        winners = None
        if flt.latest or flt.ranked:
            base = _base_filter(flt, None if flt.latest else statuses)
            files = [f.path for f in dataset.get_fragments(filter=base)]
            source, source_params = parquet_source(con, dataset, files, key_cols)
            where, params = _sql_filter(flt, None if flt.latest else statuses, None, None)
            keys = ", ".join(key_cols)
            population = "keys"
            if flt.latest:
                con.execute(f"CREATE TABLE winners AS SELECT {keys} FROM {source} WHERE {where} QUALIFY {_WINNER} = 1",
                            source_params + params)
                stats.key_rows_read = con.execute(f"SELECT count(*) FROM {source} WHERE {where}",
                                                  source_params + params).fetchall()[0][0]
                winners = population = "winners"
            else:
                con.execute(f"CREATE TABLE keys AS SELECT {keys} FROM {source} WHERE {where}", source_params + params)
                stats.key_rows_read = con.sql("SELECT count(*) FROM keys").fetchall()[0][0]
            if flt.ranked:
                conditions = [f"status = '{STATUS_OK}'"]
                if flt.min_score is not None:
                    conditions.append(f"score >= {float(flt.min_score)!r}")
                if flt.max_score is not None:
                    conditions.append(f"score <= {float(flt.max_score)!r}")
                con.execute(f"CREATE VIEW population AS SELECT * FROM {population} WHERE {' AND '.join(conditions)}")
                rank_low, rank_high, count = _rank_bounds(con, "population", flt)
                if count == 0:
                    yield out_schema.empty_table().to_reader(), stats
                    return
                low = max(v for v in (low, rank_low) if v is not None) if rank_low is not None else low
                high = min(v for v in (high, rank_high) if v is not None) if rank_high is not None else high

        # Which files and row groups can hold a selected row, from the files' statistics alone (what DuckDB's
        # reader also skips); only those files are read.
        row_filter = _and([p for p in (_base_filter(flt, statuses), _score_filter(low, high)) if p is not None])
        files = []
        for fragment in dataset.get_fragments(filter=row_filter):
            groups = fragment.split_by_row_group(row_filter, schema=dataset.schema)
            stats.files_read += 1
            stats.row_groups_total += fragment.num_row_groups
            stats.row_groups_read += len(groups)
            stats.rows_read += sum(info.num_rows for group in groups for info in group.row_groups)
            if groups:
                files.append(fragment.path)
        where, params = _sql_filter(flt, statuses, low, high)
        columns = list(dict.fromkeys([*wanted, *key_cols]))
        source, source_params = parquet_source(con, dataset, files, columns)
        present = {row[0] for row in con.execute(f"DESCRIBE SELECT * FROM {source}", source_params).fetchall()}
        # A column only other nights' files have (a manifest column carried then) is null in these rows.
        read_cols = ", ".join(f'"{c}"' if c in present else f'NULL AS "{c}"' for c in columns)
        if uris is not None:
            counted = "winners" if winners is not None else source
            stats.rows_before_uris = con.execute(f"SELECT count(*) FROM {counted} WHERE {where}",
                                                 ([] if winners is not None else source_params) + params
                                                 ).fetchall()[0][0]
            con.register("given_uris", pa.table({"uri": uris.cast(pa.string())}))
            where += " AND uri IN (SELECT uri FROM given_uris)"
        con.execute(f"CREATE TABLE picked AS SELECT {read_cols} FROM {source} WHERE {where}", source_params + params)
        if low is not None or high is not None:
            # A NaN is no score, but DuckDB 2.0's Parquet reader lets a NaN through a pushed-down ``score <= x``
            # (and ``NOT isnan(score)`` beside it); the rows read are checked once more.
            con.execute("DELETE FROM picked WHERE isnan(score)")
        chosen = "picked"
        if winners is not None:
            # The latest row of each image; identical duplicate rows of one night collapse to one.
            con.execute(f"""CREATE TABLE chosen AS SELECT p.* FROM picked p
                            SEMI JOIN winners w USING (uri, model_id, {PARTITION}, status, scored_at)
                            QUALIFY {_WINNER} = 1""")
            chosen = "chosen"
        listed = ", ".join(f'"{c}"' for c in wanted)
        if count is None:
            result = f"SELECT {listed} FROM {chosen} ORDER BY {_ORDER}"
        elif flt.top is not None:
            result = f"SELECT {listed} FROM {chosen} ORDER BY {_ORDER} LIMIT {count}"
        else:
            result = (f"SELECT {listed} FROM (SELECT * FROM {chosen} ORDER BY {_ORDER_REVERSED} LIMIT {count}) "
                      f"ORDER BY {_ORDER}")
        stats.rows_selected = con.sql(f"SELECT count(*) FROM ({result})").fetchall()[0][0]
        rows = con.sql(result).to_arrow_reader(BATCH_ROWS)
        batches = (pa.Table.from_batches([b]).cast(out_schema).to_batches(BATCH_ROWS) for b in rows)
        yield pa.RecordBatchReader.from_batches(out_schema, (b for part in batches for b in part)), stats


BATCH_ROWS = 65_536


def model_ids(dataset: pads.Dataset, flt: ScoreFilter = ScoreFilter(), memory_mb: int = DEFAULT_PLAN_MEMORY_MB,
              spill_dir: str | None = None) -> list[str]:
    """The ``model_id`` values of the rows ``flt``'s dates, model and statuses keep (not its latest rule or ranks).

    A DISTINCT in DuckDB over one column: a history of 10^9 rows holds a handful of models.
    """
    from pipeline.batch.plan import duckdb_connection

    with duckdb_connection(memory_mb, spill_dir) as con:
        files = [f.path for f in dataset.get_fragments(filter=_base_filter(flt, flt.statuses))]
        source, source_params = parquet_source(con, dataset, files, ["model_id", "status", PARTITION])
        where, params = _sql_filter(flt, flt.statuses, None, None)
        found = con.execute(f"SELECT DISTINCT model_id FROM {source} WHERE {where} AND model_id IS NOT NULL",
                            source_params + params).fetchall()
    return sorted(row[0] for row in found)


def select(dataset: pads.Dataset, flt: ScoreFilter = ScoreFilter(), columns: Sequence[str] | None = None,
           uris: pa.Array | None = None) -> tuple[pa.Table, ScanStats]:
    """``selection`` read whole: for selections known to be small (tests, a labelled set's scores)."""
    with selection(dataset, flt, columns, uris=uris) as (rows, stats):
        return rows.read_all(), stats


def selection_columns(dataset: pads.Dataset, columns: Sequence[str] | None = None) -> list[str]:
    """Columns a written selection has: ``columns`` if given, else the defaults plus the manifest's own columns."""
    if columns:
        return list(columns)
    names = dataset.schema.names
    carried = [n for n in names if n not in RESULT_SCHEMA.names and n != PARTITION]
    return [c for c in DEFAULT_COLUMNS if c in names] + carried


def selection_format(uri: str, fmt: str | None = None) -> str:
    """The format a selection written to ``uri`` gets: ``fmt`` if given, else the one its extension names.

    A function of its own so that ``dgiqa filter`` can refuse an ``--out`` of no known format before it reads
    any scores, not after.

    Raises:
        QueryError: No ``fmt`` and an extension that names none of ``FORMATS``, or an unknown ``fmt``.
    """
    if fmt is None:
        ext = posixpath.splitext(uri.split("?")[0])[1].lower().lstrip(".")
        fmt = {"parquet": "parquet", "pq": "parquet", "csv": "csv", "jsonl": "jsonl", "json": "jsonl",
               "ndjson": "jsonl"}.get(ext)
        if fmt is None:
            raise QueryError(f"cannot tell the format of {uri}: use .parquet, .csv or .jsonl, or --format")
    if fmt not in FORMATS:
        raise QueryError(f"unknown format {fmt!r}; formats are {', '.join(FORMATS)}")
    return fmt


def write_selection(rows: pa.Table | pa.RecordBatchReader, uri: str, fmt: str | None = None,
                    storage_options: Mapping | None = None) -> str:
    """Write selected rows as a manifest the next job reads: Parquet, CSV or JSON Lines, by ``fmt`` or extension.

    Returns:
        The format written.

    Raises:
        QueryError: The format cannot be told (see ``selection_format``).
    """
    fmt = selection_format(uri, fmt)
    with fsspec.open(uri, "wb", **(storage_options or {})) as f:
        write_stream(rows, f, fmt)
    return fmt


def write_stream(rows: pa.Table | pa.RecordBatchReader, stream: BinaryIO, fmt: str) -> None:
    """Write selected rows to an open binary stream (a file, or standard output) in one of ``FORMATS``.

    The one writer of both ``write_selection`` and ``dgiqa filter`` without ``--out``, so a selection printed and
    a selection saved are the same bytes. Batch by batch: a selection of 10^8 rows is never held. Parquet is
    written front to back (pyarrow never seeks), so a pipe works.

    Raises:
        QueryError: ``fmt`` is not one of ``FORMATS``.
    """
    if fmt not in FORMATS:
        raise QueryError(f"unknown format {fmt!r}; formats are {', '.join(FORMATS)}")
    reader = rows.to_reader() if isinstance(rows, pa.Table) else rows
    if fmt == "parquet":
        with pq.ParquetWriter(stream, reader.schema) as writer:
            for batch in reader:
                writer.write_batch(batch)
    elif fmt == "csv":
        with pacsv.CSVWriter(stream, reader.schema) as writer:
            for batch in reader:
                writer.write_batch(batch)
    else:
        for batch in reader:
            if batch.num_rows:
                stream.write(batch.to_pandas().to_json(orient="records", lines=True, date_format="iso").encode())
