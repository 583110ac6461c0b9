"""Evaluation end to end: generated multi-night job outputs, label files, the CLI, and one real scoring run."""

import argparse
import datetime as dt
import json
import re
import runpy
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.analysis import evaluate, query
from pipeline.analysis.labels import read_labels
from pipeline.analysis.metrics import compute_metrics, density_separation
from pipeline.analysis.query import QueryError
from pipeline.batch.output import RESULT_SCHEMA
from pipeline.cli import evaluate as cli_evaluate
from tests.conftest import local_ray_without_auth

REPO = Path(__file__).resolve().parents[2]
IMAGES = "/data/library/eval"  # never read: the scores are generated
MODEL_A = "dgiqa@aaaaaaaaaaaa+depth-anything-v1-vits@bbbbbbbbbbbb"
MODEL_B = "dgiqa@cccccccccccc+depth-anything-v1-vits@bbbbbbbbbbbb"


def _write_night(output: Path, run_date: str, rows: list[dict], name: str = "part-x") -> None:
    """One committed part file of a night, with exactly the job's result schema."""
    when = dt.datetime.fromisoformat(run_date).replace(hour=2, tzinfo=dt.UTC)
    full = [{"uri": r["uri"], "etag": None, "size_bytes": None, "width": 640, "height": 480,
             "score": r.get("score"), "score_std": 0.0 if r.get("score") is not None else None,
             "num_crops": 20 if r.get("score") is not None else None, "status": r.get("status", "ok"),
             "error": r.get("error"), "model_id": r.get("model_id", MODEL_A), "scorer": "dgiqa",
             "weights_sha256": "aaaa", "aux_model": None, "scored_at": when, "run_id": f"{run_date}-{name}"}
            for r in rows]
    folder = output / f"run_date={run_date}"
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(full, schema=RESULT_SCHEMA), folder / f"{name}.parquet")


@pytest.fixture()
def dataset(tmp_path):
    """Labels for 30 images and two nights of scores.

    Night 1 scored every labelled image with stale, unrelated scores; night 2 rescored images 0-24 (these are
    the latest and track the labels), failed on 25-27 (latest row an error: no ok score) and never saw 28-29.
    Four scored images have no label. Model B scored everything on night 2 as well.
    """
    rng = np.random.default_rng(0)
    quality = rng.uniform(0, 1, 30)
    names = [f"img{i:03d}.jpg" for i in range(30)]
    labels = np.round(1 + 4 * quality + rng.normal(0, 0.2, 30), 2)
    fresh = np.clip(quality + rng.normal(0, 0.08, 30), 0, 1).astype(np.float32)
    stale = rng.uniform(0, 1, 30)
    output = tmp_path / "scores"
    uri = [f"file://{IMAGES}/{n}" for n in names]
    _write_night(output, "2026-11-20", [{"uri": uri[i], "score": float(stale[i])} for i in range(28)])
    night2 = [{"uri": uri[i], "score": float(fresh[i])} for i in range(25)]
    night2 += [{"uri": uri[i], "status": "error", "error": "image truncated or corrupt"} for i in range(25, 28)]
    night2 += [{"uri": f"file://{IMAGES}/unlabelled{i}.jpg", "score": 0.5 + i / 10} for i in range(4)]
    _write_night(output, "2026-11-21", night2, "part-a")
    _write_night(output, "2026-11-21", [{"uri": u, "score": 0.5, "model_id": MODEL_B} for u in uri[:20]], "part-b")
    label_file = tmp_path / "labels.csv"
    label_file.write_text("uri,mos\n" + "".join(f"{n},{v}\n" for n, v in zip(names, labels, strict=True)))
    return {"output": output, "labels": label_file, "label_values": labels, "fresh": fresh, "stale": stale}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dgiqa")
    cli_evaluate.register(parser.add_subparsers(dest="command", required=True))
    return parser


def _cli(*argv: str) -> int:
    args = _parser().parse_args(list(argv))
    return args.run(args)


def test_evaluate_uses_each_images_latest_ok_score_of_one_model(dataset):
    labels = read_labels(str(dataset["labels"]), "generic", IMAGES)
    scores = evaluate.read_scores(str(dataset["output"]), MODEL_A)
    result = evaluate.evaluate(labels, scores, bootstrap=100, seed=3)
    assert (result.labelled, result.scored, result.matched) == (30, 29, 25)
    assert result.labels_without_score == 5 and result.scores_without_label == 4
    assert result.examples_without_score == [f"{IMAGES}/img{i:03d}.jpg" for i in range(25, 30)]
    expected = compute_metrics(dataset["fresh"][:25].astype(float), dataset["label_values"][:25], bootstrap=100,
                               seed=3)
    assert result.metrics == expected
    assert result.metrics.srocc.value > 0.9 and result.model_id == MODEL_A
    stale = compute_metrics(dataset["stale"][:25], dataset["label_values"][:25], bootstrap=0)
    assert abs(stale.srocc.value) < 0.5  # the older night's scores would have shown


