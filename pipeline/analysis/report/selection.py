"""What the report reads from the scores output: the run dates, row counts, scores, thumbnail rows and summaries.

Rows go through pyarrow filters: ``run_date`` prunes whole partitions, and the thumbnails' rows are found by two
score thresholds, which row-group statistics of the score-sorted part files answer without reading most rows.
The score aggregates (histogram, per-date quartiles, the thresholds) are DuckDB's, out of core. No column of the
selection is held whole.
"""

from __future__ import annotations

import contextlib
import json
import math
import posixpath
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import duckdb
import fsspec
import numpy as np
import pyarrow.compute as pc
import pyarrow.dataset as pads

from pipeline.analysis.query import parquet_source
from pipeline.analysis.report.config import ReportConfig, ReportError
from pipeline.analysis.svg import BoxStats
from pipeline.batch.allowlist import redact_uri
from pipeline.batch.output import PARTITION, STATUS_OK
from pipeline.batch.plan import duckdb_connection
from pipeline.limits import DEFAULT_PLAN_MEMORY_MB


def partition_dates(dataset: pads.Dataset) -> list[str]:
    """The ``run_date`` values present, from the file paths alone (nothing is read)."""
    dates = set()
    for fragment in dataset.get_fragments():
        value = pads.get_partition_keys(fragment.partition_expression).get(PARTITION)
        if value is not None:
            dates.add(value)
    return sorted(dates)


def span(dates: Sequence[str]) -> str:
    """Sorted dates in a few words, for messages: ``none``, the one date, or how many from when to when."""
    if not dates:
        return "none"
    return dates[0] if len(dates) == 1 else f"{len(dates)} dates from {dates[0]} to {dates[-1]}"


def select_dates(dataset: pads.Dataset, config: ReportConfig) -> list[str]:
    """The run dates ``config`` asks for that are present, oldest first.

    Raises:
        ReportError: No partition matches, naming the dates that are present.
    """
    present = partition_dates(dataset)
    where = redact_uri(config.output)
    if not present:
        raise ReportError(f"no scores at {where}: no run_date=YYYY-MM-DD partitions")
    if config.run_date is not None:
        if config.run_date not in present:
            raise ReportError(f"no run_date={config.run_date} partition at {where} (present: {span(present)})")
        return [config.run_date]
    if config.date_from is not None or config.date_to is not None:
        lo, hi = config.date_from or present[0], config.date_to or present[-1]
        selected = [d for d in present if lo <= d <= hi]
        if not selected:
            raise ReportError(f"no run_date partition from {lo} to {hi} at {where} (present: {span(present)})")
        return selected
    if config.model_id is not None:
        with_model = set()
        for batch in dataset.to_batches(columns=[PARTITION], filter=pc.field("model_id") == config.model_id):
            with_model.update(pc.unique(batch.column(0)).to_pylist())
        if not with_model:
            raise ReportError(f"no rows of model {config.model_id} at {where} (dates present: {span(present)})")
        return [max(with_model)]
    return [present[-1]]


