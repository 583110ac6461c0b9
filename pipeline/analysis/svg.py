"""SVG charts: the HTML report's inline histogram and box plots, and ``dgiqa evaluate``'s separation figure.

The report must be one file that loads nothing, so the charts are SVG markup written here rather than a
plotting library's images or scripts. Every label is HTML-escaped (the charts are embedded in HTML), and the
``xmlns`` attribute is left out: inline SVG in HTML does not need it, and the report then holds no URL at all.
Each bar and box carries its numbers in ``data-*`` attributes and a ``<title>`` tooltip, so readers (and
tests) can check a chart without measuring pixels.

``separation_svg`` is a standalone SVG document (``--svg`` of ``dgiqa evaluate``), so it keeps its ``xmlns`` and
XML-escapes its text; the statistics it draws come from ``pipeline.analysis.metrics``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape
from typing import TYPE_CHECKING
from xml.sax.saxutils import escape as xml_escape

import numpy as np

if TYPE_CHECKING:
    from pipeline.analysis.metrics import Separation

MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 56, 16, 28, 48


@dataclass(frozen=True)
class BoxStats:
    """Five numbers summarising one group's values, and how many values there were.

    Attributes:
        low: Smallest value (the lower whisker).
        q1: First quartile (the box's lower edge).
        median: Median (the line across the box).
        q3: Third quartile (the box's upper edge).
        high: Largest value (the upper whisker).
        count: Number of values.
    """

    low: float
    q1: float
    median: float
    q3: float
    high: float
    count: int


def nice_ticks(top: float, max_ticks: int = 5, min_step: float = 0.0) -> list[float]:
    """Tick values from 0 up to at least ``top`` in steps of 1, 2 or 5 times a power of ten.

    Round steps make the axis readable; the last tick is at or above ``top`` so no bar leaves the plot.
    ``min_step`` 1 keeps counts on whole numbers.
    """
    if top <= 0:
        return [0.0, max(1.0, min_step)]
    raw = top / max(1, max_ticks - 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = max(min_step, next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw))
    count = math.ceil(top / step - 1e-9)
    return [i * step for i in range(count + 1)]


def _fmt(value: float) -> str:
    return f"{value:.2f}".rstrip("0").rstrip(".") if value != int(value) else str(int(value))


def _frame(width: int, height: int, title: str, body: list[str], x_label: str, y_label: str,
           css_class: str) -> str:
    plot_bottom = height - MARGIN_BOTTOM
    mid_x = (MARGIN_LEFT + width - MARGIN_RIGHT) / 2
    mid_y = (MARGIN_TOP + plot_bottom) / 2
    return "\n".join([
        f'<svg class="chart {escape(css_class)}" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
        f'role="img" aria-label="{escape(title)}">',
        f"<title>{escape(title)}</title>",
        f'<text class="chart-title" x="{MARGIN_LEFT}" y="18">{escape(title)}</text>',
        *body,
        f'<line class="axis" x1="{MARGIN_LEFT}" y1="{plot_bottom}" x2="{width - MARGIN_RIGHT}" y2="{plot_bottom}"/>',
        f'<line class="axis" x1="{MARGIN_LEFT}" y1="{MARGIN_TOP}" x2="{MARGIN_LEFT}" y2="{plot_bottom}"/>',
        f'<text class="axis-label" x="{mid_x:.1f}" y="{height - 6}" text-anchor="middle">{escape(x_label)}</text>',
        f'<text class="axis-label" x="14" y="{mid_y:.1f}" text-anchor="middle" '
        f'transform="rotate(-90 14 {mid_y:.1f})">{escape(y_label)}</text>',
        "</svg>",
    ])


def histogram(counts: Sequence[int], lo: float, hi: float, *, title: str, x_label: str, y_label: str,
              width: int = 640, height: int = 260) -> str:
    """An SVG histogram of ``counts`` over equal bins spanning ``[lo, hi]``.

    Args:
        counts: Values per bin, lowest bin first.
        lo: Lower edge of the first bin.
        hi: Upper edge of the last bin.
        title: Chart title (also its accessible name).
        x_label: Label under the x axis.
        y_label: Label beside the y axis.
        width: Width in pixels.
        height: Height in pixels.
    """
    if not counts or hi <= lo:
        raise ValueError(f"a histogram needs at least one bin and lo < hi, got {len(counts)} bins over [{lo}, {hi}]")
    plot_w = width - MARGIN_LEFT - MARGIN_RIGHT
    plot_h = height - MARGIN_TOP - MARGIN_BOTTOM
    bottom = MARGIN_TOP + plot_h
    ticks = nice_ticks(max(counts), min_step=1)
    top = ticks[-1]
    bin_w = plot_w / len(counts)
    body = []
    for tick in ticks:
        y = bottom - plot_h * tick / top
        body.append(f'<line class="grid" x1="{MARGIN_LEFT}" y1="{y:.1f}" x2="{width - MARGIN_RIGHT}" y2="{y:.1f}"/>')
        body.append(f'<text class="tick" x="{MARGIN_LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{_fmt(tick)}</text>')
    edge = (hi - lo) / len(counts)
    for i, count in enumerate(counts):
        bar_h = plot_h * count / top
        x = MARGIN_LEFT + i * bin_w
        start, end = lo + i * edge, lo + (i + 1) * edge
        body.append(f'<rect class="bar" data-bin="{i}" data-count="{int(count)}" x="{x + 1:.1f}" '
                    f'y="{bottom - bar_h:.1f}" width="{max(bin_w - 2, 1):.1f}" height="{bar_h:.1f}">'
                    f"<title>{start:.2f} to {end:.2f}: {int(count)}</title></rect>")
    for tick in nice_ticks(hi - lo, max_ticks=6):
        x = MARGIN_LEFT + plot_w * tick / (hi - lo)
        if x <= width - MARGIN_RIGHT + 0.5:
            body.append(f'<text class="tick" x="{x:.1f}" y="{bottom + 16}" text-anchor="middle">'
                        f"{_fmt(lo + tick)}</text>")
    return _frame(width, height, title, body, x_label, y_label, "histogram")


def box_plot(groups: Sequence[tuple[str, BoxStats]], lo: float, hi: float, *, title: str, x_label: str,
             y_label: str, width: int = 640, height: int = 280) -> str:
    """An SVG box plot: one box (quartiles), median line and min-max whiskers per named group, left to right.

    Args:
        groups: ``(name, stats)`` per group, in display order.
        lo: Bottom of the y axis.
        hi: Top of the y axis.
        title: Chart title (also its accessible name).
        x_label: Label under the x axis.
        y_label: Label beside the y axis.
        width: Width in pixels; widened when there are many groups so boxes stay readable.
        height: Height in pixels.
    """
    if not groups or hi <= lo:
        raise ValueError(f"a box plot needs at least one group and lo < hi, got {len(groups)} over [{lo}, {hi}]")
    width = max(width, MARGIN_LEFT + MARGIN_RIGHT + 28 * len(groups))
    plot_w = width - MARGIN_LEFT - MARGIN_RIGHT
    plot_h = height - MARGIN_TOP - MARGIN_BOTTOM
    bottom = MARGIN_TOP + plot_h

    def y_of(value: float) -> float:
        return bottom - plot_h * (min(max(value, lo), hi) - lo) / (hi - lo)

    body = []
    for tick in nice_ticks(hi - lo):
        y = y_of(lo + tick)
        body.append(f'<line class="grid" x1="{MARGIN_LEFT}" y1="{y:.1f}" x2="{width - MARGIN_RIGHT}" y2="{y:.1f}"/>')
        body.append(f'<text class="tick" x="{MARGIN_LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">'
                    f"{_fmt(lo + tick)}</text>")
    slot = plot_w / len(groups)
    box_w = min(40.0, slot * 0.6)
    label_every = max(1, math.ceil(len(groups) * 70 / plot_w))  # about one label per 70 px
    for i, (name, s) in enumerate(groups):
        cx = MARGIN_LEFT + slot * (i + 0.5)
        x0 = cx - box_w / 2
        tip = (f"{name}: median {s.median:.3f}, quartiles {s.q1:.3f} to {s.q3:.3f}, "
               f"range {s.low:.3f} to {s.high:.3f}, {s.count} values")
        body.append(
            f'<g class="box" data-group="{escape(name)}" data-median="{s.median:.6f}" data-q1="{s.q1:.6f}" '
            f'data-q3="{s.q3:.6f}" data-count="{s.count}"><title>{escape(tip)}</title>'
            f'<line class="whisker" x1="{cx:.1f}" y1="{y_of(s.low):.1f}" x2="{cx:.1f}" y2="{y_of(s.high):.1f}"/>'
            f'<rect class="quartiles" x="{x0:.1f}" y="{y_of(s.q3):.1f}" width="{box_w:.1f}" '
            f'height="{max(y_of(s.q1) - y_of(s.q3), 1):.1f}"/>'
            f'<line class="median" x1="{x0:.1f}" y1="{y_of(s.median):.1f}" x2="{x0 + box_w:.1f}" '
            f'y2="{y_of(s.median):.1f}"/></g>')
        if i % label_every == 0:
            body.append(f'<text class="tick" x="{cx:.1f}" y="{bottom + 16}" text-anchor="middle">'
                        f"{escape(name)}</text>")
    return _frame(width, height, title, body, x_label, y_label, "box-plot")


SEPARATION_WIDTH, SEPARATION_HEIGHT = 720, 420
_SEP_LEFT, _SEP_RIGHT, _SEP_TOP, _SEP_BOTTOM = 64, 24, 64, 56
SEPARATION_COLOURS = {"high": "#1f77b4", "low": "#d62728"}


def _density_ticks(top: float) -> list[float]:
    raw = top / 4
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    return [i * step for i in range(int(math.floor(top / step + 1e-9)) + 1)]


def separation_svg(high_scores: Sequence[float] | np.ndarray, low_scores: Sequence[float] | np.ndarray,
                   separation: Separation | None = None, bins: int = 20, title: str | None = None) -> str:
    """A standalone SVG document: both sets' histograms and fitted densities over scores in [0, 1].

    Histograms are drawn as densities (bar areas sum to 1) so they share the y axis with the fitted curves.
    Scores outside [0, 1] are counted in the edge bins. Each histogram is a ``<g class="histogram-high">``
    (``-low``) of bars, each curve a ``<polyline class="density-high">`` (``-low``), so readers and tests can
    find them without measuring pixels. No fonts, scripts or links are referenced.

    Args:
        high_scores: Scores of the high-quality set.
        low_scores: Scores of the low-quality set.
        separation: Its numbers, computed here when not given.
        bins: Histogram bins over [0, 1].
        title: Title line; default states the overlap and d'.
    """
    from pipeline.analysis.metrics import MetricsError, density_separation  # scipy: not for the report's charts

    if bins < 1:
        raise MetricsError(f"bins must be at least 1, got {bins}")
    separation = separation or density_separation(high_scores, low_scores)
    sets = {"high": (np.asarray(high_scores, dtype=float), separation.high),
            "low": (np.asarray(low_scores, dtype=float), separation.low)}
    edges = np.linspace(0.0, 1.0, bins + 1)
    grid = np.linspace(0.0, 1.0, 401)
    hists = {k: np.histogram(np.clip(v, 0, 1), bins=edges)[0] / (len(v) * (1.0 / bins)) for k, (v, _) in sets.items()}
    curves = {k: fit.pdf(grid) for k, (_, fit) in sets.items()}
    top = max(max(h.max() for h in hists.values()), max(c.max() for c in curves.values())) * 1.08
    ticks = _density_ticks(top)
    top = max(top, ticks[-1])
    plot_w, plot_h = SEPARATION_WIDTH - _SEP_LEFT - _SEP_RIGHT, SEPARATION_HEIGHT - _SEP_TOP - _SEP_BOTTOM
    bottom = _SEP_TOP + plot_h

    def px(x: float) -> float:
        return _SEP_LEFT + plot_w * x

    def py(y: float) -> float:
        return bottom - plot_h * y / top

    title = title or (f"high vs low quality: overlap {separation.overlap:.3f}, d' {separation.d_prime:.2f}")
    out = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{SEPARATION_WIDTH}" height="{SEPARATION_HEIGHT}" '
        f'viewBox="0 0 {SEPARATION_WIDTH} {SEPARATION_HEIGHT}" font-family="sans-serif" font-size="12">',
        f"<title>{xml_escape(title)}</title>",
        f'<rect width="{SEPARATION_WIDTH}" height="{SEPARATION_HEIGHT}" fill="white"/>',
        f'<text x="{_SEP_LEFT}" y="24" font-size="14">{xml_escape(title)}</text>',
    ]
    for tick in ticks:
        y = py(tick)
        out.append(f'<line x1="{_SEP_LEFT}" y1="{y:.1f}" x2="{_SEP_LEFT + plot_w}" y2="{y:.1f}" stroke="#e5e5e5"/>')
        out.append(f'<text x="{_SEP_LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{tick:g}</text>')
    for i in range(11):
        x = px(i / 10)
        out.append(f'<line x1="{x:.1f}" y1="{bottom}" x2="{x:.1f}" y2="{bottom + 5}" stroke="black"/>')
        out.append(f'<text x="{x:.1f}" y="{bottom + 18}" text-anchor="middle">{i / 10:g}</text>')
    for key, heights in hists.items():
        out.append(f'<g class="histogram-{key}" fill="{SEPARATION_COLOURS[key]}" fill-opacity="0.3" '
                   f'stroke="{SEPARATION_COLOURS[key]}" stroke-opacity="0.6">')
        for lo, hi, h in zip(edges[:-1], edges[1:], heights, strict=True):
            out.append(f'<rect x="{px(lo):.1f}" y="{py(h):.1f}" width="{px(hi) - px(lo):.1f}" '
                       f'height="{bottom - py(h):.1f}" data-density="{h:.6g}"/>')
        out.append("</g>")
    for key, values in curves.items():
        points = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in zip(grid, values, strict=True))
        out.append(f'<polyline class="density-{key}" fill="none" stroke="{SEPARATION_COLOURS[key]}" '
                   f'stroke-width="2" points="{points}"/>')
    out += [
        f'<line x1="{_SEP_LEFT}" y1="{bottom}" x2="{_SEP_LEFT + plot_w}" y2="{bottom}" stroke="black"/>',
        f'<line x1="{_SEP_LEFT}" y1="{_SEP_TOP}" x2="{_SEP_LEFT}" y2="{bottom}" stroke="black"/>',
        f'<text x="{_SEP_LEFT + plot_w / 2:.1f}" y="{SEPARATION_HEIGHT - 12}" text-anchor="middle">'
        "quality score</text>",
        f'<text x="16" y="{_SEP_TOP + plot_h / 2:.1f}" text-anchor="middle" '
        f'transform="rotate(-90 16 {_SEP_TOP + plot_h / 2:.1f})">density</text>',
    ]
    out.append('<g class="legend">')  # above the plot, where no bar or curve can hide it
    for i, (key, (_, fit)) in enumerate(sets.items()):
        x, y = _SEP_LEFT + 320 * i, 46
        text = f"{key} quality: n={fit.n}, mean {fit.mean:.3f}, sd {fit.std:.3f}"
        out.append(f'<rect x="{x}" y="{y - 9}" width="16" height="12" fill="{SEPARATION_COLOURS[key]}" '
                   'fill-opacity="0.3"/>')
        out.append(f'<line x1="{x}" y1="{y - 3}" x2="{x + 16}" y2="{y - 3}" stroke="{SEPARATION_COLOURS[key]}" '
                   'stroke-width="2"/>')
        out.append(f'<text x="{x + 22}" y="{y + 1}">{xml_escape(text)}</text>')
    out += ["</g>", "</svg>"]
    return "\n".join(out) + "\n"
