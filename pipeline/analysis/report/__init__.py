"""``dgiqa report``: one self-contained HTML page about a run, or a range of runs, of the scores output.

The page answers the morning-after questions: how many images were scored, failed or rejected each night; why
they failed (messages grouped with URIs and numbers taken out, so one cause is one line); how the scores are
spread; and what the lowest- and highest-scoring photos look like, optionally beside the depth map DGIQA saw.

One module per concern, each saying why it works the way it does:

* ``config``: what is asked for (``ReportConfig``), checked when built.
* ``selection``: the run dates, row counts, scores, thumbnail rows and run summaries, read through pyarrow
  filters so that ``run_date`` prunes whole partitions and row-group statistics answer the score thresholds.
* ``failures``: ``error`` and ``rejected`` messages grouped by cause.
* ``thumbnails``: which images may be read (only ``ok`` rows, each checked against the allowlist again before any
  request) and the threaded reads that make each tile; the report never fails for one image.
* ``depth``: the depth map beside a tile, from the model the scores were made with.
* ``page``: the one HTML file that loads nothing, its CSS and its Content-Security-Policy.
* ``build``: ``build_report`` and the command, calling the others in order.

URIs and messages on the page are redacted (``pipeline.batch.allowlist.redact_uri``/``redact_text``: no
``user:password@``, no signed-URL query values), and no message quotes the bytes of a fetched object.
"""

from pipeline.analysis.report.build import build_report, run_command
from pipeline.analysis.report.config import ReportConfig, ReportError
from pipeline.analysis.report.failures import ErrorGroup
from pipeline.analysis.report.page import CSP, ERROR_GROUPS_SHOWN, HISTOGRAM_BINS, STYLE
from pipeline.analysis.report.selection import TileGrid
from pipeline.analysis.report.thumbnails import (
    FETCH_THREADS,
    THUMBNAIL_PX,
    ThumbnailAccess,
    Tile,
    fetch_threads,
    thumbnail_access,
)

__all__ = [
    "CSP",
    "ERROR_GROUPS_SHOWN",
    "FETCH_THREADS",
    "HISTOGRAM_BINS",
    "STYLE",
    "THUMBNAIL_PX",
    "ErrorGroup",
    "ReportConfig",
    "ReportError",
    "ThumbnailAccess",
    "Tile",
    "TileGrid",
    "build_report",
    "run_command",
    "fetch_threads",
    "thumbnail_access",
]
