import re

import pytest

from pipeline.analysis import svg


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
