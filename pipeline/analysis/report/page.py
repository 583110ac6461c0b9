"""The report page: its markup, its CSS and the Content-Security-Policy that lets it load nothing.

One file that loads nothing: CSS inline, charts inline SVG (``pipeline/analysis/svg.py``), thumbnails ``data:``
URIs. It can be attached to a ticket or opened offline, and opening it tells no server which photos were viewed.
Every string from the data (URIs, error messages, model ids, summaries) is HTML-escaped, and the page carries a
Content-Security-Policy that allows no script and no load from anywhere, so even a missed escape in a crafted URI
cannot run code or call out.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from html import escape

from pipeline.analysis import svg
from pipeline.analysis.report.failures import ErrorGroup
from pipeline.analysis.report.selection import ScoreDistribution, TileGrid, span
from pipeline.analysis.report.thumbnails import Tile
from pipeline.batch.allowlist import redact_uri
from pipeline.batch.output import PARTITION, STATUS_ERROR, STATUS_OK, STATUS_REJECTED, STATUSES

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
HISTOGRAM_BINS = 20
ERROR_GROUPS_SHOWN = 25


@dataclass(frozen=True)
class ReportContent:
    """Everything the page shows, as read from the output and the images; the page adds only markup.

    Attributes:
        output: Output root URI (redacted on the page).
        model_id: The ``--model-id`` asked for, if any.
        dates: The selected run dates, oldest first.
        counts: Rows by ``(run_date, model_id, status)``.
        summaries: The selected runs' summaries.
        scores: The histogram and per-date boxes of the finite ``ok`` scores.
        failures: Failure causes, most frequent first.
        grids: The thumbnail grids, in page order.
        tiles: The tiles of all grids, one after the other in the grids' order.
        depth_label: The depth checkpoint's label when depth maps are shown; empty when they are not.
    """

    output: str
    model_id: str | None
    dates: Sequence[str]
    counts: Mapping[tuple[str, str, str], int]
    summaries: list[dict]
    scores: ScoreDistribution
    failures: list[ErrorGroup]
    grids: list[TileGrid]
    tiles: list[Tile]
    depth_label: str = ""


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
                   f'(reruns that found every row done before, or empty manifests; {_e(span(dates))}), '
                   "not listed.</p>")
    return out


def _scores_section(scores: ScoreDistribution, dates: Sequence[str]) -> list[str]:
    out = ["<h2>Scores of ok images</h2>"]
    total = scores.total
    if not total:
        return [*out, '<p class="muted">No ok rows with a score in this selection.</p>']
    # Over several run dates an image scored on each counts once a night: the bars count scores, not images.
    several = len(dates) > 1
    counted = f"{_num(total)} scores over {len(dates)} run dates" if several else f"{_num(total)} images"
    out.append(svg.histogram(scores.histogram, 0.0, 1.0, title=f"Score histogram ({counted})",
                             x_label="score", y_label="scores" if several else "images"))
    if several:
        out.append(svg.box_plot(sorted(scores.boxes.items()), 0.0, 1.0,
                                title="Score by run date (median, quartiles, range)", x_label="run date",
                                y_label="score"))
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


def render_page(content: ReportContent) -> str:
    """The page of ``content``, as one HTML string that loads nothing."""
    counts, dates, model_id = content.counts, content.dates, content.model_id
    model_ids = sorted({model for _, model, _ in counts})
    totals = Counter()
    for (_, _, status), n in counts.items():
        totals[status] += n
    several = len(model_ids) > 1
    where = redact_uri(content.output)
    generated = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    date_text = dates[0] if len(dates) == 1 else f"{dates[0]} to {dates[-1]} ({len(dates)} run dates)"
    date_html = (f'<span class="date">{_e(dates[0])}</span>' if len(dates) == 1 else
                 f'<span class="date">{_e(dates[0])}</span> to <span class="date">{_e(dates[-1])}</span> '
                 f"({len(dates)} run dates)")
    model_meta = f' · model <code class="id">{_e(model_id)}</code>' if model_id is not None else ""
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
    body += _summaries_section(content.summaries)
    body += _scores_section(content.scores, content.dates)
    body += _errors_section(content.failures)
    depth_label = content.depth_label
    if depth_label:
        note = "" if any(depth_label.split("@")[-1] in m for m in model_ids) else (
            " These are not the depth weights the scores were made with.")
        body.append(f'<p class="meta" id="depth-model">Depth maps by <code>{_e(depth_label)}</code>, computed with '
                    f"the scoring preprocessing.{_e(note)}</p>")
    with_depth = bool(depth_label)
    start = 0
    for grid in content.grids:
        body += _tiles_section(grid, content.tiles[start:start + len(grid.rows)], several, with_depth)
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

