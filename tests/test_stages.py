"""The Ray Data stages called directly: every row in gives one row out, failures as rows."""

import numpy as np
import pyarrow as pa
import pytest

from pipeline.preprocess import PreparedImage, decode_image, prepare_image
from pipeline.stages import ScoreActor, _unpack, fetch_batch, prepare_batch
from tests.conftest import FAST


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
    out = fetch_batch(_batch(files, ["ok", "ok", "ok", "rejected"]))
    assert out.column("row_index").to_pylist() == [0, 1, 2, 3]
    assert out.column("status").to_pylist() == ["ok", "error", "ok", "rejected"]
    assert "object not found" in out.column("error")[1].as_py()
    data = out.column("data").to_pylist()
    assert data[0] and data[2] and data[1] is None
    assert data[3] is None  # a rejected row is never read


def test_prepare_round_trips_the_arrays(files, fast_scorer):
    out = prepare_batch(fetch_batch(_batch(files)), fast_scorer.config)
    assert out.column("status").to_pylist() == ["ok", "error", "error", "ok"]
    assert "truncated or corrupt" in out.column("error")[2].as_py()
    row = out.slice(0, 1).to_pylist()[0]
    expected = prepare_image(decode_image(open(files[0].removeprefix("file://"), "rb").read(), FAST), FAST)
    got = _unpack(row, PreparedImage)
    assert np.array_equal(got.rgb_small, expected.rgb_small)
    assert np.array_equal(got.depth_input.numpy(), expected.depth_input.numpy())
    assert (got.height, got.width) == (expected.height, expected.width)


def test_actor_scores_equal_the_cli_scorer(files, fast_scorer):
    actor = ScoreActor(fast_scorer.config, fast_scorer.model_id)
    out = actor(prepare_batch(fetch_batch(_batch(files)), fast_scorer.config))
    assert out.num_rows == 4 and out.column("status").to_pylist() == ["ok", "error", "error", "ok"]
    for i in (0, 3):
        expected = fast_scorer.score_bytes(open(files[i].removeprefix("file://"), "rb").read())
        assert out.column("score")[i].as_py() == pytest.approx(expected.score, abs=1e-5)
        assert out.column("width")[i].as_py() == expected.width
    assert out.column("score")[1].as_py() is None


def test_actor_refuses_other_weights(fast_scorer):
    with pytest.raises(RuntimeError, match="weights changed since the job started"):
        ScoreActor(fast_scorer.config, "dgiqa@something-else")
