"""The Ray Data stages called directly: every row in gives one row out, failures as rows."""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from pipeline.batch.allowlist import Allowlist
from pipeline.batch.stages import ScoreActor, WeightsChanged, _unpack, fetch_batch, prepare_batch
from pipeline.scoring.preprocess import PreparedImage, decode_image, prepare_image
from tests.conftest import FAST

EVERYWHERE = Allowlist(["/"])  # these tests read their own temporary files


def _batch(uris, statuses=None):
    n = len(uris)
    return pa.table({"row_index": pa.array(range(n), pa.int64()), "uri": pa.array(uris, pa.string()),
                     "status": pa.array(statuses or ["ok"] * n, pa.string()), "error": pa.nulls(n, pa.string())})


@pytest.fixture()
def files(tmp_path, photo_paths):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(photo_paths[0].read_bytes()[:500])
    return [f"file://{photo_paths[0]}", str(tmp_path / "missing.jpg"), str(corrupt), f"file://{photo_paths[1]}"]


def test_fetch_keeps_rows_and_reports_missing_objects(files):
    out = fetch_batch(_batch(files, ["ok", "ok", "ok", "rejected"]), allowlist=EVERYWHERE)
    assert out.column("row_index").to_pylist() == [0, 1, 2, 3]
    assert out.column("status").to_pylist() == ["ok", "error", "ok", "rejected"]
    assert "object not found" in out.column("error")[1].as_py()
    data = out.column("data").to_pylist()
    assert data[0] and data[2] and data[1] is None
    assert data[3] is None  # a rejected row is never read


def test_prepare_round_trips_the_arrays(files, fast_scorer):
    out = prepare_batch(fetch_batch(_batch(files), allowlist=EVERYWHERE), fast_scorer.config)
    assert out.column("status").to_pylist() == ["ok", "error", "error", "ok"]
    assert "truncated or corrupt" in out.column("error")[2].as_py()
    row = out.slice(0, 1).to_pylist()[0]
    expected = prepare_image(decode_image(open(files[0].removeprefix("file://"), "rb").read(), FAST), FAST)
    got = _unpack(row, PreparedImage)
    assert np.array_equal(got.rgb_small, expected.rgb_small)
    assert np.array_equal(got.depth_input.numpy(), expected.depth_input.numpy())
    assert (got.height, got.width) == (expected.height, expected.width)


def test_actor_rows_carry_their_own_images_scores(files, fast_scorer):
    """Each output row holds the score of its own image, whatever the order of the batch.

    The actor and the CLI share ``Scorer``, so agreeing with ``score_bytes`` proves no numerics; what it does
    prove is the pairing: the two images' direct scores lie far apart (checked), so a row given the other image's
    score, or a batch's scores shifted by one row, fails.
    """
    tolerance = 1e-5
    images = (files[0], files[3])
    direct = {uri: fast_scorer.score_bytes(Path(uri.removeprefix("file://")).read_bytes()) for uri in images}
    assert abs(direct[files[0]].score - direct[files[3]].score) > 20 * tolerance
    actor = ScoreActor(fast_scorer.config, fast_scorer.model_id)
    for order in (files, files[::-1]):
        out = actor(prepare_batch(fetch_batch(_batch(order), allowlist=EVERYWHERE), fast_scorer.config))
        assert out.num_rows == 4 and out.column("uri").to_pylist() == order
        rows = {r["uri"]: r for r in out.to_pylist()}
        for uri, expected in direct.items():
            assert rows[uri]["status"] == "ok"
            assert rows[uri]["score"] == pytest.approx(expected.score, abs=tolerance), uri
            assert (rows[uri]["width"], rows[uri]["height"]) == (expected.width, expected.height)
        assert [rows[uri]["score"] for uri in (files[1], files[2])] == [None, None]
        assert [rows[uri]["status"] for uri in (files[1], files[2])] == ["error", "error"]


def test_actor_refuses_other_weights_at_its_first_batch(fast_scorer):
    actor = ScoreActor(fast_scorer.config, "dgiqa@something-else")
    with pytest.raises(WeightsChanged, match="weights changed since the job started: the driver checked "
                                             "dgiqa@something-else, this actor read dgiqa@"):
        actor(pa.table({"row_index": [0], "status": ["ok"]}))


def test_a_non_finite_score_is_an_error_row_not_a_score(files, fast_scorer, checkpoints, tmp_path, capsys):
    """Weights holding a NaN give NaN scores: each image becomes an error row (job) or error line (CLI)."""
    from dataclasses import replace

    from safetensors.torch import load_file, save_file

    from pipeline.cli import main as dgiqa
    from pipeline.scoring.scorer import make_scorer

    state = load_file(checkpoints["dgiqa"])
    state["fc.bias"] = torch.full_like(state["fc.bias"], float("nan"))
    save_file(state, tmp_path / "nan.safetensors")
    config = replace(fast_scorer.config, weights=str(tmp_path / "nan.safetensors"))
    scorer = make_scorer(config)
    assert np.isnan(scorer.score_bytes(Path(files[0].removeprefix("file://")).read_bytes()).score)
    actor = ScoreActor(config, scorer.model_id)
    out = actor(prepare_batch(fetch_batch(_batch(files), allowlist=EVERYWHERE), config))
    assert out.column("status").to_pylist() == ["error"] * 4 and out.column("score").null_count == 4
    assert out.column("error")[0].as_py() == "scoring failed: the model gave a non-finite score (nan)"

    image = files[0].removeprefix("file://")
    assert dgiqa(["score", image, "--weights", config.weights, "--depth-weights", str(checkpoints["depth"]),
                  "--crops", "1", "--device", "cpu", "--json"]) == 1
    row = json.loads(capsys.readouterr().out)
    assert row["status"] == "error" and row["score"] is None
    assert row["error"] == "the model gave a non-finite score (nan)"
