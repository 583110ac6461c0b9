"""``dgiqa report``: one self-contained HTML page about a run, or a range of runs, of the scores output.

The page answers the morning-after questions: how many images were scored, failed or rejected each night; why
they failed (messages grouped with URIs and numbers taken out, so one cause is one line); how the scores are
spread; and what the lowest- and highest-scoring photos look like, optionally beside the depth map DGIQA saw.

Why it is built the way it is:

* One file that loads nothing: CSS inline, charts inline SVG (``pipeline/analysis/svg.py``), thumbnails ``data:`` URIs.
  It can be attached to a ticket or opened offline, and opening it tells no server which photos were viewed.
* Every string from the data (URIs, error messages, model ids, summaries) is HTML-escaped, and the page carries
  a Content-Security-Policy that allows no script and no load from anywhere, so even a missed escape in a
  crafted URI cannot run code or call out.
* Only ``ok`` rows' objects are read, and each is checked again before any request: a part file is data, and
  whoever can write one under the output could otherwise make the report's host fetch any URI (another bucket,
  ``file:///etc/passwd``, the metadata service). The allowlist is ``--allow-prefix``, else the union of the
  ``allowed_prefixes`` that the selected runs recorded in their summaries; a row of a run that recorded none is
  not read unless ``--allow-prefix`` is given. Reads go through ``pipeline.batch.stages.read_image_bytes`` (no
  ``..``, no ``::`` chaining, no redirects, ``--max-bytes``). ``rejected`` rows are never read. An image that is
  refused or can no longer be read gets a tile saying why; the report never fails for one image.
* URIs and messages on the page are redacted (``pipeline.batch.allowlist.redact_uri``/``redact_text``: no
  ``user:password@``, no signed-URL query values), and no message quotes the bytes of a fetched object.
* The output is read through pyarrow filters: ``run_date`` prunes whole partitions, and the thumbnails' rows
  are found by two score thresholds, which row-group statistics of the score-sorted part files answer without
  reading most rows.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import datetime as dt
import io
import json
import posixpath
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from html import escape

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import torch
from PIL import Image
from torch import nn

from pipeline.analysis import svg
from pipeline.analysis.query import open_scores
from pipeline.batch.allowlist import Allowlist, RejectedURI, redact_text, redact_uri
from pipeline.batch.output import PARTITION, STATUS_ERROR, STATUS_OK, STATUS_REJECTED, STATUSES, check_writable
from pipeline.batch.resources import available_memory_bytes
from pipeline.batch.stages import read_image_bytes
from pipeline.limits import DEFAULT_MAX_BYTES
from pipeline.models import depth_anything as da
from pipeline.scoring.preprocess import (
    PreparedImage,
    PreprocessConfig,
    decode_image,
    depth_to_map,
    prepare_image,
    preprocess_peak_bytes,
)
from pipeline.scoring.scorer import DEVICE_CHOICES, ENCODER_CHOICES, read_depth_weights, resolve_device

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
THUMBNAIL_PX = 192
HISTOGRAM_BINS = 20
ERROR_GROUPS_SHOWN = 25
FETCH_THREADS = 8  # at most: object reads wait on the network; decoding releases the GIL

_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


class ReportError(ValueError):
    """The report cannot be made as asked (nothing selected, bad dates); the message says why in one line."""


@dataclass(frozen=True)
class ReportConfig:
    """What to report on and what to show; cheap to build.

    Attributes:
        output: Output root URI of the scoring job (holds ``run_date=YYYY-MM-DD/`` partitions).
        run_date: Report on this one partition.
        date_from: First partition of a range (inclusive); alone, the range runs to the newest partition.
        date_to: Last partition of a range (inclusive); alone, the range starts at the oldest partition.
            With no date at all, the newest partition (holding rows of ``model_id``, if given) is reported.
        model_id: Only rows of this model; default all, and the page says when there are several.
        thumbnails: Lowest- and highest-scoring ``ok`` images shown, each; 0 reads no image at all. With fewer
            than twice as many ``ok`` rows, each is shown once in one grid (two would repeat the same images).
        depth_weights: Depth Anything checkpoint URI; when given, each thumbnail has its depth map beside it.
        encoder: Depth Anything encoder, or ``auto`` to read it from the checkpoint.
        depth_version: ``v1`` or ``v2``, as the scores were made with.
        device: Where the depth model runs: ``auto``, ``cpu`` or ``cuda``.
        preprocess: Decode limits and depth-input size; the scoring defaults, so the depth map is the one
            DGIQA saw.
        storage_options: fsspec options for the output, the images and the weights.
        allow_prefixes: Where thumbnails may be read from; empty for the ``allowed_prefixes`` the selected runs
            recorded in their summaries (rows of runs that recorded none are then not read).
        max_bytes: The byte limit per image read for a thumbnail.
    """

    output: str
    run_date: str | None = None
    date_from: str | None = None
    date_to: str | None = None
    model_id: str | None = None
    thumbnails: int = 12
    depth_weights: str | None = None
    encoder: str = "auto"
    depth_version: str = "v1"
    device: str = "auto"
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    storage_options: Mapping | None = None
    allow_prefixes: tuple[str, ...] = ()
    max_bytes: int = DEFAULT_MAX_BYTES

    def __post_init__(self):
        for name in ("run_date", "date_from", "date_to"):
            value = getattr(self, name)
            if value is not None:
                _check_date(value, name)
        if self.run_date is not None and (self.date_from is not None or self.date_to is not None):
            raise ReportError("give either a run date or a range (from/to), not both")
        if self.date_from is not None and self.date_to is not None and self.date_from > self.date_to:
            raise ReportError(f"the range starts after it ends: from {self.date_from} to {self.date_to}")
        if self.thumbnails < 0:
            raise ReportError(f"thumbnails must be 0 or more, got {self.thumbnails}")
        if self.encoder not in ENCODER_CHOICES:
            raise ReportError(f"encoder must be one of {', '.join(ENCODER_CHOICES)}, got {self.encoder!r}")
        if self.device not in DEVICE_CHOICES:
            raise ReportError(f"device must be one of {', '.join(DEVICE_CHOICES)}, got {self.device!r}")
        if self.depth_version not in da.VERSIONS:
            raise ReportError(f"depth_version must be one of {', '.join(da.VERSIONS)}, got {self.depth_version!r}")
        if self.max_bytes < 1:
            raise ReportError(f"max_bytes must be at least 1, got {self.max_bytes}")


def _check_date(text: str, what: str) -> str:
    try:
        if not _DATE.fullmatch(text):
            raise ValueError
        dt.date.fromisoformat(text)
    except ValueError:
        raise ReportError(f"{what} must be a date as YYYY-MM-DD, got {text!r}") from None
    return text


def _partition_dates(dataset: pads.Dataset) -> list[str]:
    """The ``run_date`` values present, from the file paths alone (nothing is read)."""
    dates = set()
    for fragment in dataset.get_fragments():
        value = pads.get_partition_keys(fragment.partition_expression).get(PARTITION)
        if value is not None:
            dates.add(value)
    return sorted(dates)


def _span(dates: Sequence[str]) -> str:
    if not dates:
        return "none"
    return dates[0] if len(dates) == 1 else f"{len(dates)} dates from {dates[0]} to {dates[-1]}"


def _select_dates(dataset: pads.Dataset, config: ReportConfig) -> list[str]:
    present = _partition_dates(dataset)
    where = redact_uri(config.output)
    if not present:
        raise ReportError(f"no scores at {where}: no run_date=YYYY-MM-DD partitions")
    if config.run_date is not None:
        if config.run_date not in present:
            raise ReportError(f"no run_date={config.run_date} partition at {where} (present: {_span(present)})")
        return [config.run_date]
    if config.date_from is not None or config.date_to is not None:
        lo, hi = config.date_from or present[0], config.date_to or present[-1]
        selected = [d for d in present if lo <= d <= hi]
        if not selected:
            raise ReportError(f"no run_date partition from {lo} to {hi} at {where} (present: {_span(present)})")
        return selected
    if config.model_id is not None:
        with_model = set()
        for batch in dataset.to_batches(columns=[PARTITION], filter=pc.field("model_id") == config.model_id):
            with_model.update(pc.unique(batch.column(0)).to_pylist())
        if not with_model:
            raise ReportError(f"no rows of model {config.model_id} at {where} (dates present: {_span(present)})")
        return [max(with_model)]
    return [present[-1]]


_NORMALIZERS = [
    (re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s,;()'\"]*"), "<uri>"),
    (re.compile(r"(?<![\w/.<>])(?:/[^\s/,;()'\"]+)+/?"), "<uri>"),
    (re.compile(r"\bb?'(?:[^'\\]|\\.)*'|\bb?\"(?:[^\"\\]|\\.)*\""), "'…'"),
    (re.compile(r"\b[0-9a-fA-F]{8,}\b"), "<hex>"),
    (re.compile(r"\d+(?:\.\d+)?"), "N"),
    (re.compile(r"\s+"), " "),
]


def normalize_error(message: str | None) -> str:
    """An error message with URIs, paths, quoted values, hashes and numbers replaced by placeholders.

    Messages name the image and its sizes; without them, one cause (a truncated file, a missing object) reads
    the same for every image, so the report can count causes instead of listing every message.
    """
    if not message:
        return "(no message)"
    text = message
    for pattern, replacement in _NORMALIZERS:
        text = pattern.sub(replacement, text)
    return text.strip()


@dataclass(frozen=True)
class ErrorGroup:
    """One failure cause: rows whose messages read the same once normalised.

    Attributes:
        status: ``error`` or ``rejected``.
        reason: The normalised message.
        count: Rows with this cause.
        example_uri: One such row's URI (the smallest, so reruns show the same one).
        example_message: That row's message as written.
    """

    status: str
    reason: str
    count: int
    example_uri: str
    example_message: str


def _error_groups(dataset: pads.Dataset, failed: pc.Expression) -> list[ErrorGroup]:
    """Group the rows matching ``failed`` by status and normalised message, most frequent first.

    Batch by batch, so memory follows the number of causes, not of failed rows: each batch's distinct
    messages are normalised and merged into the groups.
    """
    groups: dict[tuple[str, str], list] = {}
    for batch in dataset.to_batches(columns=["status", "error", "uri"], filter=failed):
        if not batch.num_rows:
            continue
        table = pa.table({"status": batch.column("status"), "error": pc.fill_null(batch.column("error"), ""),
                          "uri": batch.column("uri")})
        distinct = table.group_by(["status", "error"]).aggregate([("uri", "min"), ("uri", "count")])
        for status, message, uri, count in zip(*(distinct.column(c).to_pylist() for c in
                                                 ("status", "error", "uri_min", "uri_count")), strict=True):
            message, uri = redact_text(message), redact_uri(uri)
            group = groups.setdefault((status, normalize_error(message)), [0, uri, message])
            group[0] += count
            if uri < group[1]:
                group[1], group[2] = uri, message
    return sorted((ErrorGroup(status, reason, n, uri, message) for (status, reason), (n, uri, message)
                   in groups.items()), key=lambda g: (-g.count, g.status, g.reason))


def _count_rows(dataset: pads.Dataset, selection: pc.Expression) -> Counter:
    """Rows by ``(run_date, model_id, status)``, counted batch by batch (no column is held whole)."""
    counts: Counter = Counter()
    keys = [PARTITION, "model_id", "status"]
    for batch in dataset.to_batches(columns=keys, filter=selection):
        if batch.num_rows:
            grouped = pa.Table.from_batches([batch]).group_by(keys).aggregate([("status", "count")])
            for *key, n in zip(*(grouped.column(c).to_pylist() for c in [*keys, "status_count"]), strict=True):
                counts[tuple(key)] += n
    return counts


def _scores_by_date(dataset: pads.Dataset, ok_filter: pc.Expression, dates: Sequence[str]) -> dict[str, np.ndarray]:
    """The finite scores of each selected date; one partition is read at a time, only its score column."""
    by_date = {}
    for date in dates:
        column = dataset.to_table(columns=["score"], filter=ok_filter & (pc.field(PARTITION) == date)).column(0)
        values = column.to_numpy(zero_copy_only=False).astype(np.float64)
        by_date[date] = values[np.isfinite(values)]
    return by_date


@dataclass(frozen=True)
class Tile:
    """One thumbnail of a grid (lowest, highest, or all), or the reason there is none.

    Attributes:
        uri: The image's URI.
        score: Its score.
        run_date: Partition of the row.
        model_id: Model that scored it.
        image: ``data:`` URI of the JPEG thumbnail; ``None`` when the image could not be shown.
        depth: ``data:`` URI of the grayscale depth-map thumbnail, when depth maps were asked for.
        problem: Why the image (or its depth map) is not shown.
    """

    uri: str
    score: float
    run_date: str
    model_id: str
    image: str | None = None
    depth: str | None = None
    problem: str | None = None


def _data_uri(image: Image.Image) -> str:
    image = image.copy()
    image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _describe(exc: Exception) -> str:
    if isinstance(exc, FileNotFoundError):
        return "no such file or object"
    if isinstance(exc, IsADirectoryError):
        return "a folder, not an image"
    if isinstance(exc, ValueError):  # ImageError: the reader's or the decoder's own one-line reason
        return redact_text(str(exc))
    return redact_text(f"{type(exc).__name__}: {exc}")


@dataclass(frozen=True)
class ThumbnailAccess:
    """Which thumbnails may be read: an allowlist, the runs it covers, and the byte limit.

    Attributes:
        allowlist: ``--allow-prefix``, else the union of the selected runs' recorded ``allowed_prefixes``;
            None when neither exists (nothing is read).
        runs: The ``run_id`` of every run whose rows the allowlist covers; None: every row (``--allow-prefix``).
        max_bytes: The byte limit per image.
    """

    allowlist: Allowlist | None
    runs: frozenset[str] | None
    max_bytes: int = DEFAULT_MAX_BYTES

    def refusal(self, run_id: str | None) -> str | None:
        """Why a row of ``run_id`` is not read at all, or None when its URI may be checked and read."""
        if self.allowlist is not None and (self.runs is None or run_id in self.runs):
            return None
        return (f"not read: run {run_id or '(unnamed)'} recorded no allowed prefixes in its summary; give "
                "--allow-prefix to show its images")


def thumbnail_access(config: ReportConfig, summaries: Sequence[Mapping]) -> ThumbnailAccess:
    """The allowlist of the report's reads, from ``--allow-prefix`` or from the runs' own summaries.

    Never from the rows themselves: a part file written by anyone would allow its own URIs. A summary's prefixes
    that are not plain prefixes are ignored, and a run with none usable counts as one that recorded none.
    """
    if config.allow_prefixes:
        return ThumbnailAccess(Allowlist(config.allow_prefixes), None, config.max_bytes)
    prefixes, runs = set(), set()
    for summary in summaries:
        recorded = summary.get("allowed_prefixes")
        usable = []
        for prefix in recorded if isinstance(recorded, list) else []:
            try:
                usable.append(Allowlist([prefix]).prefixes[0])
            except (RejectedURI, TypeError, ValueError):
                continue
        if usable and isinstance(summary.get("run_id"), str):
            prefixes.update(usable)
            runs.add(summary["run_id"])
    return ThumbnailAccess(Allowlist(prefixes) if prefixes else None, frozenset(runs), config.max_bytes)


def _fetch(uri: str, config: ReportConfig, access: ThumbnailAccess,
           keep_depth_input: bool) -> tuple[str | None, PreparedImage | None, str]:
    """Check, read, decode and shrink one image: ``(thumbnail, depth input or None, problem)``; never raises."""
    try:
        data = read_image_bytes(uri, config.storage_options, allowlist=access.allowlist, max_bytes=access.max_bytes)
        rgb = decode_image(data, config.preprocess)
        thumbnail = _data_uri(Image.fromarray(rgb))
        prepared = prepare_image(rgb, config.preprocess) if keep_depth_input else None
        return thumbnail, prepared, ""
    except RejectedURI as exc:
        return None, None, f"not read: {redact_text(str(exc))}"
    except Exception as exc:  # noqa: BLE001 - one unreadable image is a placeholder tile, never a failed report
        return None, None, f"cannot show this image: {_describe(exc)}"


@torch.inference_mode()
def _depth_uri(model: nn.Module, device: torch.device, prepared: PreparedImage) -> str:
    depth = model(prepared.depth_input[None].to(device)).float()[0]
    return _data_uri(Image.fromarray(depth_to_map(depth, prepared.height, prepared.width)))  # uint8 (H, W): gray


def fetch_threads(config: ReportConfig, max_bytes: int, available: int | None = None) -> int:
    """Threads that read and decode thumbnails: up to ``FETCH_THREADS``, as many as half the free memory holds.

    Each thread may hold one image at ``--max-pixels`` being decoded (``preprocess_peak_bytes``) and its encoded
    bytes (at most ``--max-bytes``), so a report over 100-megapixel photos on a small machine decodes fewer at
    once rather than running out of memory.
    """
    available = available_memory_bytes() if available is None else available
    if available is None:
        return FETCH_THREADS
    per_image = preprocess_peak_bytes(config.preprocess.max_pixels, config.preprocess) + max_bytes
    return max(1, min(FETCH_THREADS, available // 2 // per_image))


def _tiles(rows: list[dict], config: ReportConfig, access: ThumbnailAccess,
           depth: tuple[nn.Module, torch.device] | None) -> list[Tile]:
    """A tile per row, in order; each image is read (and its depth map computed) once however often it is shown.

    A row of a run the allowlist does not cover gets a placeholder and its URI is not read for it.
    """
    refusals = [access.refusal(row.get("run_id")) for row in rows]
    uris = sorted({row["uri"] for row, refusal in zip(rows, refusals, strict=True) if refusal is None})
    with concurrent.futures.ThreadPoolExecutor(fetch_threads(config, access.max_bytes)) as pool:
        fetched = dict(zip(uris, pool.map(lambda u: _fetch(u, config, access, depth is not None), uris),
                           strict=True))
    shown: dict[str, tuple[str | None, str | None, str]] = {}
    for uri, (thumbnail, prepared, problem) in fetched.items():
        depth_uri = None
        if prepared is not None and depth is not None:
            try:
                depth_uri = _depth_uri(*depth, prepared)
            except Exception as exc:  # noqa: BLE001 - the photo is still shown
                problem = f"no depth map: {redact_text(f'{type(exc).__name__}: {exc}')}"
        shown[uri] = (thumbnail, depth_uri, problem)
    tiles = []
    for row, refusal in zip(rows, refusals, strict=True):
        image, depth_map, problem = (None, None, refusal) if refusal is not None else shown[row["uri"]]
        tiles.append(Tile(uri=redact_uri(row["uri"]), score=row["score"], run_date=row[PARTITION],
                          model_id=row["model_id"], image=image, depth=depth_map, problem=problem or None))
    return tiles


@dataclass(frozen=True)
class TileGrid:
    """One grid of thumbnails on the page: its element id, heading, an optional note, and its rows in order."""

    css_id: str
    title: str
    rows: list[dict]
    note: str = ""


def _thumbnail_grids(dataset: pads.Dataset, ok_filter: pc.Expression, scores: np.ndarray, n: int) -> list[TileGrid]:
    """The ``n`` lowest (ascending) and ``n`` highest (descending) ``ok`` rows, or all of them in one grid.

    With fewer than ``2 n`` rows the two grids would overlap (three images would fill both), so every row is
    shown once, lowest score first, in one grid that says why. Rows are in one order (score, then URI, then run
    date), so the two grids never share a row. Only rows at or beyond the two threshold scores are read, which
    the score-sorted part files' row-group statistics mostly answer without reading the rest.
    """
    if n == 0 or scores.size == 0:
        return []
    ordered = np.sort(scores)
    low, high = float(ordered[min(n, scores.size) - 1]), float(ordered[-min(n, scores.size)])
    score = pc.field("score")
    table = dataset.to_table(columns=["uri", "score", "model_id", "run_id", PARTITION],
                             filter=ok_filter & ((score <= low) | (score >= high)))
    rows = sorted((r for r in table.to_pylist() if np.isfinite(r["score"])),
                  key=lambda r: (r["score"], r["uri"], r[PARTITION]))
    if len(rows) < 2 * n:
        noun = "image" if len(rows) == 1 else "images"
        return [TileGrid("all-ok", f"All {len(rows)} ok {noun}, lowest score first", rows,
                         f"Fewer than 2 × {n} (--thumbnails) ok images, so each is shown once, in one grid, "
                         "instead of in a lowest and a highest grid.")]
    return [TileGrid("lowest", f"Lowest {n} scores", rows[:n]),
            TileGrid("highest", f"Highest {n} scores", rows[-n:][::-1])]


def _run_summaries(config: ReportConfig, dates: Sequence[str]) -> list[dict]:
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


STYLE = """
:root { color-scheme: light; --ink: #1d2330; --muted: #5c6475; --line: #d8dce5; --ok: #2e7d4f;
        --error: #b3261e; --rejected: #8a5a00; --bar: #4866b0; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, sans-serif; color: var(--ink); margin: 0 auto; padding: 24px; max-width: 1280px; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 17px; margin: 28px 0 8px; }
.muted, .meta { color: var(--muted); }
.notice { border-left: 4px solid var(--rejected); background: #fff7e6; padding: 8px 12px; margin: 12px 0; }
.cards { display: flex; gap: 12px; flex-wrap: wrap; margin: 16px 0; }
.card { border: 1px solid var(--line); border-radius: 6px; padding: 10px 16px; min-width: 120px; }
.card .n { font-size: 22px; font-weight: 600; display: block; }
.card.ok .n { color: var(--ok); } .card.error .n { color: var(--error); } .card.rejected .n { color: var(--rejected); }
table { border-collapse: collapse; margin: 8px 0; }
th, td { border-bottom: 1px solid var(--line); padding: 4px 10px; text-align: left; vertical-align: top; }
th, .date, code.id, td.n { white-space: nowrap; }
.scroll { overflow-x: auto; }
td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; }
code { font-size: 12px; } code.uri { overflow-wrap: anywhere; }
svg.chart { max-width: 100%; height: auto; display: block; margin: 8px 0; }
svg .bar { fill: var(--bar); } svg .quartiles { fill: #c9d4f0; stroke: var(--bar); }
svg .median { stroke: var(--ink); stroke-width: 2; } svg .whisker { stroke: var(--bar); }
svg .axis { stroke: var(--ink); } svg .grid { stroke: var(--line); }
svg text { font: 11px system-ui, sans-serif; fill: var(--muted); }
svg .chart-title { font-weight: 600; fill: var(--ink); }
.grid-tiles { display: grid; grid-template-columns: repeat(auto-fill, minmax(220px, 1fr)); gap: 14px; }
.grid-tiles.with-depth { grid-template-columns: repeat(auto-fill, minmax(400px, 1fr)); }
figure.tile { margin: 0; border: 1px solid var(--line); border-radius: 6px; padding: 8px; }
.pics { display: flex; gap: 6px; align-items: flex-start; min-height: 96px; }
.pics img { max-width: 192px; max-height: 192px; }
.placeholder { width: 192px; height: 144px; background: #f0f1f4; color: var(--error); padding: 10px;
               font-size: 12px; overflow: hidden; overflow-wrap: anywhere; }
figcaption { margin-top: 6px; font-size: 12px; } figcaption .score { font-weight: 600; font-size: 14px; }
"""


def _e(value: object) -> str:
    return escape("" if value is None else str(value), quote=True)


def _num(value: int) -> str:
    return f"{value:,}"


def _counts_section(counts: Mapping[tuple[str, str, str], int], several_models: bool) -> list[str]:
    by_key: dict[tuple[str, str], Counter] = {}
    for (date, model, status), n in counts.items():
        by_key.setdefault((model if several_models else "", date), Counter())[status] += n
    statuses = list(STATUSES) + sorted({s for c in by_key.values() for s in c} - set(STATUSES))
    head = (["<th>model id</th>"] if several_models else []) + ["<th>run date</th>"]
    head += [f'<th class="n">{_e(s)}</th>' for s in statuses] + ['<th class="n">total</th>']
    out = ["<h2>Rows by run date and status</h2>", '<div class="scroll"><table class="counts">',
           f"<tr>{''.join(head)}</tr>"]
    for (model, date), by_status in sorted(by_key.items()):
        cells = [f'<td><code class="id">{_e(model)}</code></td>'] if several_models else []
        cells.append(f'<td class="date">{_e(date)}</td>')
        cells += [f'<td class="n" data-status="{_e(s)}">{_num(by_status[s])}</td>' for s in statuses]
        cells.append(f'<td class="n" data-status="total">{_num(sum(by_status.values()))}</td>')
        out.append(f'<tr data-run-date="{_e(date)}" data-model-id="{_e(model)}">{"".join(cells)}</tr>')
    out.append("</table></div>")
    return out


def _summaries_section(summaries: list[dict]) -> list[str]:
    """The Runs table: one row per run that wrote rows; runs that wrote none are one count under it.

    A nightly job rerun after a finished night writes nothing (every row was done before); listing each such
    rerun as a "0 written" row would bury the runs that did the work.
    """
    if not summaries:
        return []
    idle = [s for s in summaries if s.get("rows_written") == 0]
    worked = [s for s in summaries if s.get("rows_written") != 0]
    out = ["<h2>Runs (from their summaries)</h2>"]
    if worked:
        out += ['<div class="scroll"><table class="summaries">',
                "<tr><th>run date</th><th>run id</th><th>manifest</th><th class=\"n\">manifest rows</th>"
                "<th class=\"n\">written</th><th class=\"n\">skipped (done before)</th><th>status counts</th>"
                "<th class=\"n\">wall time s</th><th class=\"n\">images/s</th></tr>"]
    for s in sorted(worked, key=lambda s: (str(s.get(PARTITION)), str(s.get("run_id")))):
        counts = s.get("status_counts")
        counts_text = ", ".join(f"{k} {v}" for k, v in counts.items()) if isinstance(counts, dict) else counts
        out.append(f'<tr class="summary"><td class="date">{_e(s.get(PARTITION))}</td>'
                   f'<td><code class="id">{_e(s.get("run_id"))}</code></td>'
                   f'<td><code class="uri">{_e(s.get("manifest"))}</code></td>'
                   f'<td class="n">{_e(s.get("manifest_rows"))}</td>'
                   f'<td class="n">{_e(s.get("rows_written"))}</td>'
                   f'<td class="n">{_e(s.get("skipped_done_before"))}</td><td>{_e(counts_text)}</td>'
                   f'<td class="n">{_e(s.get("wall_time_s"))}</td><td class="n">{_e(s.get("images_per_s"))}</td></tr>')
    if worked:
        out.append("</table></div>")
    if idle:
        runs = "1 run" if len(idle) == 1 else f"{len(idle)} runs"
        dates = sorted(str(s.get(PARTITION)) for s in idle)
        out.append(f'<p class="muted" id="runs-wrote-nothing" data-count="{len(idle)}">{runs} wrote nothing '
                   f'(reruns that found every row done before, or empty manifests; {_e(_span(dates))}), '
                   "not listed.</p>")
    return out


def _scores_section(scores: Mapping[str, np.ndarray]) -> list[str]:
    out = ["<h2>Scores of ok images</h2>"]
    total = sum(v.size for v in scores.values())
    if not total:
        return [*out, '<p class="muted">No ok rows with a score in this selection.</p>']
    counts = sum(np.histogram(np.clip(v, 0.0, 1.0), bins=HISTOGRAM_BINS, range=(0.0, 1.0))[0] for v in scores.values())
    out.append(svg.histogram(counts.tolist(), 0.0, 1.0, title=f"Score histogram ({_num(total)} images)",
                             x_label="score", y_label="images"))
    if len(scores) > 1:
        groups = [(date, svg.BoxStats(*(float(q) for q in np.percentile(v, [0, 25, 50, 75, 100])), count=v.size))
                  for date, v in sorted(scores.items()) if v.size]
        out.append(svg.box_plot(groups, 0.0, 1.0, title="Score by run date (median, quartiles, range)",
                                x_label="run date", y_label="score"))
    return out


def _errors_section(groups: list[ErrorGroup]) -> list[str]:
    out = ["<h2>Most frequent failure reasons</h2>"]
    if not groups:
        return [*out, '<p class="muted">No error or rejected rows in this selection.</p>']
    out += ['<p class="muted">URIs, quoted values, hashes and numbers are replaced by placeholders, so one cause '
            "is one line.</p>", '<div class="scroll"><table class="errors">',
            '<tr><th class="n">rows</th><th>status</th><th>reason</th><th>example</th></tr>']
    for g in groups[:ERROR_GROUPS_SHOWN]:
        out.append(f'<tr class="reason" data-count="{g.count}" data-status="{_e(g.status)}">'
                   f'<td class="n">{_num(g.count)}</td><td>{_e(g.status)}</td><td class="reason-text">{_e(g.reason)}'
                   f'</td><td><code class="uri">{_e(g.example_uri)}</code><br><span class="muted">'
                   f"{_e(g.example_message)}</span></td></tr>")
    out.append("</table></div>")
    if len(groups) > ERROR_GROUPS_SHOWN:
        rest = sum(g.count for g in groups[ERROR_GROUPS_SHOWN:])
        out.append(f'<p class="muted">{len(groups) - ERROR_GROUPS_SHOWN} more reasons, {_num(rest)} rows.</p>')
    return out


def _tile_html(tile: Tile, show_model: bool) -> str:
    if tile.image is None:
        pics = f'<div class="placeholder">{_e(tile.problem)}</div>'
    else:
        pics = f'<img class="photo" src="{tile.image}" alt="photo">'
        if tile.depth is not None:
            pics += f'<img class="depth" src="{tile.depth}" alt="depth map">'
        elif tile.problem:
            pics += f'<div class="placeholder">{_e(tile.problem)}</div>'
    model = f'<br><code class="model id">{_e(tile.model_id)}</code>' if show_model else ""
    return (f'<figure class="tile" data-uri="{_e(tile.uri)}" data-score="{tile.score:.6f}">'
            f'<div class="pics">{pics}</div><figcaption><span class="score">{tile.score:.4f}</span> '
            f'<span class="muted date">{_e(tile.run_date)}</span><br><code class="uri">{_e(tile.uri)}</code>{model}'
            "</figcaption></figure>")


def _tiles_section(grid: TileGrid, tiles: list[Tile], show_model: bool, with_depth: bool) -> list[str]:
    if not tiles:
        return []
    grid_class = "grid-tiles with-depth" if with_depth else "grid-tiles"
    note = [f'<p class="muted" id="{grid.css_id}-note">{_e(grid.note)}</p>'] if grid.note else []
    return [f"<h2>{_e(grid.title)}</h2>", *note, f'<div class="{grid_class}" id="{grid.css_id}">',
            *(_tile_html(tile, show_model) for tile in tiles), "</div>"]


def build_report(config: ReportConfig) -> str:
    """The report page for the selection in ``config``, as one HTML string that loads nothing.

    Raises:
        QueryError: There are no scores at ``config.output``.
        ReportError: The selection holds no rows.
        WeightsError: ``config.depth_weights`` cannot be read or is not a Depth Anything checkpoint.
    """
    dataset = open_scores(config.output, config.storage_options)
    dates = _select_dates(dataset, config)
    selection = pc.field(PARTITION).isin(dates)
    if config.model_id is not None:
        selection &= pc.field("model_id") == config.model_id
    counts = _count_rows(dataset, selection)
    if not counts:
        model = f" of model {config.model_id}" if config.model_id is not None else ""
        raise ReportError(f"no rows{model} in run_date {_span(dates)} at {redact_uri(config.output)}")
    depth = None
    depth_label = ""
    if config.depth_weights is not None and config.thumbnails:
        device = resolve_device(config.device)
        weights = read_depth_weights(config.depth_weights, config.encoder, config.depth_version,
                                     config.storage_options)
        depth_label, model = weights.label, weights.build()
        depth = (model.to(device), device)

    model_ids = sorted({model for _, model, _ in counts})
    totals = Counter()
    for (_, _, status), n in counts.items():
        totals[status] += n
    ok_filter = selection & (pc.field("status") == STATUS_OK) & pc.field("score").is_valid()
    scores = _scores_by_date(dataset, ok_filter, dates)
    grids = _thumbnail_grids(dataset, ok_filter, np.concatenate(list(scores.values())), config.thumbnails)
    summaries = _run_summaries(config, dates)
    shown = [row for grid in grids for row in grid.rows]
    tiles = _tiles(shown, config, thumbnail_access(config, summaries), depth) if shown else []
    groups = _error_groups(dataset, selection & (pc.field("status") != STATUS_OK))

    several = len(model_ids) > 1
    where = redact_uri(config.output)
    generated = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    date_text = dates[0] if len(dates) == 1 else f"{dates[0]} to {dates[-1]} ({len(dates)} run dates)"
    date_html = (f'<span class="date">{_e(dates[0])}</span>' if len(dates) == 1 else
                 f'<span class="date">{_e(dates[0])}</span> to <span class="date">{_e(dates[-1])}</span> '
                 f"({len(dates)} run dates)")
    model_meta = f' · model <code class="id">{_e(config.model_id)}</code>' if config.model_id is not None else ""
    body = [f"<h1>DGIQA scores: {date_html}</h1>",
            f'<p class="meta">Output <code class="uri">{_e(where)}</code> · generated '
            f'<span class="date">{_e(generated)}</span>{model_meta}</p>']
    if several:
        body.append(f'<div class="notice" id="several-models">{len(model_ids)} model ids in this selection: scores '
                    "of different models are not comparable, so rows are counted per model id; the charts and "
                    "thumbnails mix them (filter with --model-id). Models: "
                    + ", ".join(f'<code class="id">{_e(m)}</code>' for m in model_ids) + "</div>")
    elif model_ids:
        body.append(f'<p class="meta">Model <code class="id">{_e(model_ids[0])}</code></p>')
    body.append('<div class="cards">')
    body.append(f'<div class="card total"><span class="n">{_num(totals.total())}</span>rows</div>')
    for status in (STATUS_OK, STATUS_ERROR, STATUS_REJECTED):
        body.append(f'<div class="card {status}" data-status="{status}"><span class="n">{_num(totals[status])}'
                    f"</span>{status}</div>")
    body.append("</div>")
    body += _counts_section(counts, several)
    body += _summaries_section(summaries)
    body += _scores_section(scores)
    body += _errors_section(groups)
    if depth_label:
        note = "" if any(depth_label.split("@")[-1] in m for m in model_ids) else (
            " These are not the depth weights the scores were made with.")
        body.append(f'<p class="meta" id="depth-model">Depth maps by <code>{_e(depth_label)}</code>, computed with '
                    f"the scoring preprocessing.{_e(note)}</p>")
    with_depth = depth is not None
    start = 0
    for grid in grids:
        body += _tiles_section(grid, tiles[start:start + len(grid.rows)], several, with_depth)
        start += len(grid.rows)
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
        '<meta name="referrer" content="no-referrer">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>DGIQA report {_e(date_text)}</title>",
        f"<style>{STYLE}</style>",
        "</head><body>",
        *body,
        "</body></html>",
        "",
    ])


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