def test_reading_the_labelled_images_scores_only_brings_those_rows(dataset):
    """The labels' URIs are joined in DuckDB: the other images' scores stay there, only counted."""
    asked = [f"{IMAGES}/img{i:03d}.jpg" for i in (0, 1, 2, 26, 29)] + [f"file://{IMAGES}/elsewhere.jpg"]
    scores = evaluate.read_scores(str(dataset["output"]), MODEL_A, uris=asked)
    got = dict(zip(scores.table.column("uri").to_pylist(), scores.table.column("score").to_pylist(), strict=True))
    # The latest ok rows of the asked images that have one (26's latest row is an error, 29 was never scored).
    assert got == {f"file://{IMAGES}/img{i:03d}.jpg": pytest.approx(float(dataset["fresh"][i])) for i in (0, 1, 2)}
    assert scores.images == 29 and scores.model_id == MODEL_A  # 25 labelled and 4 unlabelled images scored ok
    with pytest.raises(QueryError, match="cannot also be ranked"):
        query.select(query.open_scores(str(dataset["output"])), query.ScoreFilter(top=0.1), uris=pa.array(asked))


def test_several_models_need_a_model_id(dataset):
    listed = re.escape(f"come from 2 models; choose one with --model-id: {MODEL_A}, {MODEL_B}")
    with pytest.raises(evaluate.EvaluationError, match=listed):
        evaluate.read_scores(str(dataset["output"]))
    only_b = evaluate.read_scores(str(dataset["output"]), MODEL_B)
    assert only_b.model_id == MODEL_B and only_b.table.num_rows == 20
    with pytest.raises(evaluate.EvaluationError, match="no ok scores of model dgiqa@nope"):
        evaluate.read_scores(str(dataset["output"]), "dgiqa@nope")


def test_too_few_pairs_is_an_error_with_a_hint(dataset):
    labels = read_labels(str(dataset["labels"]), "generic", "/data/wrong/folder")
    with pytest.raises(evaluate.EvaluationError, match=r"only 0 of 30 labelled images have an ok score .* "
                                                       r"look like 'file:///data/wrong/folder/img000.jpg'.*"
                                                       r"check --images-prefix"):
        evaluate.evaluate(labels, evaluate.read_scores(str(dataset["output"]), MODEL_A), bootstrap=0)


def test_scores_as_a_plain_table_and_dmos_labels(dataset):
    rows = {"uri": [f"file://{IMAGES}/img{i:03d}.jpg" for i in range(25)],
            "score": dataset["fresh"][:25].astype(float).tolist()}
    dmos = dataset["labels"].with_name("dmos.csv")
    dmos.write_text("path,dmos\n" + "".join(f"{IMAGES}/img{i:03d}.jpg,{100 - 20 * v}\n"
                                            for i, v in enumerate(dataset["label_values"])))
    labels = read_labels(str(dmos), "generic", uri_column="path", label_column="dmos", lower_is_better=True)
    result = evaluate.evaluate(labels, pa.table(rows), bootstrap=0)
    mos = evaluate.evaluate(read_labels(str(dataset["labels"]), "generic", IMAGES), pa.table(rows), bootstrap=0)
    assert result.metrics.srocc.value == pytest.approx(mos.metrics.srocc.value)
    assert result.metrics.srocc.value > 0.9 and not result.metrics.higher_is_better
    assert result.metrics.rmse.value == pytest.approx(20 * mos.metrics.rmse.value, rel=1e-3)
    two_models = pa.table({**rows, "model_id": [MODEL_A] * 24 + [MODEL_B]})
    with pytest.raises(evaluate.EvaluationError, match="come from 2 models"):
        evaluate.evaluate(labels, two_models, bootstrap=0)


