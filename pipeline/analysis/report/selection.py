"""What the report reads from the scores output: the run dates, row counts, scores, thumbnail rows and summaries.

Everything goes through pyarrow filters: ``run_date`` prunes whole partitions, and the thumbnails' rows are found
by two score thresholds, which row-group statistics of the score-sorted part files answer without reading most
rows. No column of the selection is held whole.
"""

from __future__ import annotations

import json
import math
import posixpath
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from pipeline.analysis.report.config import ReportConfig, ReportError
from pipeline.batch.allowlist import redact_uri
from pipeline.batch.output import PARTITION


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


def count_rows(dataset: pads.Dataset, selection: pc.Expression) -> Counter:
    """Rows by ``(run_date, model_id, status)``, counted batch by batch (no column is held whole)."""
    counts: Counter = Counter()
    keys = [PARTITION, "model_id", "status"]
    for batch in dataset.to_batches(columns=keys, filter=selection):
        if batch.num_rows:
            grouped = pa.Table.from_batches([batch]).group_by(keys).aggregate([("status", "count")])
            for *key, n in zip(*(grouped.column(c).to_pylist() for c in [*keys, "status_count"]), strict=True):
                counts[tuple(key)] += n
    return counts


def scores_by_date(dataset: pads.Dataset, ok_filter: pc.Expression, dates: Sequence[str]) -> dict[str, np.ndarray]:
    """The finite scores of each selected date; one partition is read at a time, only its score column."""
    by_date = {}
    for date in dates:
        column = dataset.to_table(columns=["score"], filter=ok_filter & (pc.field(PARTITION) == date)).column(0)
        values = column.to_numpy(zero_copy_only=False).astype(np.float64)
        by_date[date] = values[np.isfinite(values)]
    return by_date


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


def _extreme_images(dataset: pads.Dataset, ok_filter: pc.Expression, ordered: np.ndarray, n: int, lowest: bool,
                    exclude: frozenset = frozenset()) -> list[dict]:
    """The ``n`` images (``uri`` and ``model_id``) of the lowest (or highest) scores, each at its most extreme row.

    Over several nights an image has a row a night; the rows past a threshold score may then hold fewer than
    ``n`` images, so the threshold moves on (by the duplication seen so far) until ``n`` are found or every row
    is read. Fewer come back only when the selection holds fewer images outside ``exclude``.
    """
    score = pc.field("score")
    k = n
    while True:
        k = min(k, ordered.size)
        bound = float(ordered[k - 1] if lowest else ordered[-k])
        beyond = score <= bound if lowest else score >= bound
        table = dataset.to_table(columns=TILE_COLUMNS, filter=ok_filter & beyond)
        rows = sorted((r for r in table.to_pylist() if np.isfinite(r["score"])), key=_order, reverse=not lowest)
        picked: dict[tuple, dict] = {}
        for row in rows:
            if (row["uri"], row["model_id"]) not in exclude:
                picked.setdefault((row["uri"], row["model_id"]), row)
        if len(picked) >= n or k == ordered.size:
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


def thumbnail_grids(dataset: pads.Dataset, ok_filter: pc.Expression, scores: np.ndarray, n: int) -> list[TileGrid]:
    """The ``n`` lowest-scoring images (ascending) and the ``n`` highest (descending), or all in one grid.

    An image is a ``(uri, model_id)``; over a range of nights it is shown once per grid, at its lowest row in the
    lowest grid and its highest in the highest, and never in both. With fewer than ``2 n`` images the two
    grids would share images, so each is shown once, at its newest row, lowest score first, in one grid that
    says why. Only rows at or beyond threshold scores are read, which the score-sorted part files' row-group
    statistics mostly answer without reading the rest.
    """
    if n == 0 or scores.size == 0:
        return []
    ordered = np.sort(scores[np.isfinite(scores)])
    lowest = _extreme_images(dataset, ok_filter, ordered, n, lowest=True) if ordered.size >= 2 * n else []
    highest = []
    if len(lowest) == n:
        shown = frozenset((r["uri"], r["model_id"]) for r in lowest)
        highest = _extreme_images(dataset, ok_filter, ordered, n, lowest=False, exclude=shown)
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
