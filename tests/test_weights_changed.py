"""Weights replaced under a running job: the run ends fast, one line, nothing committed.

It runs in this module of its own, last: after the run fails, this process's Ray is left with actors Ray Data
is still replacing, and a job started next in the same process saw its actor die.
"""

import sys
import time
from pathlib import Path

import fsspec
import pytest
import ray

from pipeline.batch.job import JobConfig, run_job
from pipeline.batch.output import visible_parquet_files
from pipeline.batch.stages import ScoreActor
from pipeline.scoring.sample import write_random_dgiqa
from pipeline.scoring.weights import WeightsError
from tests.test_faults import FAST_JOB, _jpeg_bucket


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             _node_ip_address="127.0.0.1")
    yield
    ray.shutdown()


class ReplacingScoreActor(ScoreActor):
    """Replaces the weights file with other weights before loading: what an actor sees when someone overwrites
    the checkpoint after the driver checked it (or a node starts late, after a new release was uploaded)."""

    weights = ""

    def __init__(self, config, expected_model_id, num_threads=None):
        write_random_dgiqa(Path(self.weights), seed=7)
        super().__init__(config, expected_model_id, num_threads)


def test_weights_changed_under_the_actors_end_the_run_fast_with_nothing_committed(local_ray, checkpoints,
                                                                                   tmp_path):
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    weights = tmp_path / "dgiqa.safetensors"
    weights.write_bytes(checkpoints["dgiqa"].read_bytes())
    ReplacingScoreActor.weights = str(weights)
    images = _jpeg_bucket(tmp_path / "bucket", 4)
    output = tmp_path / "out"
    started = time.monotonic()
    with pytest.raises(WeightsError) as caught:
        run_job(JobConfig(manifest=str(images), output=str(output), actor_class=ReplacingScoreActor,
                          weights=str(weights), depth_weights=str(checkpoints["depth"]), run_date="2026-11-22",
                          **FAST_JOB))
    took = time.monotonic() - started
    message = str(caught.value)
    assert message.startswith("weights changed since the job started") and "nothing was committed" in message
    assert "\n" not in message  # one line for score_bucket.py to print (it maps WeightsError to exit 2)
    assert took < 60, f"the run took {took:.0f}s to give up"
    assert visible_parquet_files(fsspec.filesystem("file"), str(output)) == []
    print(f"\nweights replaced under the actors: the run ended in {took:.1f}s with: {message}")
