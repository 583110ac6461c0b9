"""A hostile label file and a hostile part file through ``dgiqa train``, ``dgiqa evaluate --weights`` and
``dgiqa report``: every URI that is not allowed is refused with its reason, and no request is made for it.

The data names the worker's own files (``file:///etc/passwd``, a symlink to it, ``..`` after the images prefix),
an HTTP server on 127.0.0.1 standing in for the metadata service (which records every request), another bucket
on the test S3 server (reached through a proxy that records every request), ``::`` chaining, a URL with a
password and a signature, and an allowed HTTP prefix whose server answers 302 to the recording server. An image
over ``--max-bytes`` is refused with the limit named. Three small images (two local, one in an allowed bucket)
are allowed, so the tests also see the reads that should happen.
"""

from __future__ import annotations

import http.server
import json
import logging
import os
import re
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.batch.output import RESULT_SCHEMA
from pipeline.scoring.sample import synthetic_photo
from tests.s3proxy import FaultyProxy

MAX_BYTES = 100_000
SECRETS = ("hunter2", "topsecretsignature", "AKIDEXAMPLE")


class Recorder:
    """An HTTP server on 127.0.0.1 that records every request; it answers 200 with an image, or a redirect."""

    def __init__(self, redirect_to: str | None = None, body: bytes = b""):
        self.paths: list[str] = []
        recorder = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self):
                recorder.paths.append(f"{self.command} {self.path}")
                if redirect_to:
                    self.send_response(302)
                    self.send_header("Location", redirect_to)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command == "GET":
                    self.wfile.write(body)

            do_GET = do_HEAD = _answer

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@dataclass
class Hostile:
    folder: Path
    images: Path
    labels: Path
    labels_more: Path  # the same and one more allowed image
    metadata: Recorder  # must never be asked anything
    redirector: Recorder  # allowed; answers 302 to ``metadata``
    s3: FaultyProxy  # every request to the S3 server
    options: dict
    allow: list[str]
    rows: dict[str, str]  # name -> URI as written in the label file
    good: list[str]


def _jpeg(path: Path, seed: int) -> bytes:
    Image.fromarray(synthetic_photo(96, 128, seed=seed)).save(path, "JPEG", quality=90)
    return path.read_bytes()


@pytest.fixture(scope="module")
def hostile(s3_server, tmp_path_factory):
    import s3fs

    folder = tmp_path_factory.mktemp("hostile")
    images = folder / "images"
    images.mkdir()
    for i in (0, 1, 3):
        _jpeg(images / f"good{i}.jpg", seed=i)
    noise = np.random.default_rng(0).integers(0, 256, (240, 320, 3), dtype=np.uint8)
    Image.fromarray(noise).save(images / "big.png")  # a real image, over the byte limit
    assert (images / "big.png").stat().st_size > MAX_BYTES
    os.symlink("/etc/passwd", images / "link.jpg")

    metadata = Recorder(body=_jpeg(folder / "bait.jpg", seed=9))  # would be a readable image if asked
    redirector = Recorder(redirect_to=f"{metadata.url}/latest/meta-data/iam/security-credentials/")
    proxy = FaultyProxy(s3_server, lambda *_: None).__enter__()
    options = {"client_kwargs": {"endpoint_url": proxy.url}}
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem(**options)
    fs.mkdir("photos")
    fs.mkdir("secrets")
    fs.put(str(images / "good0.jpg"), "photos/good2.jpg")
    fs.put(str(images / "good1.jpg"), "secrets/key.jpg")  # readable, were anyone to ask

    rows = {
        "etc_passwd": "file:///etc/passwd",
        "metadata": f"{metadata.url}/latest/meta-data/",
        "other_bucket": "s3://secrets/key.jpg",
        "dotdot": "../../../../../../../../etc/hostname",
        "chained": f"file://{images}/good0.jpg::{metadata.url}/chained",
        "symlink": "link.jpg",
        "signed": f"http://user:hunter2@{metadata.url[len('http://'):]}/signed.jpg?X-Amz-Credential=AKIDEXAMPLE"
                  "&X-Amz-Signature=topsecretsignature",
        "redirect": f"{redirector.url}/allowed/photo.jpg",
        "big": "big.png",
    }
    good = ["good0.jpg", "good1.jpg", "s3://photos/good2.jpg"]
    labels = folder / "labels.csv"
    labels.write_text("uri,mos\n" + "".join(f"{uri},{i + 1}\n" for i, uri in enumerate([*good, *rows.values()])))
    # Evaluation fits a 4-parameter logistic, so it gets a fourth allowed image.
    more = folder / "labels_more.csv"
    more.write_text(labels.read_text() + "good3.jpg,20\n")
    allow = [str(images), "s3://photos/", f"{redirector.url}/allowed/"]
    yield Hostile(folder, images, labels, more, metadata, redirector, proxy, options, allow, rows, good)
    for bucket in ("photos", "secrets"):
        fs.rm(bucket, recursive=True)
    proxy.__exit__(None, None, None)
    metadata.close()
    redirector.close()
    s3fs.S3FileSystem.clear_instance_cache()


