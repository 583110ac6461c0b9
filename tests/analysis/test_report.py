"""``dgiqa report`` over a generated multi-night output: the numbers, the images, safety, and a real browser."""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import hashlib
import http.server
import io
import json
import secrets
import shutil
import subprocess
import threading
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from pipeline.analysis import report
from pipeline.analysis.query import QueryError
from pipeline.analysis.report import build as report_build
from pipeline.analysis.report import thumbnails as report_thumbnails
from pipeline.batch.output import RESULT_SCHEMA
from pipeline.cli import report as cli_report
from pipeline.models.depth_anything import build_depth_anything
from pipeline.scoring.preprocess import PreprocessConfig, decode_image, depth_to_map, prepare_image
from pipeline.scoring.sample import depth_random_name, synthetic_photo, write_random_depth_anything
from pipeline.scoring.weights import WeightsError

CHROMIUM = next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser")) if p), None)
MODEL_A = "dgiqa@aaaa+depth-anything-v1-vits@bbbb"
MODEL_B = "dgiqa@cccc+depth-anything-v1-vits@dddd"
NIGHTS = ("2026-11-20", "2026-11-21", "2026-11-22")
XSS_DIR = "x<script>alert(1)<"
XSS_FILE = "script>\"quoted\" 'single'.jpg"  # with the folder: .../x<script>alert(1)</script>"quoted" 'single'.jpg
SMALL_DEPTH = PreprocessConfig(depth_input_size=70)


def _row(uri, status, score=None, error=None, model=MODEL_A, night=NIGHTS[0]):
    return {"uri": str(uri), "etag": "e", "size_bytes": 1, "width": 128, "height": 96,
            "score": score, "score_std": 0.0 if score is not None else None, "num_crops": 20 if score else None,
            "status": status, "error": error, "model_id": model, "scorer": "dgiqa", "weights_sha256": "aaaa",
            "aux_model": None,
            "scored_at": dt.datetime.fromisoformat(night + "T03:00:00+00:00"), "run_id": f"run-{night}",
            "night": night}


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    """Images on disk and a three-night output pointing at them; returns paths and every row written."""
    base = tmp_path_factory.mktemp("report")
    photos = base / "photos"
    photos.mkdir()
    img = {}
    for i in range(9):
        path = photos / f"img_{i}.{'png' if i % 3 == 0 else 'jpg'}"
        Image.fromarray(synthetic_photo(96, 128, seed=i)).save(path)
        img[i] = str(path)
    rotated = photos / "rotated.jpg"  # stored 128x80 landscape, EXIF says rotate: shown 80x128 portrait
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(synthetic_photo(80, 128, seed=20)).save(rotated, exif=exif)
    (photos / XSS_DIR).mkdir()
    xss = photos / XSS_DIR / XSS_FILE
    Image.fromarray(synthetic_photo(96, 128, seed=21)).save(xss, "JPEG")
    broken = photos / "broken.jpg"
    broken.write_bytes(b"this is not an image")
    missing = photos / "gone.jpg"
    outside = photos / "outside.jpg"  # a readable image whose row is rejected: it must never be read
    Image.fromarray(synthetic_photo(96, 128, seed=22)).save(outside)

    n1, n2, n3 = NIGHTS
    rows = [
        _row(img[0], "ok", 0.20, night=n1), _row(img[1], "ok", 0.35, night=n1),
        _row(img[2], "ok", 0.50, night=n1), _row(img[3], "ok", 0.65, night=n1),
        _row("s3://photos/a/17.jpg", "error", night=n1,
             error="truncated or corrupt image data: OSError: image file is truncated (3 bytes not processed)"),
        _row("s3://photos/b/2.jpg", "error", night=n1,
             error="truncated or corrupt image data: OSError: image file is truncated (41 bytes not processed)"),
        _row(outside, "rejected", 0.0001, night=n1,
             error=f"{outside} is outside the allowed prefixes (s3://photos/)"),
        _row(img[4], "ok", 0.80, night=n2), _row(img[5], "ok", 0.42, night=n2),
        _row(xss, "ok", 0.05, night=n2), _row(rotated, "ok", 0.95, night=n2),
        _row("s3://photos/c/1.jpg", "error", night=n2, error="no such file or object: s3://photos/c/1.jpg"),
        _row("s3://photos/d/2.jpg", "error", night=n2, error="no such file or object: s3://photos/d/2.jpg"),
        _row("https://example.com/evil.jpg", "error", night=n2,
             error="no such file or object: https://example.com/evil.jpg"),
        _row("s3://photos/e/<img src=x onerror=alert(1)>.jpg", "error", night=n2,
             error="decoder said <img src=x onerror=alert(1)>"),
        _row(img[8] + ".stale", "error", 0.9999, night=n2, error="HTTP 503 from the object store"),
        _row(img[6], "ok", 0.30, night=n3), _row(broken, "ok", 0.10, night=n3), _row(missing, "ok", 0.90, night=n3),
        _row("s3://elsewhere/z.jpg", "rejected", night=n3,
             error="s3://elsewhere/z.jpg is outside the allowed prefixes (s3://photos/)"),
        _row(img[7], "ok", 0.15, model=MODEL_B, night=n3), _row(img[8], "ok", 0.85, model=MODEL_B, night=n3),
        _row(img[0], "ok", 0.99, model=MODEL_B, night=n3),  # also scored by model A on the first night
    ]
    out = base / "scores"
    for night in NIGHTS:
        part = out / f"run_date={night}"
        part.mkdir(parents=True)
        table = pa.Table.from_pylist([r for r in rows if r["night"] == night], schema=RESULT_SCHEMA)
        pq.write_table(table.sort_by([("score", "ascending")]), part / f"part-{night}.parquet")
    # Night 1's run recorded the prefixes it read under (the report's default allowlist for its rows); night 2's
    # summary is damaged and night 3 has none, so their thumbnails need --allow-prefix.
    (out / f"run_date={n1}" / "_summary-k1.json").write_text(json.dumps(
        {"run_id": f"run-{n1}", "run_date": n1, "model_id": MODEL_A, "manifest": "s3://photos/manifest.csv",
         "manifest_rows": 7, "rows_written": 7, "skipped_done_before": 0, "wall_time_s": 12.5,
         "status_counts": {"ok": 4, "error": 2, "rejected": 1}, "images_per_s": 0.5,
         "allowed_prefixes": [f"file://{photos}/"], "max_bytes": 2**20}))
    (out / f"run_date={n2}" / "_summary-k2.json").write_text("{damaged")
    return {"out": str(out), "rows": rows, "img": img, "xss": str(xss), "rotated": str(rotated),
            "broken": str(broken), "missing": str(missing), "outside": str(outside), "base": base,
            "allow": (str(photos),)}


