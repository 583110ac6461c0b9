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

import math
import posixpath
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import BinaryIO

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from pipeline.analysis.formats import FORMATS
from pipeline.batch.output import PARTITION, RESULT_SCHEMA, STATUS_OK, STATUSES
from pipeline.batch.run_dates import check_run_date

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
    """

    files_total: int = 0
    files_read: int = 0
    row_groups_total: int = 0
    row_groups_read: int = 0
    rows_read: int = 0
    rows_selected: int = 0
    key_rows_read: int = 0

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


def _latest_rows(keys: pa.Table) -> pa.Table:
    """The winning row of each ``(uri, model_id)``: newest run_date, then ok before other statuses, then newest."""
    keys = keys.append_column("_ok", pc.equal(keys.column("status"), STATUS_OK))
    order = keys.sort_by([("uri", "ascending"), ("model_id", "ascending"), (PARTITION, "descending"),
                          ("_ok", "descending"), ("scored_at", "descending")])
    uri, model = order.column("uri").to_numpy(zero_copy_only=False), order.column("model_id").to_numpy(
        zero_copy_only=False)
    first = np.ones(len(order), dtype=bool)
    if len(order) > 1:
        first[1:] = (uri[1:] != uri[:-1]) | (model[1:] != model[:-1])
    return order.filter(pa.array(first)).drop_columns(["_ok"])


def _rank_bounds(scores: np.ndarray, flt: ScoreFilter) -> tuple[float | None, float | None, int | None]:
    """Score bounds (and an exact row count for top/bottom) from the population's scores.

    A NaN score (which no run writes any more: see ``scoring.scorer.non_finite``) is no rank; the bounds are
    comparisons, which a NaN fails, so such rows are never selected by them either.
    """
    scores = scores[np.isfinite(scores)]
    if len(scores) == 0:
        return None, None, 0
    if flt.quantiles is not None:
        lo, hi = np.quantile(scores, flt.quantiles)
        return float(lo), float(hi), None
    fraction = flt.top if flt.top is not None else flt.bottom
    count = min(len(scores), math.ceil(fraction * len(scores) - 1e-9))
    ordered = np.sort(scores)
    if flt.top is not None:
        return float(ordered[-count]), None, count
    return None, float(ordered[count - 1]), count


def select(dataset: pads.Dataset, flt: ScoreFilter = ScoreFilter(),
           columns: Sequence[str] | None = None) -> tuple[pa.Table, ScanStats]:
    """Rows of the scores dataset that ``flt`` keeps, sorted by score (highest first), then uri.

    Args:
        dataset: From ``open_scores``.
        flt: The conditions.
        columns: Columns to return; default all. The key columns needed to pick rows are read regardless.

    Returns:
        The rows and what was read to find them.
    """
    stats = ScanStats(files_total=len(dataset.files))
    names = dataset.schema.names
    wanted = list(columns) if columns else names
    missing = [c for c in wanted if c not in names]
    if missing:
        raise QueryError(f"no column {', '.join(missing)} in the scores; columns are {', '.join(names)}")
    statuses = flt.statuses
    if flt.min_score is not None or flt.max_score is not None or flt.ranked:
        statuses = tuple(s for s in (statuses or STATUSES) if s == STATUS_OK)

    winners = None
    low, high, count = flt.min_score, flt.max_score, None
    if flt.latest or flt.ranked:
        key_cols = ["uri", "model_id", PARTITION, "status", "scored_at", "score"]
        keys = dataset.to_table(columns=key_cols, filter=_base_filter(flt, None if flt.latest else statuses))
        stats.key_rows_read = len(keys)
        if flt.latest:
            keys = _latest_rows(keys)
            winners = keys.select(["uri", "model_id", PARTITION, "status", "scored_at"])
        if flt.ranked:
            population = keys.filter(pc.field("status") == STATUS_OK)
            if statuses is not None:
                population = population.filter(pc.field("status").isin(list(statuses)))
            base_scores = _score_filter(flt.min_score, flt.max_score)
            if base_scores is not None:
                population = population.filter(base_scores)
            rank_low, rank_high, count = _rank_bounds(population.column("score").to_numpy(), flt)
            if count == 0:
                return pa.table({c: pa.array([], dataset.schema.field(c).type) for c in wanted}), stats
            low = max(v for v in (low, rank_low) if v is not None) if rank_low is not None else low
            high = min(v for v in (high, rank_high) if v is not None) if rank_high is not None else high

    row_filter = _and([p for p in (_base_filter(flt, statuses), _score_filter(low, high)) if p is not None])
    read_cols = list(dict.fromkeys([*wanted, "uri", "model_id", PARTITION, "status", "scored_at", "score"]))
    pieces = []
    for fragment in dataset.get_fragments(filter=row_filter):
        stats.files_read += 1
        stats.row_groups_total += fragment.num_row_groups
        for group in fragment.split_by_row_group(row_filter, schema=dataset.schema):
            stats.row_groups_read += 1
            stats.rows_read += sum(info.num_rows for info in group.row_groups)
            pieces.append(group.to_table(schema=dataset.schema, columns=read_cols, filter=row_filter))
    schema = pa.schema([dataset.schema.field(c) for c in read_cols])
    table = pa.concat_tables(pieces) if pieces else schema.empty_table()
    if winners is not None:
        table = table.join(winners, keys=["uri", "model_id", PARTITION, "status", "scored_at"], join_type="inner")
        table = _latest_rows(table)  # identical duplicate rows of one night collapse to one
    table = table.sort_by([("score", "descending"), ("uri", "ascending")])
    if count is not None:
        table = table.slice(0, count) if flt.top is not None else table.slice(len(table) - count, count)
    table = table.select(wanted)
    stats.rows_selected = len(table)
    return table, stats


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


def write_selection(table: pa.Table, uri: str, fmt: str | None = None,
                    storage_options: Mapping | None = None) -> str:
    """Write selected rows as a manifest the next job reads: Parquet, CSV or JSON Lines, by ``fmt`` or extension.

    Returns:
        The format written.

    Raises:
        QueryError: The format cannot be told (see ``selection_format``).
    """
    fmt = selection_format(uri, fmt)
    with fsspec.open(uri, "wb", **(storage_options or {})) as f:
        write_stream(table, f, fmt)
    return fmt


def write_stream(table: pa.Table, stream: BinaryIO, fmt: str) -> None:
    """Write selected rows to an open binary stream (a file, or standard output) in one of ``FORMATS``.

    The one writer of both ``write_selection`` and ``dgiqa filter`` without ``--out``, so a selection printed and
    a selection saved are the same bytes. Parquet is written front to back (pyarrow never seeks), so a pipe works.

    Raises:
        QueryError: ``fmt`` is not one of ``FORMATS``.
    """
    if fmt == "parquet":
        pq.write_table(table, stream)
    elif fmt == "csv":
        pacsv.write_csv(table, stream)
    elif fmt == "jsonl":
        stream.write(table.to_pandas().to_json(orient="records", lines=True, date_format="iso").encode())
    else:
        raise QueryError(f"unknown format {fmt!r}; formats are {', '.join(FORMATS)}")
