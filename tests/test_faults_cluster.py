"""Node loss: a head and two worker nodes on this machine (``ray.cluster_utils.Cluster``); one is removed mid-run."""

import threading
import time

import pyarrow.dataset as pads
import pytest
import ray
from ray.cluster_utils import Cluster

from pipeline.job import JobConfig, run_job
from tests.test_faults import FAST_JOB, _counts_close, _jpeg


@pytest.fixture()
def cluster(s3_server):
    # Nodes listen on this machine's own address (cluster_utils' nodes must share one); nothing leaves it.
    # Two logical CPUs a worker: after one worker is lost, the other still fits the restarted scoring actor
    # beside the fetch and decode tasks.
    node = {"object_store_memory": 150 * 2**20, "num_cpus": 2}
    cluster = Cluster(initialize_head=True, head_node_args={**node, "num_cpus": 0})  # all work on the workers
    workers = [cluster.add_node(**node) for _ in range(2)]
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        yield cluster, workers
    finally:
        ray.shutdown()
        cluster.shutdown()


def _actor_nodes() -> set[str]:
    from ray.util.state import list_actors

    return {a.node_id for a in list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
            if "ScoreActor" in (a.class_name or "")}


@pytest.mark.slow
def test_worker_node_removed_mid_run_loses_and_duplicates_nothing(cluster, checkpoints, tmp_path):
    cluster, workers = cluster
    images = tmp_path / "bucket"
    images.mkdir()
    for i in range(12):
        (images / f"{i:02d}.jpg").write_bytes(_jpeg(i))
    output = tmp_path / "out"
    removed = []

    def remove_a_node_mid_run():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not list(output.glob("_staging/*/shard-*.parquet")):
            time.sleep(0.2)
        hosting = _actor_nodes()
        victim = next((w for w in workers if w.node_id in hosting), workers[0])
        cluster.remove_node(victim, allow_graceful=False)
        removed.append((victim.node_id, victim.node_id in hosting))

    killer = threading.Thread(target=remove_a_node_mid_run, daemon=True)
    killer.start()
    summary = run_job(JobConfig(manifest=str(images), output=str(output), weights=str(checkpoints["dgiqa"]),
                                depth_weights=str(checkpoints["depth"]), run_date="2026-11-22",
                                shard_rows=2, cpus_per_actor=1, **FAST_JOB))
    killer.join(timeout=5)
    assert removed, "no node was removed during the run"
    assert removed[0][1], "the removed node was not running the scoring actor"
    assert summary["status_counts"] == {"ok": 12, "error": 0, "rejected": 0}
    table = pads.dataset(str(output), format="parquet", partitioning="hive").to_table()
    _counts_close(table, 12)
    print(f"\nnode loss: removed a worker node ({'hosting' if removed[0][1] else 'not hosting'} the scoring actor)"
          f" mid-run; rows in 12, rows out {table.num_rows}, duplicates 0, lost 0")
