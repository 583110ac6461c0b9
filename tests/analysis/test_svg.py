import re
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from pipeline.analysis import svg
from pipeline.analysis.metrics import density_separation
from pipeline.analysis.svg import separation_svg

SVG = "{http://www.w3.org/2000/svg}"


@pytest.mark.parametrize(("top", "ticks"), [
    (0, [0.0, 1.0]),
    (1, [0, 0.5, 1]),
    (7, [0, 2, 4, 6, 8]),
    (10, [0, 5, 10]),
    (1234, [0, 500, 1000, 1500]),
])
def test_nice_ticks_are_round_and_cover_the_top(top, ticks):
    found = svg.nice_ticks(top)
    assert found == pytest.approx(ticks)
    assert found[-1] >= top


def test_count_ticks_stay_whole():
    assert svg.nice_ticks(2, min_step=1) == [0, 1, 2]
    assert svg.nice_ticks(0, min_step=1) == [0, 1]


def test_histogram_bars_carry_their_counts_and_scale_to_the_tallest():
    chart = svg.histogram([0, 3, 10, 1], 0.0, 1.0, title="Scores <b>", x_label="score", y_label="images")
    bars = re.findall(r'<rect class="bar" data-bin="(\d+)" data-count="(\d+)" x="[\d.]+" y="([\d.]+)" '
                      r'width="[\d.]+" height="([\d.]+)"', chart)
    assert [(int(b), int(c)) for b, c, _, _ in bars] == [(0, 0), (1, 3), (2, 10), (3, 1)]
    heights = [float(h) for *_, h in bars]
    assert heights[0] == 0 and heights[2] == max(heights) and heights[1] == pytest.approx(heights[2] * 0.3, abs=0.2)
    assert chart.startswith("<svg ") and chart.endswith("</svg>") and "xmlns" not in chart
    assert "Scores &lt;b&gt;" in chart and "<b>" not in chart
    assert ">0.2<" in chart and ">1<" in chart and ">score<" in chart and ">images<" in chart


def test_box_plot_escapes_group_names_and_orders_boxes():
    stats = svg.BoxStats(low=0.1, q1=0.2, median=0.3, q3=0.4, high=0.9, count=5)
    chart = svg.box_plot([("2026-11-20", stats), ('"><script>', stats)], 0.0, 1.0, title="t", x_label="x",
                         y_label="y")
    assert re.findall(r'data-group="([^"]*)"', chart) == ["2026-11-20", "&quot;&gt;&lt;script&gt;"]
    assert "<script>" not in chart
    medians = re.findall(r'<line class="median" x1="[\d.]+" y1="([\d.]+)"', chart)
    q3_tops = re.findall(r'<rect class="quartiles" x="[\d.]+" y="([\d.]+)"', chart)
    assert float(q3_tops[0]) < float(medians[0])  # q3 above the median on screen


@pytest.mark.parametrize("make", [
    lambda: svg.histogram([], 0, 1, title="t", x_label="x", y_label="y"),
    lambda: svg.histogram([1], 1, 1, title="t", x_label="x", y_label="y"),
    lambda: svg.box_plot([], 0, 1, title="t", x_label="x", y_label="y"),
])
def test_empty_or_inverted_charts_are_refused(make):
    with pytest.raises(ValueError, match="needs at least one"):
        make()


def test_separation_svg_is_well_formed_with_two_histograms_two_curves_and_a_legend():
    rng = np.random.default_rng(11)
    high, low = np.clip(rng.normal(0.72, 0.07, 200), 0, 1), np.clip(rng.normal(0.35, 0.1, 150), 0, 1)
    sep = density_separation(high, low)
    root = ET.fromstring(separation_svg(high, low, sep, bins=25))
    assert root.tag == f"{SVG}svg"
    curves = {el.get("class"): el for el in root.iter(f"{SVG}polyline")}
    assert set(curves) == {"density-high", "density-low"}
    bars = {g.get("class"): g.findall(f"{SVG}rect") for g in root.iter(f"{SVG}g")
            if (g.get("class") or "").startswith("histogram-")}
    assert {k: len(v) for k, v in bars.items()} == {"histogram-high": 25, "histogram-low": 25}
    # Bars are densities: their areas (density x bin width) sum to 1.
    for rects in bars.values():
        assert sum(float(r.get("data-density")) for r in rects) / 25 == pytest.approx(1.0)
    # Each curve peaks above its set's mean: x in pixels maps linearly from [0, 1].
    xs = [float(t.get("x")) for t in root.iter(f"{SVG}text") if t.text in ("0", "1")]
    x0, x1 = min(xs), max(xs)
    for key, fit in (("high", sep.high), ("low", sep.low)):
        points = [tuple(map(float, p.split(","))) for p in curves[f"density-{key}"].get("points").split()]
        peak_x = min(points, key=lambda p: p[1])[0]
        assert (peak_x - x0) / (x1 - x0) == pytest.approx(fit.mean, abs=0.005)
    texts = " ".join(t.text or "" for t in root.iter(f"{SVG}text"))
    assert "quality score" in texts and "density" in texts
    assert f"high quality: n=200, mean {sep.high.mean:.3f}" in texts and "low quality: n=150" in texts
    assert f"overlap {sep.overlap:.3f}" in texts
    assert "http" not in separation_svg(high, low).replace("http://www.w3.org/2000/svg", "")
