"""Selections over a multi-night output written by the job's own writer: pruning, latest per image, formats."""

import datetime as dt
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.analysis.query import QueryError, ScoreFilter, open_scores, select, selection_columns, write_selection
from pipeline.batch import output as output_mod
from pipeline.batch.manifest import read_manifest
from pipeline.batch.output import RunOutput, output_schema
from pipeline.cli import main as dgiqa

MODEL_A = "dgiqa@aaaa+depth-anything-v1-vits@bbbb"
MODEL_B = "dgiqa@cccc+depth-anything-v1-vits@bbbb"
NIGHTS = ("2026-11-20", "2026-11-21", "2026-11-22")
ROW_GROUP = 50
FILTER_SCRIPT = Path(__file__).resolve().parents[2] / "jobs" / "filter_scores.py"


def _rows(uris, scores, statuses, model, night, extra=None):
    n = len(uris)
    at = dt.datetime.fromisoformat(night + "T03:00:00+00:00")
    table = {
        "uri": uris, "etag": [f"etag-{night}-{u[-4:]}" for u in uris], "size_bytes": [1000 + i for i in range(n)],
        "width": [640] * n, "height": [480] * n,
        "score": [s if st == "ok" else None for s, st in zip(scores, statuses, strict=True)],
        "score_std": [0.01 if st == "ok" else None for st in statuses], "num_crops": [20] * n,
        "status": statuses, "error": [None if st == "ok" else f"{st} reason" for st in statuses],
        "model_id": [model] * n, "scorer": ["dgiqa"] * n, "weights_sha256": ["aaaa"] * n, "scored_at": [at] * n,
        "aux_model": [None] * n, "run_id": [f"run-{night}"] * n,
    }
    extras = pa.schema([pa.field(k, pa.string()) for k in (extra or {})])
    table.update(extra or {})
    return pa.table(table, schema=output_schema(extras)), extras


def _commit(root, night, model, table, extras, key):
    run = RunOutput(str(root), night, key, output_schema(extras))
    run.write_shard(0, table.append_column("row_index", pa.array(range(len(table)), pa.int64())))
    run.commit({"run_key": key})


@pytest.fixture(scope="module")
def scores_output(tmp_path_factory):
    """Three nights written through RunOutput with small row groups, so pruning shows at this size.

    Night 1: 400 images, model A, 10 errors. Night 2: 60 of them again (changed), 8 of those now errors,
    100 new ones, and a duplicate manifest entry (ok + error for one uri). Night 3: model B on 150 images,
    with an extra manifest column.
    """
    root = tmp_path_factory.mktemp("scores")
    rng = np.random.default_rng(0)
    mp = pytest.MonkeyPatch()
    mp.setattr(output_mod, "ROW_GROUP_SIZE", ROW_GROUP)
    try:
        uris = [f"s3://photos/a/{i:04d}.jpg" for i in range(400)]
        st1 = ["error" if i % 40 == 7 else "ok" for i in range(400)]
        _commit(root, NIGHTS[0], MODEL_A, *_rows(uris, rng.random(400).tolist(), st1, MODEL_A, NIGHTS[0]), "k1")
        again = uris[:60] + [f"s3://photos/b/{i:04d}.jpg" for i in range(100)] + [uris[300]]
        st2 = ["error" if i < 8 else "ok" for i in range(60)] + ["ok"] * 100 + ["error"]
        _commit(root, NIGHTS[1], MODEL_A, *_rows(again, rng.random(161).tolist(), st2, MODEL_A, NIGHTS[1]), "k2")
        b_uris = uris[:150]
        _commit(root, NIGHTS[2], MODEL_B, *_rows(b_uris, rng.random(150).tolist(), ["ok"] * 150, MODEL_B,
                                                 NIGHTS[2], extra={"label": [f"l{i}" for i in range(150)]}), "k3")
    finally:
        mp.undo()
    return root


def _everything(root) -> pd.DataFrame:
    """All rows, read file by file with plain pyarrow: the reference the selections are checked against."""
    frames = []
    for path in sorted(Path(root).glob("run_date=*/*.parquet")):
        frame = pq.read_table(path).to_pandas()
        frame["run_date"] = path.parent.name.split("=", 1)[1]
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def _latest_reference(frame: pd.DataFrame) -> pd.DataFrame:
    frame = frame.assign(_ok=frame["status"] == "ok")
    frame = frame.sort_values(["uri", "model_id", "run_date", "_ok"], ascending=[True, True, False, False])
    return frame.drop_duplicates(["uri", "model_id"]).drop(columns="_ok")


