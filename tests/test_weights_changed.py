"""Weights replaced under a running job: the run ends fast, one line, nothing committed.

The job runs in a process of its own with its own local Ray: after such a run fails, Ray Data is still replacing
that process's actors, and a job started next in the same process saw its actor die (after which no Ray could
start there). A process of its own leaves the test process, and every test after it, untouched, in any order.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import fsspec

from pipeline.batch.output import visible_parquet_files
from pipeline.batch.stages import ScoreActor
from pipeline.scoring.sample import write_random_dgiqa
from tests.test_faults import FAST_JOB, _jpeg_bucket

REPO = Path(__file__).resolve().parents[1]


class ReplacingScoreActor(ScoreActor):
    """Replaces the weights file with other weights before loading: what an actor sees when someone overwrites
    the checkpoint after the driver checked it (or a node starts late, after a new release was uploaded)."""

    weights = ""

    def __init__(self, config, expected_model_id, num_threads=None):
        write_random_dgiqa(Path(self.weights), seed=7)
        super().__init__(config, expected_model_id, num_threads)


def run_replacing(weights: str, depth_weights: str, images: str, output: str) -> None:
    """The job with ``ReplacingScoreActor``, on a Ray of this process's own; prints the outcome as JSON."""
    import ray

    from pipeline.batch.job import JobConfig, run_job
    from pipeline.scoring.weights import WeightsError

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ReplacingScoreActor.weights = weights
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             _node_ip_address="127.0.0.1")
    started = time.monotonic()
    try:
        run_job(JobConfig(manifest=images, output=output, actor_class=ReplacingScoreActor, weights=weights,
                          depth_weights=depth_weights, run_date="2026-11-22", **FAST_JOB))
        outcome = {"error": None}
    except WeightsError as exc:
        outcome = {"error": str(exc)}
    outcome["took"] = time.monotonic() - started
    print(json.dumps(outcome), flush=True)
    ray.shutdown()


def test_weights_changed_under_the_actors_end_the_run_fast_with_nothing_committed(checkpoints, tmp_path):
    weights = tmp_path / "dgiqa.safetensors"
    weights.write_bytes(checkpoints["dgiqa"].read_bytes())
    images = _jpeg_bucket(tmp_path / "bucket", 4)
    output = tmp_path / "out"
    code = ("import sys; from tests.test_weights_changed import run_replacing; run_replacing(*sys.argv[1:])")
    env = {**os.environ, "RAY_ADDRESS": "local", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code, str(weights), str(checkpoints["depth"]), str(images),
                           str(output)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Ray prints its own lines ("(raylet) ...") on standard output too: the outcome is the JSON line.
    outcome = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("{")))
    message = outcome["error"]
    assert message is not None, "the run went on with weights other than the ones it checked"
    assert message.startswith("weights changed since the job started") and "nothing was committed" in message
    assert "\n" not in message  # one line for score_bucket.py to print (it maps WeightsError to exit 2)
    assert outcome["took"] < 60, f"the run took {outcome['took']:.0f}s to give up"
    assert visible_parquet_files(fsspec.filesystem("file"), str(output)) == []
    print(f"\nweights replaced under the actors: the run ended in {outcome['took']:.1f}s with: {message}")