@dataclass(frozen=True)
class SelectedRows:
    """The rows of the selected dates (and model), left in the part files and aggregated by DuckDB.

    A month of nights of 10^8 images is 3e9 rows: the page's row counts, histogram, per-date boxes and
    thumbnail thresholds are aggregates, computed out of core (``memory_mb``), so no column is held in Python.

    Attributes:
        dataset: From ``open_scores``.
        dates: The selected run dates.
        model_id: Only this model's rows (None: every model's).
        memory_mb: DuckDB's memory limit; sorts past it spill to a temporary folder.
    """

    dataset: pads.Dataset
    dates: tuple[str, ...]
    model_id: str | None = None
    memory_mb: int = DEFAULT_PLAN_MEMORY_MB

    @contextlib.contextmanager
    def _rows(self, ok_scores: bool) -> Iterator[tuple[duckdb.DuckDBPyConnection, str, list]]:
        """A DuckDB connection and a SQL subquery of the selected rows, with its parameters.

        ``ok_scores``: only the finite scores of ``ok`` rows, as ``run_date, score`` (DOUBLE); else every row's
        ``run_date, model_id, status``.
        """
        selected = pc.field(PARTITION).isin(list(self.dates))
        if self.model_id is not None:
            selected &= pc.field("model_id") == self.model_id
        files = [f.path for f in self.dataset.get_fragments(filter=selected)]
        with duckdb_connection(self.memory_mb) as con:
            source, params = parquet_source(con, self.dataset, files, [PARTITION, "score", "status", "model_id"])
            dates = ", ".join("?" * len(self.dates))
            where = f"{PARTITION} IN ({dates})"
            params = [*params, *self.dates]
            if self.model_id is not None:
                where += " AND model_id = ?"
                params.append(self.model_id)
            if ok_scores:
                where += f" AND status = '{STATUS_OK}' AND isfinite(score)"
            columns = f"{PARTITION}, score::DOUBLE AS score" if ok_scores else f"{PARTITION}, model_id, status"
            yield con, f"(SELECT {columns} FROM {source} WHERE {where})", params

    def counts(self) -> Counter:
        """Rows by ``(run_date, model_id, status)``."""
        with self._rows(ok_scores=False) as (con, rows, params):
            found = con.execute(f"SELECT {PARTITION}, model_id, status, count(*) FROM {rows} GROUP BY ALL",
                                params).fetchall()
        return Counter({(str(night), model, status): n for night, model, status, n in found})

    def distribution(self, bins: int) -> ScoreDistribution:
        """The histogram (``np.histogram``'s bins over [0, 1], scores clipped into it) and each date's box.

        Quartiles interpolate linearly between order statistics (``np.percentile``'s default), found by one
        sort per date, which DuckDB spills; an exact quantile aggregate would hold a date's scores in memory.
        """
        histogram = [0] * bins
        sizes: dict[str, int] = {}
        boxes = {}
        with self._rows(ok_scores=True) as (con, scores, params):
            # Scores are float32: x * bins is exact in double, so its floor is np.histogram's bin (the edges tested).
            binned = (f"SELECT {PARTITION} AS night, least(floor(least(greatest(score, 0.0::DOUBLE), 1.0::DOUBLE) "
                      f"* {bins})::BIGINT, {bins - 1}) AS i FROM {scores}")
            for night, i, n in con.execute(f"SELECT night, i, count(*) FROM ({binned}) GROUP BY ALL",
                                           params).fetchall():
                histogram[i] += n
                sizes[night] = sizes.get(night, 0) + n
            for night, n in sorted(sizes.items()):
                # A window over one date's scores, without PARTITION BY: DuckDB's sort spills (measured:
                # 5M scores under a 24 MB limit), where quantile_cont holds the values and a partitioned window
                # ran out of memory at 2 x 5M under 256 MB.
                wanted = sorted({f(q * (n - 1)) for q in QUARTILES for f in (math.floor, math.ceil)})
                ranked = (f"SELECT score, row_number() OVER (ORDER BY score) - 1 AS k FROM {scores} "
                          f"WHERE {PARTITION} = ?")
                positions = ", ".join(map(str, wanted))
                values = dict(con.execute(f"SELECT k, score FROM ({ranked}) WHERE k IN ({positions})",
                                          [*params, night]).fetchall())
                five = []
                for q in QUARTILES:
                    h = q * (n - 1)
                    lo, hi = math.floor(h), math.ceil(h)
                    five.append(values[lo] + (values[hi] - values[lo]) * (h - lo))
                boxes[night] = BoxStats(*five, count=n)
        return ScoreDistribution(histogram, boxes)

    def kth(self, k: int, lowest: bool) -> float:
        """The ``k``-th lowest (or highest) score, ``k`` from 1 (DuckDB's top-N: ``k`` values held)."""
        with self._rows(ok_scores=True) as (con, scores, params):
            direction = "ASC" if lowest else "DESC"
            return con.execute(f"SELECT score FROM {scores} ORDER BY score {direction} LIMIT 1 OFFSET {k - 1}",
                               params).fetchall()[0][0]


QUARTILES = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass(frozen=True)
class ScoreDistribution:
    """What the page draws of the ok scores.

    Attributes:
        histogram: Counts of equal bins over [0, 1].
        boxes: Each run date's minimum, quartiles, maximum and count; dates without a score left out.
    """

    histogram: list[int]
    boxes: dict[str, BoxStats]

    @property
    def total(self) -> int:
        """How many scores."""
        return sum(self.histogram)


@dataclass(frozen=True)
class TileGrid:
    """One grid of thumbnails on the page: its element id, heading, an optional note, and its rows in order."""

    css_id: str
    title: str
    rows: list[dict]
    note: str = ""


TILE_COLUMNS = ["uri", "score", "model_id", "run_id", PARTITION]


def _order(row: dict) -> tuple:
    return row["score"], row["uri"], row[PARTITION]


