"""``dgiqa report``'s work in order: select the rows, count them, read scores, thumbnails and failures, render."""

from __future__ import annotations

import argparse

import fsspec
import pyarrow.compute as pc

from pipeline.analysis.query import open_scores
from pipeline.analysis.report.config import ReportConfig, ReportError
from pipeline.analysis.report.depth import load_depth_maps
from pipeline.analysis.report.failures import error_groups
from pipeline.analysis.report.page import HISTOGRAM_BINS, ReportContent, render_page
from pipeline.analysis.report.selection import (
    SelectedRows,
    run_summaries,
    select_dates,
    span,
    thumbnail_grids,
)
from pipeline.analysis.report.thumbnails import make_tiles, thumbnail_access
from pipeline.batch.allowlist import redact_uri
from pipeline.batch.output import PARTITION, STATUS_OK, check_writable


def build_report(config: ReportConfig) -> str:
    """The report page for the selection in ``config``, as one HTML string that loads nothing.

    Raises:
        QueryError: There are no scores at ``config.output``.
        ReportError: The selection holds no rows.
        WeightsError: ``config.depth_weights`` cannot be read or is not a Depth Anything checkpoint.
    """
    dataset = open_scores(config.output, config.storage_options)
    dates = select_dates(dataset, config)
    selection = pc.field(PARTITION).isin(dates)
    if config.model_id is not None:
        selection &= pc.field("model_id") == config.model_id
    rows = SelectedRows(dataset, tuple(dates), config.model_id)
    counts = rows.counts()
    if not counts:
        model = f" of model {config.model_id}" if config.model_id is not None else ""
        raise ReportError(f"no rows{model} in run_date {span(dates)} at {redact_uri(config.output)}")
    depth = load_depth_maps(config)

    ok_filter = selection & (pc.field("status") == STATUS_OK) & pc.field("score").is_valid()
    scores = rows.distribution(HISTOGRAM_BINS)
    grids = thumbnail_grids(dataset, ok_filter, rows, scores.total, config.thumbnails)
    summaries = run_summaries(config, dates)
    shown = [row for grid in grids for row in grid.rows]
    tiles = make_tiles(shown, config, thumbnail_access(config, summaries), depth) if shown else []
    failures = error_groups(dataset, selection & (pc.field("status") != STATUS_OK))
    return render_page(ReportContent(output=config.output, model_id=config.model_id, dates=dates, counts=counts,
                                     summaries=summaries, scores=scores, failures=failures, grids=grids,
                                     tiles=tiles, depth_label=depth.label if depth is not None else ""))


def run_command(args: argparse.Namespace) -> int:
    """Check where the page goes, then build and write it.

    An unwritable ``--html`` is an ``OutputError`` (one line, exit 2 in ``dgiqa``) before the output's rows are
    read or any image fetched, not after minutes of reading.
    """
    config = ReportConfig(output=args.output, run_date=args.run_date, date_from=args.date_from,
                          date_to=args.date_to, model_id=args.model_id, thumbnails=args.thumbnails,
                          depth_weights=args.depth_weights, encoder=args.encoder, depth_version=args.depth_version,
                          device=args.device, storage_options=args.storage_options,
                          allow_prefixes=tuple(args.allow_prefix), max_bytes=args.max_bytes)
    check_writable(args.html, args.storage_options, flag="--html", folder=False)
    page = build_report(config)
    with fsspec.open(args.html, "w", encoding="utf-8", **args.storage_options) as f:
        f.write(page)
    print(f"wrote {redact_uri(args.html)} ({len(page.encode()) // 1024} KiB)")
    return 0