def test_output_has_the_row_groups_the_pruning_relies_on(scores_output):
    for path in Path(scores_output).glob("run_date=*/*.parquet"):
        meta = pq.ParquetFile(path).metadata
        assert meta.num_row_groups > 1
        maxima = [meta.row_group(i).column(meta.schema.names.index("score")).statistics.max
                  for i in range(meta.num_row_groups) if meta.row_group(i).column(5).statistics.has_min_max]
        assert maxima == sorted(maxima)  # sorted by score: each row group covers a narrow score range


def test_score_threshold_on_one_night_prunes_files_and_row_groups(scores_output):
    dataset = open_scores(str(scores_output))
    table, stats = select(dataset, ScoreFilter(min_score=0.9, date_from=NIGHTS[0], date_to=NIGHTS[0],
                                               latest=False))
    ref = _everything(scores_output)
    ref = ref[(ref.run_date == NIGHTS[0]) & (ref.score >= 0.9)]
    assert sorted(table.column("uri").to_pylist()) == sorted(ref.uri)
    assert stats.files_total == 3 and stats.files_read == 1
    assert stats.row_groups_total == 8  # 400 rows in groups of 50
    assert 1 <= stats.row_groups_read <= 2 < stats.row_groups_total
    assert stats.rows_read <= 2 * ROW_GROUP < 400
    assert table.column("score").to_pylist() == sorted(table.column("score").to_pylist(), reverse=True)


def test_latest_score_per_image_across_nights(scores_output):
    table, stats = select(open_scores(str(scores_output)), ScoreFilter(model_id=MODEL_A))
    ref = _latest_reference(_everything(scores_output).query("model_id == @MODEL_A"))
    got = table.to_pandas().set_index("uri")
    assert len(got) == len(ref) == 500 and got.index.is_unique
    ref = ref.set_index("uri").loc[got.index]
    assert (got["run_date"] == ref["run_date"]).all() and (got["status"] == ref["status"]).all()
    assert np.allclose(got["score"].fillna(-1), ref["score"].fillna(-1))
    # A changed image that failed on night 2 has no score now, not night 1's score of the old content.
    assert got.loc["s3://photos/a/0003.jpg", "status"] == "error"
    assert got.loc["s3://photos/a/0003.jpg", "run_date"] == NIGHTS[1]
    # The duplicate manifest entry of night 2 (ok on night 1, an error row on night 2): no newer ok row, so
    # the error of night 2 is the latest; a duplicate's ok row in the same night would win.
    assert got.loc["s3://photos/a/0300.jpg", "run_date"] == NIGHTS[1]
    assert stats.key_rows_read == 561


def test_latest_then_threshold_never_returns_a_superseded_score(scores_output):
    dataset = open_scores(str(scores_output))
    table, stats = select(dataset, ScoreFilter(model_id=MODEL_A, min_score=0.0))
    ref = _latest_reference(_everything(scores_output).query("model_id == @MODEL_A"))
    ref = ref[ref.status == "ok"]
    assert sorted(table.column("uri").to_pylist()) == sorted(ref.uri)
    assert "s3://photos/a/0003.jpg" not in table.column("uri").to_pylist()
    assert set(table.column("status").to_pylist()) == {"ok"}


def test_top_and_bottom_fractions_are_exact_counts_of_the_latest_ok_rows(scores_output):
    dataset = open_scores(str(scores_output))
    ref = _latest_reference(_everything(scores_output).query("model_id == @MODEL_A"))
    ok = ref[ref.status == "ok"].sort_values(["score", "uri"], ascending=[False, True])
    top, top_stats = select(dataset, ScoreFilter(model_id=MODEL_A, top=0.1))
    assert top.column("uri").to_pylist() == list(ok.uri[: int(np.ceil(0.1 * len(ok)))])
    assert top_stats.row_groups_read < top_stats.row_groups_total
    bottom, _ = select(dataset, ScoreFilter(model_id=MODEL_A, bottom=0.05))
    assert bottom.column("uri").to_pylist() == list(ok.uri[-int(np.ceil(0.05 * len(ok))):])
    band, _ = select(dataset, ScoreFilter(model_id=MODEL_A, quantiles=(0.25, 0.5)))
    lo, hi = np.quantile(ok.score.to_numpy(np.float32), [0.25, 0.5])
    expected = ok[(ok.score >= lo) & (ok.score <= hi)]
    assert sorted(band.column("uri").to_pylist()) == sorted(expected.uri)