def _extreme_images(dataset: pads.Dataset, ok_filter: pc.Expression, scores: SelectedRows, total: int, n: int,
                    lowest: bool, exclude: frozenset = frozenset()) -> list[dict]:
    """The ``n`` images (``uri`` and ``model_id``) of the lowest (or highest) scores, each at its most extreme row.

    Over several nights an image has a row a night; the rows past a threshold score may then hold fewer than
    ``n`` images, so the threshold moves on (by the duplication seen so far) until ``n`` are found or every row
    is read. Fewer come back only when the selection holds fewer images outside ``exclude``.
    """
    score = pc.field("score")
    k = n
    while True:
        k = min(k, total)
        bound = scores.kth(k, lowest)
        beyond = score <= bound if lowest else score >= bound
        table = dataset.to_table(columns=TILE_COLUMNS, filter=ok_filter & beyond)
        rows = sorted((r for r in table.to_pylist() if np.isfinite(r["score"])), key=_order, reverse=not lowest)
        picked: dict[tuple, dict] = {}
        for row in rows:
            if (row["uri"], row["model_id"]) not in exclude:
                picked.setdefault((row["uri"], row["model_id"]), row)
        if len(picked) >= n or k == total:
            return list(picked.values())[:n]
        k = max(k + n - len(picked), math.ceil(k * n / max(len(picked), 1)))


def _every_image(dataset: pads.Dataset, ok_filter: pc.Expression) -> list[dict]:
    """Each image of the selection once, at its newest row, lowest score first (few rows: all are read)."""
    newest: dict[tuple, dict] = {}
    for row in sorted(dataset.to_table(columns=TILE_COLUMNS, filter=ok_filter).to_pylist(),
                      key=lambda r: (r[PARTITION], r["uri"])):
        if np.isfinite(row["score"]):
            newest[(row["uri"], row["model_id"])] = row
    return sorted(newest.values(), key=_order)


def thumbnail_grids(dataset: pads.Dataset, ok_filter: pc.Expression, scores: SelectedRows, total: int,
                    n: int) -> list[TileGrid]:
    """The ``n`` lowest-scoring images (ascending) and the ``n`` highest (descending), or all in one grid.

    An image is a ``(uri, model_id)``; over a range of nights it is shown once per grid, at its lowest row in the
    lowest grid and its highest in the highest, and never in both. With fewer than ``2 n`` images the two
    grids would share images, so each is shown once, at its newest row, lowest score first, in one grid that
    says why. Only rows at or beyond threshold scores are read, which the score-sorted part files' row-group
    statistics mostly answer without reading the rest.
    """
    if n == 0 or total == 0:
        return []
    lowest = _extreme_images(dataset, ok_filter, scores, total, n, lowest=True) if total >= 2 * n else []
    highest = []
    if len(lowest) == n:
        shown = frozenset((r["uri"], r["model_id"]) for r in lowest)
        highest = _extreme_images(dataset, ok_filter, scores, total, n, lowest=False, exclude=shown)
    if len(highest) < n:
        rows = _every_image(dataset, ok_filter)
        noun = "image" if len(rows) == 1 else "images"
        return [TileGrid("all-ok", f"All {len(rows)} ok {noun}, lowest score first", rows,
                         f"Fewer than 2 × {n} (--thumbnails) ok images, so each is shown once, in one grid, "
                         "instead of in a lowest and a highest grid.")]
    return [TileGrid("lowest", f"Lowest {n} scores", lowest), TileGrid("highest", f"Highest {n} scores", highest)]


def run_summaries(config: ReportConfig, dates: Sequence[str]) -> list[dict]:
    """The ``_summary-*.json`` files of the selected partitions that can be read; the others are skipped."""
    try:
        fs, root = fsspec.core.url_to_fs(config.output, **(config.storage_options or {}))
    except Exception:  # noqa: BLE001 - summaries are optional
        return []
    summaries = []
    for date in dates:
        try:
            paths = sorted(fs.glob(posixpath.join(root.rstrip("/"), f"{PARTITION}={date}", "_summary-*.json")))
        except Exception:  # noqa: BLE001 - summaries are optional
            continue
        for path in paths:
            try:
                with fs.open(path, "rb") as f:
                    summary = json.loads(f.read())
            except Exception:  # noqa: BLE001 - a damaged summary is skipped, the rows are the truth
                continue
            if not isinstance(summary, dict):
                continue
            if config.model_id is not None and summary.get("model_id") != config.model_id:
                continue
            summaries.append({**summary, PARTITION: summary.get(PARTITION, date)})
    return summaries
