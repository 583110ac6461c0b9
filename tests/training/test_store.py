"""The run store's files on a local disk and in a bucket: streamed saves, their hashes, and failed saves."""

from __future__ import annotations

import hashlib

import pytest
import torch

from pipeline.training.store import STATE_FORMAT, RunStore


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path) -> tuple[RunStore, object]:
    """A run folder on the local disk or in a bucket on the test's S3 server, and its file system."""
    if request.param == "local":
        import fsspec

        return RunStore(str(tmp_path / "run")), fsspec.filesystem("file")
    fs, options = request.getfixturevalue("s3")
    fs.mkdir("runs")
    return RunStore("s3://runs/trial/split_0", options), fs


def _path(store: RunStore, name: str) -> str:
    return store.uri(name).removeprefix("s3://")


def test_weights_are_streamed_whole_and_hashed_as_stored(store):
    """Larger than one upload part (s3fs's 50 MiB blocks), so a bucket receives it in several parts."""
    run, fs = store
    weights = {"w": torch.randn(3, 1024, 1024, 5)}  # 60 MiB
    sha256 = run.write_weights("last", weights, {"epoch": 1})
    stored = fs.cat_file(_path(run, "last.pth"))
    assert len(stored) > 60 * 2**20 and sha256 == hashlib.sha256(stored).hexdigest()
    assert run.read_json("last.json")["sha256"] == sha256
    state = {"format": STATE_FORMAT, "epoch": 3, "model": weights}
    run.write_state(state)
    assert torch.equal(run.read_state()["model"]["w"], weights["w"]) and run.read_state()["epoch"] == 3


def test_a_save_that_fails_leaves_the_committed_state_and_no_partial_file(store):
    """torch.save ends its archive even when pickling fails; committed, those bytes would replace the state."""
    run, fs = store
    run.write_state({"format": STATE_FORMAT, "epoch": 1, "model": {"w": torch.ones(4)}})
    before = fs.cat_file(_path(run, "train_state.pt"))
    with pytest.raises(Exception, match="pickle"):
        run.write_state({"format": STATE_FORMAT, "epoch": 2, "model": {"w": torch.zeros(4)}, "bad": lambda: 0})
    assert fs.cat_file(_path(run, "train_state.pt")) == before and run.read_state()["epoch"] == 1
    fs.invalidate_cache()
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(_path(run, ""), detail=False)) == ["train_state.pt"]