def test_a_nan_score_written_before_it_was_an_error_takes_no_rank(tmp_path):
    """Ten ok rows, one of them NaN: --top 0.3 is the 3 best of the 9 scores, the quantiles are theirs."""
    scores = [0.1 * i for i in range(9)] + [float("nan")]
    uris = [f"s3://photos/{i}.jpg" for i in range(10)]
    _commit(tmp_path, NIGHTS[0], MODEL_A, *_rows(uris, scores, ["ok"] * 10, MODEL_A, NIGHTS[0]), "k1")
    dataset = open_scores(str(tmp_path))
    top, _ = select(dataset, ScoreFilter(top=0.3))
    assert top.column("uri").to_pylist() == ["s3://photos/8.jpg", "s3://photos/7.jpg", "s3://photos/6.jpg"]
    bottom, _ = select(dataset, ScoreFilter(bottom=0.2))
    assert bottom.column("uri").to_pylist() == ["s3://photos/1.jpg", "s3://photos/0.jpg"]
    upper_half, _ = select(dataset, ScoreFilter(quantiles=(0.5, 1)))
    assert upper_half.column("uri").to_pylist() == [f"s3://photos/{i}.jpg" for i in (8, 7, 6, 5, 4)]


def test_model_status_and_date_filters(scores_output):
    dataset = open_scores(str(scores_output))
    b, stats = select(dataset, ScoreFilter(model_id=MODEL_B))
    # model_id is no partition: every file is opened, but row-group statistics skip the other model's rows.
    assert b.num_rows == 150 and stats.files_read == 3 and stats.row_groups_read == 3
    errors, _ = select(dataset, ScoreFilter(statuses=("error",), latest=False, date_to=NIGHTS[0]))
    assert errors.num_rows == 10 and set(errors.column("run_date").to_pylist()) == {NIGHTS[0]}
    both, _ = select(dataset, ScoreFilter())
    assert both.num_rows == 500 + 150
    assert select(dataset, ScoreFilter(date_from="2027-01-01"))[0].num_rows == 0


def test_schemas_of_all_nights_are_merged(scores_output):
    dataset = open_scores(str(scores_output))
    assert "label" in dataset.schema.names
    table, _ = select(dataset, ScoreFilter(model_id=MODEL_B, top=0.02), columns=["uri", "label", "score"])
    assert table.num_rows == 3 and all(v.startswith("l") for v in table.column("label").to_pylist())
    assert selection_columns(dataset)[-1] == "label"


def test_a_carried_column_of_other_types_on_other_nights_is_read_as_text(tmp_path, capsys):
    """One night's manifest was a CSV (``id`` text), the next a Parquet file (``id`` an integer): both read."""
    text = pa.schema([pa.field("id", pa.string())])
    number = pa.schema([pa.field("id", pa.int64())])
    first, _ = _rows(["s3://photos/a.jpg"], [0.4], ["ok"], MODEL_A, NIGHTS[0], extra={"id": ["007"]})
    _commit(tmp_path, NIGHTS[0], MODEL_A, first, text, "k1")
    second, _ = _rows(["s3://photos/b.jpg"], [0.6], ["ok"], MODEL_A, NIGHTS[1])
    _commit(tmp_path, NIGHTS[1], MODEL_A, second.append_column(number.field("id"), pa.array([8], pa.int64())),
            number, "k2")
    dataset = open_scores(str(tmp_path))
    assert dataset.schema.field("id").type == pa.string() and dataset.schema.field("score").type == pa.float32()
    table, _ = select(dataset, columns=["uri", "id"])
    assert table.to_pylist() == [{"uri": "s3://photos/b.jpg", "id": "8"}, {"uri": "s3://photos/a.jpg", "id": "007"}]
    capsys.readouterr()
    assert dgiqa(["filter", str(tmp_path), "--columns", "uri,id"]) == 0
    assert capsys.readouterr().out.splitlines()[1:] == ['"s3://photos/b.jpg","8"', '"s3://photos/a.jpg","007"']