class Node:
    def __init__(self, tag, attrs, parent=None):
        self.tag, self.attrs, self.parent, self.children, self.text = tag, dict(attrs), parent, [], []

    def all_text(self) -> str:
        return "".join(self.text) + "".join(c.all_text() for c in self.children)

    def walk(self):
        yield self
        for child in self.children:
            yield from child.walk()

    def find_all(self, tag=None, **attrs):
        return [n for n in self.walk() if (tag is None or n.tag == tag)
                and all(n.attrs.get(k.replace("_", "-")) == v for k, v in attrs.items())]

    def classes(self) -> set[str]:
        return set((self.attrs.get("class") or "").split())


VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class TreeBuilder(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.root = self.current = Node("#root", {})

    def handle_starttag(self, tag, attrs):
        node = Node(tag, attrs, self.current)
        self.current.children.append(node)
        if tag not in VOID:
            self.current = node

    def handle_startendtag(self, tag, attrs):
        self.current.children.append(Node(tag, attrs, self.current))

    def handle_endtag(self, tag):
        node = self.current
        while node is not self.root and node.tag != tag:
            node = node.parent
        if node is not self.root:
            self.current = node.parent

    def handle_data(self, data):
        self.current.text.append(data)


def parse(page: str) -> Node:
    builder = TreeBuilder()
    builder.feed(page)
    builder.close()
    return builder.root


def _run(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers(dest="command", required=True)
    cli_report.register(commands)
    args = parser.parse_args(["report", *argv])
    return args.run(args)


def _page(library, tmp_path, *argv: str, allow: bool = True) -> tuple[str, Node]:
    """The page the command writes; with ``allow``, thumbnails may be read from the library's photo folder."""
    target = tmp_path / f"report-{secrets.token_hex(4)}.html"
    allowed = [a for prefix in library["allow"] for a in ("--allow-prefix", prefix)] if allow else []
    assert _run(library["out"], "--html", str(target), *allowed, *argv) == 0
    page = target.read_text(encoding="utf-8")
    return page, parse(page)


@pytest.fixture(scope="module")
def all_dates(library):
    page = report.build_report(report.ReportConfig(library["out"], date_from=NIGHTS[0], date_to=NIGHTS[-1],
                                                   thumbnails=3, allow_prefixes=library["allow"]))
    return page, parse(page)


def _counts(tree: Node) -> dict[tuple[str, str], dict[str, int]]:
    table = tree.find_all("table", **{"class": "counts"})[0]
    found = {}
    for tr in table.find_all("tr"):
        if "data-run-date" in tr.attrs:
            cells = {td.attrs["data-status"]: int(td.all_text().replace(",", "")) for td in tr.find_all("td")
                     if "data-status" in td.attrs}
            found[(tr.attrs["data-model-id"], tr.attrs["data-run-date"])] = cells
    return found


def _expected_counts(rows, nights, by_model: bool, model=None):
    counts = {}
    for r in rows:
        if r["night"] in nights and (model is None or r["model_id"] == model):
            cell = counts.setdefault((r["model_id"] if by_model else "", r["night"]), Counter())
            cell[r["status"]] += 1
    return {k: {"ok": c["ok"], "error": c["error"], "rejected": c["rejected"], "total": sum(c.values())}
            for k, c in counts.items()}


def _tiles(tree: Node, grid: str) -> list[Node]:
    return tree.find_all("div", id=grid)[0].find_all("figure")


def _decode_data_uri(src: str) -> Image.Image:
    prefix = "data:image/jpeg;base64,"
    assert src.startswith(prefix)
    return Image.open(io.BytesIO(base64.b64decode(src[len(prefix):])))


def test_counts_by_model_and_date_and_several_models_notice(library, all_dates):
    _, tree = all_dates
    assert _counts(tree) == _expected_counts(library["rows"], NIGHTS, by_model=True)
    notice = tree.find_all(id="several-models")
    assert len(notice) == 1 and MODEL_A in notice[0].all_text() and MODEL_B in notice[0].all_text()
    cards = {n.attrs["data-status"]: int(n.find_all("span")[0].all_text().replace(",", ""))
             for n in tree.find_all("div") if "card" in n.classes() and "data-status" in n.attrs}
    assert cards == dict(Counter(r["status"] for r in library["rows"]))


def test_error_reasons_grouped_with_uris_and_numbers_normalised(library, all_dates):
    _, tree = all_dates
    groups = [(tr.attrs["data-status"], tr.find_all("td", **{"class": "reason-text"})[0].all_text(),
               int(tr.attrs["data-count"]), tr.find_all("code")[0].all_text())
              for tr in tree.find_all("tr", **{"class": "reason"})]
    assert groups == [
        ("error", "no such file or object: <uri>", 3, "https://example.com/evil.jpg"),
        ("error", "truncated or corrupt image data: OSError: image file is truncated (N bytes not processed)", 2,
         "s3://photos/a/17.jpg"),
        ("rejected", "<uri> is outside the allowed prefixes (<uri>)", 2, library["outside"]),
        ("error", "HTTP N from the object store", 1, library["img"][8] + ".stale"),
        ("error", "decoder said <img src=x onerror=alert(N)>", 1, "s3://photos/e/<img src=x onerror=alert(1)>.jpg"),
    ]


def test_lowest_and_highest_are_the_right_images_in_order_and_only_ok_rows_are_read(library, tmp_path, monkeypatch):
    opened = []
    real_read = report_thumbnails.read_image_bytes

    def spy(uri, *args, **kwargs):
        opened.append(str(uri))
        return real_read(uri, *args, **kwargs)

    monkeypatch.setattr(report_thumbnails, "read_image_bytes", spy)
    page = report.build_report(report.ReportConfig(library["out"], date_from=NIGHTS[0], thumbnails=3,
                                                   allow_prefixes=library["allow"]))
    tree = parse(page)
    lowest, highest = _tiles(tree, "lowest"), _tiles(tree, "highest")
    assert [t.attrs["data-uri"] for t in lowest] == [library["xss"], library["broken"], library["img"][7]]
    assert [t.attrs["data-uri"] for t in highest] == [library["img"][0], library["rotated"], library["missing"]]
    assert [float(t.attrs["data-score"]) for t in lowest] == pytest.approx([0.05, 0.10, 0.15])
    assert sorted(opened) == sorted([library[k] for k in ("xss", "broken", "rotated", "missing")]
                                    + [library["img"][7], library["img"][0]])

    for tile, path in [(lowest[0], library["xss"]), (lowest[2], library["img"][7]), (highest[0], library["img"][0])]:
        shown = np.asarray(_decode_data_uri(tile.find_all("img")[0].attrs["src"]).convert("RGB"), np.float32)
        source = Image.fromarray(decode_image(Path(path).read_bytes()))
        source.thumbnail((report.THUMBNAIL_PX, report.THUMBNAIL_PX))
        assert shown.shape[:2] == np.asarray(source).shape[:2]
        assert np.abs(shown - np.asarray(source, np.float32)).mean() < 8, path
    others = np.asarray(Image.open(library["img"][1]).convert("RGB"), np.float32)
    first = np.asarray(_decode_data_uri(lowest[0].find_all("img")[0].attrs["src"]).convert("RGB"), np.float32)
    assert np.abs(first - others).mean() > 8  # the comparison above can tell images apart

    rotated = _decode_data_uri(highest[1].find_all("img")[0].attrs["src"])
    assert rotated.size == (80, 128)  # EXIF orientation applied
    placeholders = {t.attrs["data-uri"]: t.find_all("div", **{"class": "placeholder"}) for t in lowest + highest}
    assert "not a recognised image format" in placeholders[library["broken"]][0].all_text()
    assert "no such file" in placeholders[library["missing"]][0].all_text()
    assert not placeholders[library["xss"]] and not placeholders[library["img"][0]]


def test_every_ok_row_in_score_order_each_image_read_once(library, monkeypatch):
    opened = []
    real_read = report_thumbnails.read_image_bytes
    monkeypatch.setattr(report_thumbnails, "read_image_bytes",
                        lambda uri, *a, **k: opened.append(uri) or real_read(uri, *a, **k))
    tree = parse(report.build_report(report.ReportConfig(library["out"], date_from=NIGHTS[0], thumbnails=50,
                                                         allow_prefixes=library["allow"])))
    ok = sorted((r for r in library["rows"] if r["status"] == "ok"), key=lambda r: r["score"])
    shown = [(t.attrs["data-uri"], float(t.attrs["data-score"])) for t in _tiles(tree, "all-ok")]
    assert shown == [(r["uri"], pytest.approx(r["score"])) for r in ok]  # fewer than 2 x 50: each row once
    assert not tree.find_all(id="lowest") and not tree.find_all(id="highest")
    img_0 = [t for t in _tiles(tree, "all-ok") if t.attrs["data-uri"] == library["img"][0]]
    models = [next(c for c in t.find_all("code") if "model" in c.classes()).all_text() for t in img_0]
    assert models == [MODEL_A, MODEL_B]
    assert sorted(opened) == sorted({r["uri"] for r in ok})  # each image once, however often it is shown


def test_score_histogram_counts_ok_scores(library, all_dates):
    _, tree = all_dates
    bars = tree.find_all("rect", **{"class": "bar"})
    scores = np.array([r["score"] for r in library["rows"] if r["status"] == "ok"], np.float32)  # as stored
    expected, _ = np.histogram(scores.astype(np.float64), bins=report.HISTOGRAM_BINS, range=(0, 1))
    assert [int(b.attrs["data-count"]) for b in bars] == expected.tolist()
    boxes = tree.find_all("g", **{"class": "box"})
    assert [b.attrs["data-group"] for b in boxes] == list(NIGHTS)
    for box, night in zip(boxes, NIGHTS, strict=True):
        values = [r["score"] for r in library["rows"] if r["status"] == "ok" and r["night"] == night]
        q1, median, q3 = np.percentile(values, [25, 50, 75])
        assert float(box.attrs["data-median"]) == pytest.approx(median, abs=1e-6)
        assert float(box.attrs["data-q1"]) == pytest.approx(q1, abs=1e-6) and q1 < median < q3
        assert float(box.attrs["data-q3"]) == pytest.approx(q3, abs=1e-6)
        assert int(box.attrs["data-count"]) == len(values)


def test_the_histogram_bins_scores_on_the_edges_as_numpy_does(tmp_path):
    """The bins are counted in DuckDB; a score on a bin edge falls in numpy's bin, 1.0 in the last one."""
    from pipeline.analysis.query import open_scores
    from pipeline.analysis.report.selection import SelectedRows

    bins = report.HISTOGRAM_BINS
    scores = np.array([k / bins for k in range(bins + 1)] + [0.05, 0.15, 0.35, 0.7, 0.85, 1e-9], np.float32)
    part = tmp_path / "scores" / f"run_date={NIGHTS[0]}"
    part.mkdir(parents=True)
    rows = [_row(f"s3://photos/{i}.jpg", "ok", float(v)) for i, v in enumerate(scores)]
    pq.write_table(pa.Table.from_pylist(rows, schema=RESULT_SCHEMA), part / "part-0.parquet")
    found = SelectedRows(open_scores(str(tmp_path / "scores")), (NIGHTS[0],)).distribution(bins)
    expected, _ = np.histogram(scores.astype(np.float64), bins=bins, range=(0, 1))
    assert found.histogram == expected.tolist() and found.total == len(scores)
    box = found.boxes[NIGHTS[0]]
    assert (box.low, box.median, box.high) == (0.0, pytest.approx(np.median(scores.astype(np.float64))), 1.0)


def test_over_several_nights_an_image_is_one_tile_and_the_histogram_counts_scores(tmp_path):
    """Images scored every night (reruns): a grid shows each image once, at its lowest (highest) score there."""
    def night_rows(night, scores):
        return [_row(f"s3://photos/{name}.jpg", "ok", score, night=night) for name, score in scores.items()]

    rows = [*night_rows(NIGHTS[0], {"a": 0.10, "b": 0.50, "c": 0.60, "d": 0.70, "e": 0.95, "f": 0.40}),
            *night_rows(NIGHTS[1], {"a": 0.11, "b": 0.52, "c": 0.61, "d": 0.71, "e": 0.96, "f": 0.90}),
            *night_rows(NIGHTS[2], {"a": 0.12, "b": 0.20, "c": 0.62, "d": 0.72, "e": 0.97, "f": 0.91})]
    for night in NIGHTS:
        part = tmp_path / "scores" / f"run_date={night}"
        part.mkdir(parents=True)
        table = pa.Table.from_pylist([r for r in rows if r["night"] == night], schema=RESULT_SCHEMA)
        pq.write_table(table.sort_by([("score", "ascending")]), part / "part-0.parquet")
    tree = parse(report.build_report(report.ReportConfig(str(tmp_path / "scores"), date_from=NIGHTS[0],
                                                         thumbnails=2)))
    def shown(page, grid):
        return [(t.attrs["data-uri"].removeprefix("s3://photos/").removesuffix(".jpg"), float(t.attrs["data-score"]))
                for t in _tiles(page, grid)]

    tiles = {grid: shown(tree, grid) for grid in ("lowest", "highest")}
    # The four lowest rows are image a's three and b's of night 3: two images, not four tiles of a.
    assert tiles["lowest"] == [("a", pytest.approx(0.10)), ("b", pytest.approx(0.20))]
    assert tiles["highest"] == [("e", pytest.approx(0.97)), ("f", pytest.approx(0.91))]
    histogram = next(t for t in tree.find_all("text") if t.all_text().startswith("Score histogram"))
    assert histogram.all_text() == "Score histogram (18 scores over 3 run dates)"

    few = parse(report.build_report(report.ReportConfig(str(tmp_path / "scores"), date_from=NIGHTS[0],
                                                         thumbnails=4)))
    # 6 images < 2 x 4: each once, at its newest row
    assert shown(few, "all-ok") == [("a", pytest.approx(0.12)), ("b", pytest.approx(0.20)), ("c", pytest.approx(0.62)),
                     ("d", pytest.approx(0.72)), ("f", pytest.approx(0.91)), ("e", pytest.approx(0.97))]


def test_default_is_the_newest_run_date_without_box_plot(library, tmp_path):
    _, tree = _page(library, tmp_path, "--thumbnails", "0")
    assert _counts(tree) == _expected_counts(library["rows"], NIGHTS[-1:], by_model=True)
    assert len(tree.find_all("svg")) == 1 and not tree.find_all("g", **{"class": "box"})
    assert not tree.find_all("figure") and NIGHTS[-1] in tree.find_all("h1")[0].all_text()


@pytest.mark.parametrize(("argv", "nights", "model"), [
    (["--run-date", NIGHTS[1]], NIGHTS[1:2], None),
    (["--from", NIGHTS[1]], NIGHTS[1:], None),
    (["--until", NIGHTS[0]], NIGHTS[:1], None),
    (["--from", NIGHTS[0], "--until", NIGHTS[1]], NIGHTS[:2], None),
    (["--model-id", MODEL_A, "--from", NIGHTS[0]], NIGHTS, MODEL_A),
    (["--model-id", MODEL_B], NIGHTS[2:], MODEL_B),
])
def test_selection_by_date_and_model(library, tmp_path, argv, nights, model):
    _, tree = _page(library, tmp_path, "--thumbnails", "1", *argv)
    models = {r["model_id"] for r in library["rows"] if r["night"] in nights and model in (None, r["model_id"])}
    assert _counts(tree) == _expected_counts(library["rows"], nights, by_model=len(models) > 1, model=model)
    assert bool(tree.find_all(id="several-models")) == (len(models) > 1)
    assert len(tree.find_all("g", **{"class": "box"})) == (len(nights) if len(nights) > 1 else 0)
    tile_dates = {t.attrs["data-uri"]: t for t in tree.find_all("figure")}
    ok_uris = {r["uri"] for r in library["rows"]
               if r["status"] == "ok" and r["night"] in nights and model in (None, r["model_id"])}
    assert tile_dates and set(tile_dates) <= ok_uris


def test_run_summaries_shown_when_present_and_damaged_ones_ignored(library, tmp_path):
    _, tree = _page(library, tmp_path, "--thumbnails", "0", "--from", NIGHTS[0])
    summaries = tree.find_all("tr", **{"class": "summary"})
    assert len(summaries) == 1 and f"run-{NIGHTS[0]}" in summaries[0].all_text()
    assert "ok 4, error 2, rejected 1" in summaries[0].all_text()
    _, tree = _page(library, tmp_path, "--thumbnails", "0", "--run-date", NIGHTS[1])
    assert not tree.find_all("tr", **{"class": "summary"})


@pytest.mark.parametrize(("argv", "message"), [
    (["--run-date", "2026-11-19"], "no run_date=2026-11-19 partition at .* \\(present: 3 dates from 2026-11-20 "
                                   "to 2026-11-22\\)"),
    (["--from", "2026-11-23"], "no run_date partition from 2026-11-23 to 2026-11-22"),
    (["--model-id", "dgiqa@nope"], "no rows of model dgiqa@nope"),
    (["--run-date", NIGHTS[0], "--model-id", MODEL_B], "no rows of model .* in run_date 2026-11-20"),
    (["--run-date", NIGHTS[0], "--until", NIGHTS[1]], "either a run date or a range"),
    (["--from", NIGHTS[1], "--until", NIGHTS[0]], "the range starts after it ends"),
])
def test_impossible_selections_are_one_line_errors(library, tmp_path, argv, message):
    with pytest.raises(report.ReportError, match=message) as info:
        _run(library["out"], "--html", str(tmp_path / "r.html"), *argv)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "r.html").exists()


@pytest.mark.parametrize("kind", ["empty", "missing", "no-partitions"])
def test_output_without_scores_is_a_one_line_error(tmp_path, kind):
    out = tmp_path / "out"
    if kind != "missing":
        out.mkdir()
    if kind == "no-partitions":
        (out / "notes.txt").write_text("nothing here")
    with pytest.raises(ValueError, match=f"no scores at {out}") as info:
        _run(str(out), "--html", str(tmp_path / "r.html"))
    assert isinstance(info.value, QueryError | report.ReportError) and "\n" not in str(info.value)


@pytest.mark.parametrize(("argv", "message"), [
    (["--run-date", "2026-13-01"], "expected a date YYYY-MM-DD"),
    (["--from", "22-11-2026"], "expected a date YYYY-MM-DD"),
    (["--thumbnails", "-1"], "expected an integer of 0 or more"),
    (["--encoder", "vitx"], "invalid choice"),
])
def test_bad_arguments_are_usage_errors(library, tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as info:
        _run(library["out"], "--html", str(tmp_path / "r.html"), *argv)
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_page_loads_nothing_and_escapes_everything(library, all_dates):
    page, tree = all_dates
    metas = tree.find_all("meta", **{"http-equiv": "Content-Security-Policy"})
    assert [m.attrs["content"] for m in metas] == ["default-src 'none'; img-src data:; style-src 'unsafe-inline'"]
    assert page.index("Content-Security-Policy") < page.index("<style>")  # in force before anything else
    elements = list(tree.walk())
    assert not [n.tag for n in elements if n.tag in {"script", "link", "iframe", "object", "embed", "base", "form",
                                                     "frame", "audio", "video", "source"}]
    for node in elements:
        for name, value in node.attrs.items():
            assert not name.startswith("on"), (node.tag, name)
            if name in {"src", "href", "xlink:href", "srcset", "action", "poster", "background", "data"}:
                assert node.tag == "img" and name == "src" and value.startswith("data:image/jpeg;base64,")
            elif name != "data-uri":
                assert "http:" not in value and "https:" not in value, (node.tag, name, value)
    style = "".join(n.all_text() for n in tree.find_all("style"))
    assert "url(" not in style and "@import" not in style
    assert "https://example.com/evil.jpg" in tree.all_text()  # shown as text only
    assert library["xss"] in {t.attrs["data-uri"] for t in tree.find_all("figure")}
    assert library["xss"] in tree.all_text()
    assert "<script>alert(1)</script>" not in page and "onerror=alert(1)>" not in page
    assert "x&lt;script&gt;alert(1)&lt;/script&gt;&quot;quoted&quot; &#x27;single&#x27;.jpg" in page


CHECKER_JS = """
const violations = [];
document.addEventListener('securitypolicyviolation', e => violations.push(e.blockedURI || e.violatedDirective));
window.addEventListener('load', () => {
  const expected = EXPECTED;
  const imgs = Array.from(document.images);
  const ok = i => i.complete && i.naturalWidth > 0;
  const out = document.createElement('div');
  out.id = 'checker-result';
  out.dataset.images = imgs.length;
  out.dataset.loaded = imgs.filter(ok).length;
  out.dataset.broken = JSON.stringify(imgs.filter(i => !ok(i)).map(i => i.alt + ' ' + i.src.slice(0, 40)));
  out.dataset.photos = document.querySelectorAll('img.photo').length;
  out.dataset.depths = document.querySelectorAll('img.depth').length;
  out.dataset.svgs = document.querySelectorAll('svg').length;
  out.dataset.scripts = document.querySelectorAll('script').length - 1;
  out.dataset.handlers = Array.from(document.querySelectorAll('*')).filter(
    el => Array.from(el.attributes).some(a => a.name.startsWith('on'))).length;
  out.dataset.found = JSON.stringify(expected.map(t => document.body.textContent.includes(t)));
  out.dataset.requests = JSON.stringify(performance.getEntriesByType('resource').map(e => e.name)
    .filter(n => !n.startsWith('data:')));
  out.dataset.violations = JSON.stringify(violations);
  out.dataset.pwned = document.body.dataset.pwned || '';
  const lines = el => {  // line boxes of an element's text: one per distinct top of its text's rectangles
    const range = document.createRange();
    range.selectNodeContents(el);
    return new Set(Array.from(range.getClientRects()).filter(r => r.width > 0).map(r => Math.round(r.top))).size;
  };
  const oneLine = Array.from(document.querySelectorAll('th, .date, code.id'));
  out.dataset.measured = oneLine.length;
  out.dataset.wrapped = JSON.stringify(oneLine.filter(el => lines(el) > 1).map(el => el.textContent));
  document.body.appendChild(out);
});
"""


def render(page: str, folder: Path, expected_text=(), inject: str = "", policy: str = report.CSP,
           width: int = 1280) -> dict:
    """Open a copy of ``page`` in headless Chromium with a checker script allowed by nonce; its findings.

    ``width`` is the window's width in CSS pixels: a narrow one squeezes the tables, which is when text wraps.
    """
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (CI installs Debian's chromium package); browser checks skipped")
    nonce = secrets.token_hex(12)
    csp = f'content="{report.CSP}"'
    assert page.count(csp) == 1
    expected = json.dumps(list(expected_text)).replace("<", "\\u003c")
    script = f'<script nonce="{nonce}">{CHECKER_JS.replace("EXPECTED", expected)}</script>'
    copy = page.replace(csp, f"content=\"{policy}; script-src 'nonce-{nonce}'\"")
    head, _, tail = copy.partition("</head>")
    body, _, end = tail.rpartition("</body>")
    copy = f"{head}{script}</head>{body}{inject}</body>{end}"
    path = folder / f"checked-{nonce[:6]}.html"
    path.write_text(copy, encoding="utf-8")
    profile = folder / f"profile-{nonce[:6]}"
    proc = subprocess.run([CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                           f"--user-data-dir={profile}", f"--window-size={width},900", "--virtual-time-budget=10000",
                           "--dump-dom", path.as_uri()],
                          capture_output=True, text=True, timeout=120)
    results = parse(proc.stdout).find_all(id="checker-result")
    assert results, f"chromium gave no checker result (rc {proc.returncode}): {proc.stderr[-2000:]}"
    found = {k[5:]: v for k, v in results[0].attrs.items() if k.startswith("data-")}
    for key in ("broken", "found", "requests", "violations", "wrapped"):
        found[key] = json.loads(found[key])
    for key in ("images", "loaded", "photos", "depths", "svgs", "scripts", "handlers", "measured"):
        found[key] = int(found[key])
    return found


def test_browser_renders_every_image_and_chart_and_runs_nothing(library, all_dates, tmp_path):
    page, tree = all_dates
    xss_text = library["xss"]
    result = render(page, tmp_path, expected_text=[xss_text, "decoder said <img src=x onerror=alert(1)>"])
    assert result["images"] == 4 == result["photos"]  # 6 tiles, 2 of them placeholders
    assert result["loaded"] == result["images"] and not result["broken"]
    assert result["svgs"] == 2  # histogram and score by run date
    assert result["scripts"] == 0 and result["handlers"] == 0
    assert result["found"] == [True, True]  # the crafted URI and message are plain text
    assert result["requests"] == [] and result["violations"] == []


@pytest.fixture()
def listener():
    """An HTTP server on 127.0.0.1 that records every path asked of it; yields (base URL, paths)."""
    hits = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the http.server hook's name
            hits.append(self.path)
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", hits
    finally:
        server.shutdown()
        server.server_close()


def test_browser_enforces_the_pages_policy_on_injected_content(all_dates, tmp_path, listener):
    page, _ = all_dates
    url, hits = listener
    inject = ('<script>document.body.dataset.pwned = "yes";</script>'
              f'<img alt="remote" src="{url}/img.png"><div style="background:url({url}/background)"></div>'
              f'<link rel="stylesheet" href="{url}/style.css">')
    result = render(page, tmp_path, inject=inject)
    assert result["pwned"] == ""  # the script without the checker's nonce did not run
    assert [b.split()[0] for b in result["broken"]] == ["remote"]
    assert any(url in v for v in result["violations"]) and "inline" in result["violations"]
    assert hits == []

    loose = report.CSP.replace("img-src data:", f"img-src data: {url}")  # control: the listener does see requests
    render(page, tmp_path, inject=inject, policy=loose)
    assert sorted(hits) == ["/background", "/img.png"]  # the stylesheet is still refused (default-src)


@pytest.fixture(scope="module")
def depth_weights(tmp_path_factory) -> Path:
    return write_random_depth_anything(tmp_path_factory.mktemp("depth") / depth_random_name("vits"))


@pytest.fixture(scope="module")
def depth_page(library, depth_weights) -> str:
    return report.build_report(report.ReportConfig(library["out"], run_date=NIGHTS[1], thumbnails=1,
                                                   depth_weights=str(depth_weights), device="cpu",
                                                   preprocess=SMALL_DEPTH, allow_prefixes=library["allow"]))


def test_depth_maps_beside_thumbnails_match_the_scoring_preprocessing(library, depth_weights, depth_page):
    tree = parse(depth_page)
    tiles = _tiles(tree, "lowest") + _tiles(tree, "highest")
    assert [t.attrs["data-uri"] for t in tiles] == [library["xss"], library["rotated"]]
    sha = hashlib.sha256(depth_weights.read_bytes()).hexdigest()
    assert f"depth-anything-v1-vits@{sha}" in tree.find_all(id="depth-model")[0].all_text()

    model = build_depth_anything("vits")
    model.load_state_dict(load_file(str(depth_weights)))
    for tile in tiles:
        photo, depth = tile.find_all("img")
        assert "depth" in depth.classes()
        shown = _decode_data_uri(depth.attrs["src"])
        assert shown.mode == "L" and shown.size == _decode_data_uri(photo.attrs["src"]).size
        prepared = prepare_image(decode_image(Path(tile.attrs["data-uri"]).read_bytes()), SMALL_DEPTH)
        with torch.inference_mode():
            full = depth_to_map(model(prepared.depth_input[None])[0], prepared.height, prepared.width)
        expected = Image.fromarray(full)
        expected.thumbnail((report.THUMBNAIL_PX, report.THUMBNAIL_PX))
        shown_px, expected_px = np.asarray(shown, np.float32), np.asarray(expected, np.float32)
        assert expected_px.std() > 5  # a varied map, so the comparison means something
        assert np.abs(shown_px - expected_px).mean() < 4


def test_browser_shows_the_depth_maps(depth_page, tmp_path):
    result = render(depth_page, tmp_path)
    assert result["depths"] == 2 == result["photos"] and result["loaded"] == 4 and not result["broken"]


def test_depth_weights_through_the_command_and_wrong_encoder(library, depth_weights, tmp_path):
    page, tree = _page(library, tmp_path, "--run-date", NIGHTS[2], "--model-id", MODEL_A, "--thumbnails", "1",
                       "--depth-weights", str(depth_weights), "--device", "cpu")
    tiles = _tiles(tree, "lowest") + _tiles(tree, "highest")
    assert [t.attrs["data-uri"] for t in tiles] == [library["broken"], library["missing"]]
    assert all(not t.find_all("img") for t in tiles)  # unreadable images: placeholders, no depth, no failure
    assert "depth-anything-v1-vits@" in tree.find_all(id="depth-model")[0].all_text()
    with pytest.raises(WeightsError, match="--encoder vitb was given, but --depth-weights .* holds a vits model"):
        _run(library["out"], "--html", str(tmp_path / "r.html"), "--depth-weights", str(depth_weights),
             "--encoder", "vitb")


def test_output_images_and_page_on_s3_with_storage_options(s3, library):
    fs, options = s3
    fs.mkdir("lib")
    fs.put(library["img"][2], "lib/photos/low.jpg")
    fs.put(library["img"][3], "lib/photos/high.png")
    rows = [_row("s3://lib/photos/low.jpg", "ok", 0.2), _row("s3://lib/photos/high.png", "ok", 0.7),
            _row("s3://lib/photos/gone.jpg", "ok", 0.5), _row("s3://elsewhere/x.jpg", "rejected", error="outside")]
    with fs.open(f"lib/scores/run_date={NIGHTS[0]}/part-k.parquet", "wb") as f:
        pq.write_table(pa.Table.from_pylist(rows, schema=RESULT_SCHEMA), f)
    fs.pipe(f"lib/scores/run_date={NIGHTS[0]}/_summary-k.json",  # the run's own record is the allowlist
            json.dumps({"run_id": f"run-{NIGHTS[0]}", "allowed_prefixes": ["s3://lib/photos/"]}).encode())
    assert _run("s3://lib/scores", "--html", "s3://lib/report.html", "--thumbnails", "1",
                "--storage-options", json.dumps(options)) == 0
    tree = parse(fs.cat("lib/report.html").decode())
    lowest, highest = _tiles(tree, "lowest"), _tiles(tree, "highest")
    assert [t.attrs["data-uri"] for t in lowest + highest] == ["s3://lib/photos/low.jpg", "s3://lib/photos/high.png"]
    assert all(len(t.find_all("img")) == 1 for t in lowest + highest)
    assert f"run-{NIGHTS[0]}" in tree.find_all("tr", **{"class": "summary"})[0].all_text()


def test_thumbnails_are_read_only_under_the_prefixes_the_runs_recorded(library, tmp_path, monkeypatch):
    """No --allow-prefix: night 1's run recorded its allowed prefixes, so its images are shown; nights 2 and 3
    recorded none (a damaged summary, no summary), so their rows get a placeholder and are never read."""
    opened = []
    real_read = report_thumbnails.read_image_bytes
    monkeypatch.setattr(report_thumbnails, "read_image_bytes",
                        lambda uri, *a, **k: opened.append(uri) or real_read(uri, *a, **k))
    _, tree = _page(library, tmp_path, "--from", NIGHTS[0], "--thumbnails", "50", allow=False)
    ok = sorted((r for r in library["rows"] if r["status"] == "ok"), key=lambda r: r["score"])
    night_one = {r["uri"] for r in ok if r["night"] == NIGHTS[0]}
    assert sorted(opened) == sorted(night_one)
    tiles = _tiles(tree, "all-ok")
    assert [t.attrs["data-uri"] for t in tiles] == [r["uri"] for r in ok]
    for row, tile in zip(ok, tiles, strict=True):
        placeholder = tile.find_all("div", **{"class": "placeholder"})
        if row["night"] == NIGHTS[0]:
            assert not placeholder and tile.find_all("img")
        else:  # img_0's night-3 row too, though its night-1 row was read: a row is shown under its own run's rules
            assert f"run run-{row['night']} recorded no allowed prefixes" in placeholder[0].all_text()


def test_over_the_byte_limit_and_signed_urls_are_told_without_secrets(library, tmp_path):
    page, tree = _page(library, tmp_path, "--run-date", NIGHTS[1], "--thumbnails", "1", "--max-bytes", "100")
    for tile in _tiles(tree, "lowest") + _tiles(tree, "highest"):
        text = tile.find_all("div", **{"class": "placeholder"})[0].all_text()
        assert "over the limit of 100 bytes (--max-bytes)" in text and not tile.find_all("img")

    out = tmp_path / "signed"
    secret = "X-Amz-Signature=deadbeefcafe"
    signed = f"https://user:hunter2@bucket.s3.amazonaws.com/a.jpg?X-Amz-Credential=AKIA123&{secret}"
    rows = [_row(signed, "ok", 0.5), _row(signed.replace("a.jpg", "b.jpg"), "error", error=f"HTTP 403 from {signed}"),
            _row(signed.replace("a.jpg", "c.jpg"), "rejected", error=f"{signed} has a query")]
    (out / f"run_date={NIGHTS[0]}").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=RESULT_SCHEMA), out / f"run_date={NIGHTS[0]}" / "part-s.parquet")
    target = tmp_path / "signed.html"
    assert _run(str(out), "--html", str(target), "--allow-prefix", "https://bucket.s3.amazonaws.com/") == 0
    page = target.read_text()
    assert "hunter2" not in page and "deadbeefcafe" not in page and "AKIA123" not in page
    assert "X-Amz-Signature=***" in page
    tile = parse(page).find_all("figure")[0]
    assert "not read: URI has a query or fragment" in tile.all_text()  # refused before any request


def test_thumbnail_threads_fit_in_half_the_free_memory():
    """A 100-megapixel image may take about 1 GiB while decoded: a small machine decodes fewer at once."""
    from pipeline.limits import DEFAULT_MAX_BYTES
    from pipeline.scoring.preprocess import preprocess_peak_bytes

    config = report.ReportConfig("out")
    per_image = preprocess_peak_bytes(config.preprocess.max_pixels) + DEFAULT_MAX_BYTES
    assert per_image > 2**30  # the default pixel limit is what makes this matter
    assert report.fetch_threads(config, DEFAULT_MAX_BYTES, available=64 * 2**30) == report.FETCH_THREADS
    assert report.fetch_threads(config, DEFAULT_MAX_BYTES, available=6 * per_image) == 3
    assert report.fetch_threads(config, DEFAULT_MAX_BYTES, available=2**20) == 1  # never none


@pytest.fixture(scope="module")
def small_run(library, tmp_path_factory):
    """A new user's first runs: one night, three ok images, the run that wrote them and three reruns that wrote
    nothing; long ids and URIs, so a narrow window squeezes the tables. Returns the output and its page."""
    out = tmp_path_factory.mktemp("small") / "scores"
    night = NIGHTS[0]
    part = out / f"run_date={night}"
    part.mkdir(parents=True)
    run_id = f"run-{night}T03:00:00Z-0123456789abcdef"
    rows = [{**_row(library["img"][i], "ok", score), "run_id": run_id}
            for i, score in [(1, 0.3), (2, 0.6), (3, 0.9)]]
    pq.write_table(pa.Table.from_pylist(rows, schema=RESULT_SCHEMA), part / "part-s.parquet")
    manifest = "s3://a-rather-long-bucket-name/with/a/deep/prefix/of/manifests/manifest-2026-11-20.csv"
    for k, written in enumerate([3, 0, 0, 0]):
        summary = {"run_id": run_id if written else f"run-{night}T0{4 + k}:00:00Z-fedcba987654321{k}",
                   "run_date": night, "model_id": MODEL_A, "manifest": manifest, "manifest_rows": 3,
                   "rows_written": written, "skipped_done_before": 3 - written, "wall_time_s": 1.5,
                   "status_counts": {"ok": written}, "images_per_s": 2.0}
        (part / f"_summary-{k}.json").write_text(json.dumps(summary))
    page = report.build_report(report.ReportConfig(str(out), thumbnails=3, allow_prefixes=library["allow"]))
    return {"out": str(out), "page": page, "tree": parse(page)}


@pytest.fixture(scope="module")
def small_run_in_a_narrow_window(small_run, tmp_path_factory):
    return render(small_run["page"], tmp_path_factory.mktemp("narrow"), expected_text=["3 runs wrote nothing"],
                  width=420)


def test_runs_that_wrote_nothing_are_one_count_not_rows(small_run, small_run_in_a_narrow_window):
    tree = small_run["tree"]
    runs = tree.find_all("tr", **{"class": "summary"})
    assert len(runs) == 1 and "0123456789abcdef" in runs[0].all_text()
    assert runs[0].find_all("td")[4].all_text() == "3"  # written: no "0 written" row
    folded = tree.find_all(id="runs-wrote-nothing")
    assert len(folded) == 1 and folded[0].all_text().startswith("3 runs wrote nothing")
    assert "fedcba" not in tree.all_text()  # the reruns' ids are not listed
    assert small_run_in_a_narrow_window["found"] == [True]  # on the rendered page


def test_fewer_rows_than_two_grids_show_each_image_once_in_one_grid(library, small_run,
                                                                    small_run_in_a_narrow_window):
    tree = small_run["tree"]
    assert not tree.find_all(id="lowest") and not tree.find_all(id="highest")
    tiles = _tiles(tree, "all-ok")
    assert [t.attrs["data-uri"] for t in tiles] == [library["img"][i] for i in (1, 2, 3)]
    assert "All 3 ok images, lowest score first" in [h.all_text() for h in tree.find_all("h2")]
    assert "each is shown once" in tree.find_all(id="all-ok-note")[0].all_text()
    result = small_run_in_a_narrow_window
    assert result["photos"] == 3 == result["loaded"] and not result["broken"]  # three images on the page, once


def test_dates_ids_and_headers_do_not_wrap_in_a_narrow_window(small_run_in_a_narrow_window):
    """Measured in Chromium at 420 px: every header, date and id is one line high; only URIs may break."""
    result = small_run_in_a_narrow_window
    assert result["measured"] >= 9 + 5 + 4  # Runs headers, counts headers, and the dates and ids
    assert result["wrapped"] == []


@pytest.mark.parametrize("where", ["/proc/report.html", "folder"])
def test_unwritable_page_fails_in_one_line_before_anything_is_read(library, tmp_path, monkeypatch, capsys, where):
    from pipeline import cli

    html = str(tmp_path) if where == "folder" else where
    calls = []
    monkeypatch.setattr(report_build, "open_scores", lambda *a, **k: calls.append(("open_scores", a)))
    monkeypatch.setattr(report_thumbnails, "read_image_bytes", lambda *a, **k: calls.append(("read_image_bytes", a)))
    code = cli.main(["report", library["out"], "--html", html, "--allow-prefix", library["allow"][0]])
    err = capsys.readouterr().err
    assert code == 2 and calls == []
    assert len(err.splitlines()) == 1 and err.startswith("dgiqa: error: ")
    assert "--html" in err and html in err
    assert ("a folder; give a file name" if where == "folder" else "none can be created under /proc") in err