def test_cli_table_json_and_out_file(dataset, capsys, tmp_path):
    common = [str(dataset["labels"]), "--images-prefix", IMAGES, "--scores", str(dataset["output"]),
              "--model-id", MODEL_A, "--bootstrap", "50", "--seed", "1"]
    assert _cli("evaluate", *common, "--out", str(tmp_path / "result.json")) == 0
    text = capsys.readouterr().out
    written = json.loads((tmp_path / "result.json").read_text())
    expected = compute_metrics(dataset["fresh"][:25].astype(float), dataset["label_values"][:25], bootstrap=50,
                               seed=1)
    srocc = expected.srocc
    assert re.search(rf"\nSROCC +{srocc.value:.4f}  \[{srocc.low:.4f}, {srocc.high:.4f}\]\n", text)
    assert "PLCC (logistic)" in text and "KROCC" in text and "RMSE" in text and "95% CI" in text
    assert "25 matched; 5 labelled images without an ok score, 4 scores without a label" in text
    assert written["metrics"]["srocc"] == {"value": srocc.value, "low": srocc.low, "high": srocc.high}
    assert written["matched"] == 25 and written["model_id"] == MODEL_A and written["metrics"]["bootstrap"] == 50
    assert _cli("evaluate", *common, "--json") == 0
    assert json.loads(capsys.readouterr().out) == written


@pytest.mark.parametrize(("extra", "message"), [
    (["--scores", "{output}"], f"come from 2 models; choose one with --model-id: {MODEL_A}, {MODEL_B}"),
    (["--scores", "{tmp}/nothing"], "no scores at"),
    (["--scores", "{output}", "--model-id", MODEL_A, "--label-column", "quality"], "has no column 'quality'"),
    (["--scores", "{output}", "--model-id", MODEL_A, "--layout", "koniq"], "has no column 'image_name'"),
    (["--scores", "{output}", "--model-id", MODEL_A, "--layout", "kadid", "--lower-is-better"],
     "--lower-is-better applies to the generic layout only"),
])
def test_cli_errors_are_one_line_with_exit_code_2(dataset, capsys, tmp_path, extra, message):
    paths = {"{output}": str(dataset["output"]), "{tmp}": str(tmp_path)}
    extra = [next((a.replace(k, v) for k, v in paths.items() if k in a), a) for a in extra]
    code = _cli("evaluate", str(dataset["labels"]), "--images-prefix", IMAGES, "--bootstrap", "0", *extra)
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dgiqa evaluate: error: ") and message in lines[0]


def test_unusable_weights_stop_before_any_scoring_with_one_line(dataset, capsys, tmp_path):
    code = _cli("evaluate", str(dataset["labels"]), "--images-prefix", IMAGES, "--weights", str(tmp_path / "no.pth"),
                "--depth-weights", str(tmp_path / "no_depth.pth"))
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dgiqa evaluate: error: no weights at")