@pytest.mark.parametrize("ext", ["parquet", "csv", "jsonl"])
def test_written_selection_is_a_manifest_for_the_next_job(scores_output, tmp_path, ext):
    dataset = open_scores(str(scores_output))
    columns = selection_columns(dataset)
    table, _ = select(dataset, ScoreFilter(model_id=MODEL_B, min_score=0.5), columns=columns)
    target = tmp_path / f"keep.{ext}"
    assert write_selection(table, str(target)) == ext
    manifest = read_manifest(str(target))
    assert manifest.table.column("uri").to_pylist() == table.column("uri").to_pylist()
    assert manifest.table.column("etag").to_pylist() == table.column("etag").to_pylist()
    assert "score" in manifest.table.column_names and "label" in manifest.table.column_names


def test_selection_over_s3(scores_output, s3):
    fs, options = s3
    fs.mkdir("scores")
    fs.put(str(scores_output) + "/", "scores/out/", recursive=True)
    dataset = open_scores("s3://scores/out", options)
    table, stats = select(dataset, ScoreFilter(model_id=MODEL_A, min_score=0.95, date_from=NIGHTS[1]))
    ref = _latest_reference(_everything(scores_output).query("model_id == @MODEL_A"))
    ref = ref[(ref.status == "ok") & (ref.score >= 0.95) & (ref.run_date >= NIGHTS[1])]
    assert sorted(table.column("uri").to_pylist()) == sorted(ref.uri)
    assert stats.files_read == 2  # nights 2 and 3; night 1 is pruned by its partition
    write_selection(table, "s3://scores/keep.jsonl", storage_options=options)
    assert fs.cat("scores/keep.jsonl").count(b"\n") == table.num_rows


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"top": 0.1, "bottom": 0.1}, "choose one of --top, --bottom and --quantiles"),
    ({"top": 1.5}, "--top is a fraction in (0, 1]"),
    ({"quantiles": (0.5, 0.2)}, "--quantiles must be LO,HI"),
    ({"date_from": "yesterday"}, "--from must be a date YYYY-MM-DD"),
    ({"statuses": ("okay",)}, "unknown status ['okay']"),
    ({"min_score": 0.8, "max_score": 0.2}, "is above --max-score"),
])
def test_impossible_selections_are_refused(kwargs, message):
    with pytest.raises(QueryError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                       .replace("]", r"\]")):
        ScoreFilter(**kwargs)


def test_dgiqa_filter_writes_a_manifest_and_reports_pruning(scores_output, tmp_path, capsys):
    out = tmp_path / "keep.csv"
    code = dgiqa(["filter", str(scores_output), "--model-id", MODEL_A, "--min-score", "0.9", "--out", str(out)])
    assert code == 0
    err = capsys.readouterr().err
    assert "selected" in err and "row groups" in err
    written = pd.read_csv(out)
    assert list(written.columns[:2]) == ["uri", "score"] and (written.score >= 0.9).all()