def _reset(h: Hostile) -> None:
    h.metadata.paths.clear()
    h.redirector.paths.clear()
    h.s3.requests.clear()


def _assert_no_request_left_the_allowlist(h: Hostile) -> None:
    assert h.metadata.paths == []  # neither directly, nor chained, nor by following the redirect
    assert h.redirector.paths == ["GET /allowed/photo.jpg"]  # the one allowed request; its 302 was not followed
    assert not [path for _, path in h.s3.requests if path.startswith("/secrets")]
    assert any(path == "/photos/good2.jpg" for _, path in h.s3.requests)  # the recording does see allowed reads


# A piece of each row's URI found in no other row's, to find its line, result row or tile.
MARKERS = {"etc_passwd": "/etc/passwd", "metadata": "/latest/meta-data/", "other_bucket": "secrets/key.jpg",
           "dotdot": "/etc/hostname", "chained": "/chained", "symlink": "link.jpg", "signed": "signed.jpg",
           "redirect": "/allowed/photo.jpg", "big": "big.png"}


def _one(name: str, texts: list[str]) -> str:
    found = [t for t in texts if MARKERS[name] in t]
    assert len(found) == 1, (name, texts)
    return found[0]


# The reason each refused row must give, by the row's name.
REASONS = {
    "etc_passwd": "outside the allowed prefixes",
    "metadata": "outside the allowed prefixes",
    "other_bucket": "outside the allowed prefixes",
    "dotdot": "'.' or '..' path segments",
    "chained": "chains file systems with '::'",
    "symlink": "a link that leads outside the allowed prefixes",
    "signed": "has a query or fragment",
    "redirect": "answered with a redirect (HTTP 302); redirects are not followed",
}


def _common(h: Hostile, labels: Path | None = None) -> list[str]:
    allowed = [a for prefix in h.allow for a in ("--allow-prefix", prefix)]
    return [str(labels or h.labels), "--images-prefix", str(h.images), "--storage-options", json.dumps(h.options),
            *allowed, "--max-bytes", str(MAX_BYTES)]


def test_train_refuses_hostile_label_rows_before_any_request(hostile, checkpoints, caplog, capsys):
    """Three allowed images cannot make a split of 1 training and 3 held-out images, so the run stops after the
    depth step, with the reasons counted; each skipped row is logged with its reason."""
    from pipeline.cli import main

    h = hostile
    _reset(h)
    caplog.set_level(logging.INFO, logger="pipeline")
    code = main(["train", *_common(h), "--output", str(h.folder / "trained"), "--init", "random",
                 "--depth-weights", str(checkpoints["depth"]), "--depth-input-size", "70", "--depth-actors", "0",
                 "--val-fraction", "0.3", "--epochs", "1"])
    err = capsys.readouterr().err
    assert code == 2
    assert "held-out images can be read; at least 1 and 3 are needed (skipped: " in err
    # The skipped rows counted by cause (pipeline.batch.error_reasons), as the job's summary counts them.
    causes = err.strip().split("(skipped: ", 1)[1].removesuffix(")")
    assert sum(int(n) for n in re.findall(r" (\d+)(?=, |$)", causes)) == len(h.rows)
    assert "over the limit of N bytes (--max-bytes) 1" in causes and "is outside the allowed prefixes" in causes
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping ")]
    assert len(skipped) == len(h.rows)
    for name, reason in REASONS.items():
        line = _one(name, skipped)
        assert "(rejected)" in line and reason in line, line
    assert f"over the limit of {MAX_BYTES} bytes (--max-bytes)" in _one("big", skipped)
    assert len(list((h.folder / "depth_cache").rglob("*.png"))) == 3  # the allowed images were read
    everything = err + "\n".join(r.getMessage() for r in caplog.records)
    assert not [s for s in SECRETS if s in everything]
    _assert_no_request_left_the_allowlist(h)


