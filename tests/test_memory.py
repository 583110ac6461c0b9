"""Bounded memory: 10,000 images stream through a small object store.

The scoring actor here is a stand-in that reads the prepared arrays and returns their mean brightness as the
score, without the models: the subject is the plan's memory and row accounting, and the real models would
make 10,000 images take hours on this machine. Everything else (manifest listing, fetch, decode, prepare,
shards, commit) is the real job.
"""

import sys

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pytest
import ray
from PIL import Image

from pipeline.batch.job import JobConfig, run_job
from pipeline.batch.output import STATUS_OK
from pipeline.batch.resources import PeakRss
from pipeline.batch.stages import SCORE_COLUMNS, unpack_arrays, with_passthrough

N_IMAGES = 10_000
OBJECT_STORE = 96 * 2**20


class BrightnessActor:
    """Stand-in scorer: the mean of the prepared image, so each row's score is checkable."""

    def __init__(self, config, expected_model_id, num_threads=None):
        self.config = config

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        out = {name: [] for name in SCORE_COLUMNS}
        for row in rows:
            ok = row["status"] == STATUS_OK
            for name in ("row_index", "status", "error", "width", "height"):
                out[name].append(row[name])
            out["score"].append(float(unpack_arrays(row["prepared"])["rgb_small"].mean() / 255) if ok else None)
            out["score_std"].append(0.0 if ok else None)
            out["num_crops"].append(self.config.preprocess.num_crops if ok else None)
        scored = pa.table({name: pa.array(values, SCORE_COLUMNS[name]) for name, values in out.items()})
        return with_passthrough(scored, batch, drop=("prepared",))


@pytest.fixture(scope="module")
def small_ray():
    ray.init(address="local", num_cpus=2, object_store_memory=OBJECT_STORE, include_dashboard=False,
             log_to_driver=False, _node_ip_address="127.0.0.1")
    yield
    ray.shutdown()


def _images(folder, n: int):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        level = int(rng.integers(0, 256))
        Image.new("RGB", (24, 20), (level, level, level)).save(folder / f"{i:05d}.png")


def _run(folder, output, checkpoints) -> tuple[dict, int]:
    with PeakRss() as rss:
        summary = run_job(JobConfig(manifest=str(folder), output=str(output), actor_class=BrightnessActor,
                                    weights=str(checkpoints["dgiqa"]), depth_weights=str(checkpoints["depth"]),
                                    crops=1, depth_input_size=28, batch_size=50, shard_rows=1000, log_every_s=10,
                                    run_date="2026-11-22"))
    return summary, rss.peak


@pytest.mark.slow
def test_ten_thousand_images_stream_in_bounded_memory(small_ray, checkpoints, tmp_path):
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    _images(tmp_path / "small", 200)
    _images(tmp_path / "big", N_IMAGES)
    # The small run pays every fixed cost (reading and checking weights, starting workers); the large one
    # must need little more memory than it, however many images flow.
    _, small_peak = _run(tmp_path / "small", tmp_path / "out-small", checkpoints)
    summary, big_peak = _run(tmp_path / "big", tmp_path / "out", checkpoints)
    growth = big_peak - small_peak
    assert summary["status_counts"] == {"ok": N_IMAGES, "error": 0, "rejected": 0}
    table = pads.dataset(str(tmp_path / "out"), format="parquet", partitioning="hive").to_table()
    assert table.num_rows == N_IMAGES and len(set(table.column("uri").to_pylist())) == N_IMAGES
    # The data that flowed (each row carries a 384 px RGB image, about 0.5 MB) is 50x the object store: it
    # streamed. The driver holds the manifest and one shard of results, not the images.
    flowed = N_IMAGES * 384 * round(384 * 24 / 20) * 3
    assert flowed > 50 * OBJECT_STORE
    assert growth < 150 * 2**20, f"the driver's peak grew by {growth / 2**20:.0f} MiB for 50x the images"
    print(f"\nmemory: {N_IMAGES} images, {flowed / 2**30:.1f} GiB of prepared arrays through a "
          f"{OBJECT_STORE / 2**20:.0f} MiB object store; driver peak RSS {big_peak / 2**20:.0f} MiB vs "
          f"{small_peak / 2**20:.0f} MiB for 200 images")