def test_dgiqa_filter_prints_csv_to_stdout_without_out(scores_output, capsys):
    assert dgiqa(["filter", str(scores_output), "--model-id", MODEL_B, "--top", "0.02", "--columns",
                  "uri,score"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == '"uri","score"' and len(lines) == 4


def _top_of_model_b(scores_output) -> tuple[list[str], pa.Table]:
    """``dgiqa filter`` arguments of a small selection, and the selection itself."""
    expected, _ = select(open_scores(str(scores_output)), ScoreFilter(model_id=MODEL_B, top=0.02),
                         columns=["uri", "score"])
    return ["filter", str(scores_output), "--model-id", MODEL_B, "--top", "0.02", "--columns", "uri,score"], expected


def test_dgiqa_filter_writes_jsonl_to_stdout_with_format(scores_output, capsys):
    args, expected = _top_of_model_b(scores_output)
    assert dgiqa([*args, "--format", "jsonl"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["uri"] for r in rows] == expected.column("uri").to_pylist() and len(rows) == 3
    # Scores are float32: the JSON's digits give back the very same float32.
    assert np.array_equal(np.float32([r["score"] for r in rows]), expected.column("score").to_numpy())


def test_dgiqa_filter_writes_parquet_to_a_redirected_stdout(scores_output, capsysbinary):
    args, expected = _top_of_model_b(scores_output)
    assert dgiqa([*args, "--format", "parquet"]) == 0
    assert pq.read_table(io.BytesIO(capsysbinary.readouterr().out)).equals(expected)


def test_dgiqa_filter_refuses_parquet_on_a_terminal(scores_output, capsys, monkeypatch):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert dgiqa(["filter", str(scores_output), "--format", "parquet"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.splitlines() == [
        "dgiqa: error: --format parquet writes binary data: use --out FILE.parquet or redirect standard output"]


@pytest.mark.parametrize(("args", "message"), [
    (["--top", "2"], "--top is a fraction in (0, 1]"),
    (["--columns", "uri,nope"], "no column nope"),
    (["--from", "2026-13-01"], "--from must be a date"),
])
def test_filter_job_script_errors_are_one_line(scores_output, args, message):
    proc = subprocess.run([sys.executable, str(FILTER_SCRIPT), str(scores_output), *args], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert message in proc.stderr.strip().splitlines()[-1]


def test_no_scores_is_a_one_line_error(tmp_path, capsys):
    assert dgiqa(["filter", str(tmp_path / "nothing")]) == 2
    assert "no scores at" in capsys.readouterr().err


def _readme_block(language: str) -> str:
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = text[text.index("### Select images"):]
    start = section.index(f"```{language}\n") + len(language) + 4
    return section[start:section.index("```", start)]


def test_readme_duckdb_query_gives_what_dgiqa_filter_gives(scores_output):
    import duckdb

    sql = _readme_block("sql").replace("'scores/", f"'{scores_output}/").replace("MODEL_ID", MODEL_A)
    rows = duckdb.sql(sql).fetchall()
    table, _ = select(open_scores(str(scores_output)), ScoreFilter(model_id=MODEL_A, min_score=0.6))
    assert [r[0] for r in rows] == table.column("uri").to_pylist()
    assert np.allclose([r[1] for r in rows], table.column("score").to_pylist())


def test_readme_pyarrow_query_gives_what_dgiqa_filter_gives(scores_output):
    namespace = {}
    exec(_readme_block("python").replace('"scores/"', repr(f"{scores_output}/")), namespace)  # noqa: S102
    table, _ = select(open_scores(str(scores_output)),
                      ScoreFilter(min_score=0.6, date_from=NIGHTS[1], date_to=NIGHTS[1], latest=False))
    assert sorted(namespace["night"].column("uri").to_pylist()) == sorted(table.column("uri").to_pylist())


def test_partitions_from_before_the_scorer_columns_read_beside_new_ones(tmp_path):
    """Migration: older partitions hold ``encoder`` where newer ones hold ``scorer``, ``weights_sha256`` and
    ``aux_model``; ``dgiqa filter`` reads both, and README's SQL gives old rows the values new rows carry."""
    root = tmp_path / "scores"
    depth = "depth-anything-v1-vits@" + "b" * 64
    model = f"dgiqa@{'a' * 64}+{depth}"
    new, extras = _rows(["file:///lib/new.jpg"], [0.7], ["ok"], model, "2026-12-02")
    new = new.set_column(new.schema.get_field_index("weights_sha256"), "weights_sha256", pa.array(["a" * 64]))
    new = new.set_column(new.schema.get_field_index("aux_model"), "aux_model", pa.array([depth]))
    _commit(root, "2026-12-02", model, new, extras, "new")
    old = new.drop_columns(["scorer", "weights_sha256", "aux_model"]).append_column("encoder", pa.array(["vits"]))
    old = old.set_column(0, "uri", pa.array(["file:///lib/old.jpg"]))
    (root / "run_date=2026-11-01").mkdir()
    pq.write_table(old, root / "run_date=2026-11-01" / "part-old.parquet")

    table, _ = select(open_scores(str(root)), ScoreFilter(latest=False),
                            columns=["uri", "model_id", "scorer", "encoder"])
    rows = {r["uri"]: r for r in table.to_pylist()}
    assert rows["file:///lib/old.jpg"]["encoder"] == "vits" and rows["file:///lib/old.jpg"]["scorer"] is None
    assert rows["file:///lib/new.jpg"]["scorer"] == "dgiqa" and rows["file:///lib/new.jpg"]["encoder"] is None

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    sql = re.search(r"```sql\n(SELECT .*?)```", readme, re.S).group(1).replace("'<output>", f"'{root}")
    derived = {r[0]: r[1:] for r in duckdb.sql(sql).fetchall()}
    assert derived["file:///lib/old.jpg"] == derived["file:///lib/new.jpg"] == ("dgiqa", "a" * 64, depth)