def test_evaluate_weights_scores_only_allowed_images_and_lists_the_refused(hostile, checkpoints, s3_server):
    """``dgiqa evaluate --weights`` as a user runs it: its own process, which starts its own local Ray (a Ray
    session of this test process's own, after other modules' sessions, saw its first actor cancelled at once)."""
    h = hostile
    _reset(h)
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "evaluate", *_common(h, h.labels_more), "--weights",
         str(checkpoints["dgiqa"]), "--depth-weights", str(checkpoints["depth"]), "--crops", "1",
         "--depth-input-size", "70", "--bootstrap", "0", "--json", "--output", str(h.folder / "scores")],
        env={**os.environ, "RAY_ADDRESS": "local"}, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Ray may print its own lines ("(raylet) ...") on standard output too: the document is the JSON object.
    result, _ = json.JSONDecoder().raw_decode(proc.stdout[proc.stdout.index("{"):])
    assert result["matched"] == 4 and result["labels_without_score"] == len(h.rows)
    failures = result["failures"]
    assert len(failures) == len(h.rows)
    by_uri = {f["uri"]: f for f in failures}
    for name, reason in REASONS.items():
        row = by_uri[_one(name, list(by_uri))]
        assert row["status"] == "rejected" and reason in row["error"], (name, row)
    big = by_uri[_one("big", list(by_uri))]
    assert big["status"] == "error" and f"over the limit of {MAX_BYTES} bytes (--max-bytes)" in big["error"]
    assert not [s for s in SECRETS if s in proc.stdout + proc.stderr]
    _assert_no_request_left_the_allowlist(h)


def test_the_default_allowlist_comes_from_the_command_line_never_from_the_rows(hostile):
    """Without --allow-prefix: the images prefix, else the label file's folder; the rows' absolute URIs (here
    ``file:///etc/passwd``, the metadata server, another bucket) allow nothing."""
    from pipeline.analysis.labels import default_allow_prefixes, read_labels

    labels = read_labels(str(hostile.labels), "generic", str(hostile.images))
    assert default_allow_prefixes(labels) == (str(hostile.images),)
    assert default_allow_prefixes(read_labels(str(hostile.labels), "generic")) == (str(hostile.folder),)


def test_report_reads_no_hostile_ok_row_and_tells_why(hostile, tmp_path):
    """A part file anyone could have written under the output: ``ok`` rows naming every hostile URI."""
    from pipeline.cli import main
    from tests.analysis.test_report import _row, parse

    h = hostile
    _reset(h)
    uris = {name: (uri if "://" in uri else f"{h.images}/{uri}") for name, uri in h.rows.items()}
    rows = [_row(uri, "ok", 0.01 * (i + 1)) for i, uri in enumerate(uris.values())]
    rows += [_row(f"{h.images}/good0.jpg", "ok", 0.5), _row("s3://photos/good2.jpg", "ok", 0.6)]
    out = tmp_path / "scores" / "run_date=2026-11-20"
    out.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=RESULT_SCHEMA), out / "part-evil.parquet")
    html = tmp_path / "report.html"
    assert main(["report", str(tmp_path / "scores"), "--html", str(html), "--thumbnails", "20",
                 "--storage-options", json.dumps(h.options), "--max-bytes", str(MAX_BYTES),
                 *[a for prefix in h.allow for a in ("--allow-prefix", prefix)]]) == 0
    page = html.read_text()
    # Fewer ok rows than two grids' worth: the report shows each once, in one grid.
    tiles = parse(page).find_all("div", id="all-ok")[0].find_all("figure")
    by_uri = {t.attrs["data-uri"]: t for t in tiles}
    assert len(tiles) == len(rows)
    for name, reason in REASONS.items():
        tile = by_uri[_one(name, list(by_uri))]
        text = tile.find_all("div", **{"class": "placeholder"})[0].all_text()
        assert text.startswith("not read: ") and reason in text and not tile.find_all("img"), (name, text)
    big = by_uri[_one("big", list(by_uri))].find_all("div", **{"class": "placeholder"})[0].all_text()
    assert f"over the limit of {MAX_BYTES} bytes (--max-bytes)" in big
    assert len(by_uri[f"{h.images}/good0.jpg"].find_all("img")) == 1
    assert len(by_uri["s3://photos/good2.jpg"].find_all("img")) == 1
    assert not [s for s in SECRETS if s in page]
    _assert_no_request_left_the_allowlist(h)


def test_report_without_recorded_prefixes_reads_nothing(hostile, tmp_path):
    """No --allow-prefix and no summary recording the run's allowed prefixes: no row is read at all."""
    from pipeline.cli import main
    from tests.analysis.test_report import _row, parse

    h = hostile
    _reset(h)
    out = tmp_path / "scores" / "run_date=2026-11-20"
    out.mkdir(parents=True)
    rows = [_row(h.rows["redirect"], "ok", 0.2), _row(h.rows["metadata"], "ok", 0.3)]
    pq.write_table(pa.Table.from_pylist(rows, schema=RESULT_SCHEMA), out / "part-evil.parquet")
    assert main(["report", str(tmp_path / "scores"), "--html", str(tmp_path / "r.html")]) == 0
    tiles = parse((tmp_path / "r.html").read_text()).find_all("figure")
    assert tiles and all("recorded no allowed prefixes" in t.all_text() for t in tiles)
    assert h.metadata.paths == [] and h.redirector.paths == []