@pytest.mark.parametrize(("argv", "message"), [
    ([], "one of the arguments --scores --weights is required"),
    (["--scores", "s", "--weights", "w"], "not allowed with argument"),
    (["--weights", "w.pth"], "--weights needs --depth-weights"),
    (["--scores", "s", "--output", "o"], "--output apply only when scoring with --weights"),
    (["--weights", "w", "--depth-weights", "d", "--model-id", "m"], "--model-id applies to --scores"),
    (["--scores", "s", "--bootstrap", "-1"], "expected an integer of 0 or more"),
    (["--scores", "s", "--confidence", "95"], "expected a number between 0 and 1"),
    (["--scores", "s", "--storage-options", "{bad"], "not valid JSON"),
    (["--scores", "s", "--layout", "tid2013"], "invalid choice: 'tid2013'"),
    (["--scores", "s", "--allow-prefix", "/data"], "--allow-prefix applies only when scoring with --weights"),
    (["--weights", "w", "--depth-weights", "d", "--max-bytes", "lots"], "expected a size such as 256MiB"),
    (["--weights", "w", "--depth-weights", "d", "--max-bytes", "1e400"], "expected a finite size"),  # inf
])
def test_cli_usage_errors_are_argparse_one_liners(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        _cli("evaluate", "labels.csv", *argv)
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("dgiqa evaluate: error: ") and message in last


def test_separation_command_prints_the_numbers_and_draws_the_svg(tmp_path, capsys):
    rng = np.random.default_rng(5)
    high = np.clip(rng.normal(0.7, 0.05, 40), 0, 1).astype(np.float32)
    low = np.clip(rng.normal(0.35, 0.08, 30), 0, 1).astype(np.float32)
    output = tmp_path / "scores"
    rows = [{"uri": f"file://{IMAGES}/high{i}.jpg", "score": float(s)} for i, s in enumerate(high)]
    rows += [{"uri": f"file://{IMAGES}/low{i}.jpg", "score": float(s)} for i, s in enumerate(low)]
    _write_night(output, "2026-11-21", rows)
    (tmp_path / "high.csv").write_text("uri\n" + "".join(f"{IMAGES}/high{i}.jpg\n" for i in range(42)))
    (tmp_path / "low.jsonl").write_text("".join(json.dumps({"uri": f"{IMAGES}/low{i}.jpg"}) + "\n" for i in range(30)))
    plot = tmp_path / "sep.svg"
    argv = ["separation", "--scores", str(output), "--high", str(tmp_path / "high.csv"), "--low",
            str(tmp_path / "low.jsonl")]
    assert _cli(*argv, "--plot", str(plot)) == 0
    text = capsys.readouterr().out
    expected = density_separation(high.astype(float), low.astype(float))
    assert re.search(rf"\nhigh +40 +{expected.high.mean:.4f} +{expected.high.std:.4f} +2\n", text)
    assert re.search(rf"\nlow +30 +{expected.low.mean:.4f} +{expected.low.std:.4f} +0\n", text)
    assert f"overlap coefficient  {expected.overlap:.4f}" in text
    assert f"d'                   {expected.d_prime:.4f}" in text
    root = ET.fromstring(plot.read_text())
    classes = [el.get("class") for el in root.iter("{http://www.w3.org/2000/svg}polyline")]
    assert classes == ["density-high", "density-low"]
    assert _cli(*argv, "--json") == 0
    result = json.loads(capsys.readouterr().out)
    assert result["separation"]["d_prime"] == pytest.approx(expected.d_prime) and result["high_without_score"] == 2

    (tmp_path / "one.csv").write_text(f"uri\n{IMAGES}/low1.jpg\n")
    assert _cli("separation", "--scores", str(output), "--high", str(tmp_path / "high.csv"), "--low",
                str(tmp_path / "one.csv")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the low-quality set needs at least 2 scores" in err[0]


def test_job_script_passes_its_arguments_to_dgiqa_evaluate(monkeypatch):
    import pipeline.cli

    seen = []
    monkeypatch.setattr(pipeline.cli, "main", lambda argv: seen.append(argv) or 7)
    script = runpy.run_path(str(REPO / "jobs" / "evaluate.py"))
    assert script["main"](["labels.csv", "--scores", "s3://b/scores"]) == 7
    assert seen == [["evaluate", "labels.csv", "--scores", "s3://b/scores"]]


@pytest.fixture()
def local_ray():
    with local_ray_without_auth():
        yield


def test_scoring_the_labelled_images_through_the_job(local_ray, checkpoints, photo_paths, tmp_path, capsys):
    """The --weights path: labelled images become a manifest for run_job; the scores are read back and kept."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for path in photo_paths:
        shutil.copy(path, folder / path.name)
    labels = tmp_path / "labels.csv"
    labels.write_text("uri,mos\n" + "".join(f"{p.name},{i + 1}\n" for i, p in enumerate(photo_paths))
                      + "missing.png,3\n")
    output = tmp_path / "scores"
    argv = ["evaluate", str(labels), "--images-prefix", str(folder), "--weights", str(checkpoints["dgiqa"]),
            "--depth-weights", str(checkpoints["depth"]), "--crops", "2", "--depth-input-size", "70",
            "--output", str(output), "--bootstrap", "20", "--json"]
    assert _cli(*argv) == 0
    scored = json.loads(capsys.readouterr().out)
    assert scored["matched"] == len(photo_paths) and scored["labels_without_score"] == 1
    assert scored["examples_without_score"] == [f"{folder}/missing.png"]
    assert scored["model_id"].startswith("dgiqa@") and scored["scores_source"] == str(output)
    # The kept output is an ordinary job output: evaluating it again gives the same numbers.
    assert [p.name for p in output.iterdir() if p.name.startswith("run_date=")]
    again = ["evaluate", str(labels), "--images-prefix", str(folder), "--scores", str(output), "--bootstrap", "20",
             "--json"]
    assert _cli(*again) == 0
    _assert_same_metrics(json.loads(capsys.readouterr().out)["metrics"], scored["metrics"])


def _assert_same_metrics(again: dict, first: dict) -> None:
    """The same scores paired with the same labels: every value equal, every interval equal to 1e-6.

    A resample that repeats a few of five images is fitted by a logistic that is nearly exact (RMSE ~1e-16),
    an ill-conditioned fit whose last digits follow the process's state: in one pytest process the second
    evaluation's RMSE bound moved by 1e-7, and flushing denormals (``torch.set_flush_denormal``) gives the
    same move in a fresh one. The values and the full-data mapping are no such fit, so they must be equal, and
    a score paired with another image's label moves an interval far more than 1e-6.
    """
    assert set(again) == set(first)
    for name, entry in first.items():
        if isinstance(entry, dict) and "value" in entry:
            assert again[name]["value"] == entry["value"], name
            assert again[name]["low"] == pytest.approx(entry["low"], rel=1e-6, abs=1e-12), name
            assert again[name]["high"] == pytest.approx(entry["high"], rel=1e-6, abs=1e-12), name
        else:
            assert again[name] == entry, name
