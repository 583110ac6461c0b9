"""Node loss: a head and two worker nodes on this machine (``ray.cluster_utils.Cluster``); one is removed mid-run."""

import json
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import pyarrow.dataset as pads
import pytest
import ray
from ray.cluster_utils import Cluster

from pipeline.batch.job import JobConfig, run_job
from pipeline.batch.stages import ScoreActor
from tests.conftest import _free_port
from tests.test_faults import FAST_JOB, _counts_close, _jpeg

GATE_TIMEOUT_S = 900


@pytest.fixture()
def cluster(s3_server, monkeypatch):
    # Nodes listen on this machine's own address (cluster_utils' nodes must share one); nothing leaves it.
    # Two logical CPUs a worker: after one worker is lost, the other still fits the restarted scoring actor
    # beside the fetch and decode tasks. No dashboard, and every port Ray would take at a fixed number (the
    # dashboard agent's 52365 on each node) is a free one, so another Ray on the machine is never in the way;
    # the other ports are the OS's pick (cluster_utils' default). A Ray temp dir of its own (short: it holds
    # Unix sockets) keeps its sessions and the address file cluster_utils writes, which an address-less
    # ``ray.init()`` on this machine would follow, away from /tmp/ray.
    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    monkeypatch.setenv("RAY_TMPDIR", temp_dir)
    node = {"object_store_memory": 150 * 2**20, "num_cpus": 2}
    cluster = Cluster(initialize_head=True, head_node_args={
        **node, "num_cpus": 0, "include_dashboard": False, "dashboard_agent_listen_port": _free_port()})
    workers = [cluster.add_node(**node, dashboard_agent_listen_port=_free_port()) for _ in range(2)]
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        yield cluster, workers
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


class GatedScoreActor(ScoreActor):
    """The job's scoring actor, except that its third batch waits at a gate the test opens.

    On reaching the gate it writes its node id to ``waiting``; it scores the batch once the file ``gate`` exists.
    An actor started after the gate opened (the replacement on the surviving node) never waits.
    """

    waiting = ""
    gate = ""

    def __call__(self, batch):
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls == 3 and not Path(self.gate).exists():
            Path(self.waiting).write_text(ray.get_runtime_context().get_node_id())
            deadline = time.monotonic() + GATE_TIMEOUT_S
            while not Path(self.gate).exists() and time.monotonic() < deadline:
                time.sleep(0.1)
        return super().__call__(batch)


@pytest.mark.slow
def test_worker_node_removed_mid_run_loses_and_duplicates_nothing(cluster, checkpoints, tmp_path):
    """The worker node that runs the scoring actor is removed while the actor holds a batch; nothing is lost.

    The removal cannot miss the run, however slow or busy the machine: the scoring actor stops at its third
    batch and tells the test (a file with its node id); the test removes that node with no grace, and only then
    opens the gate. Until the gate opens the batch the actor holds is unfinished, so the run cannot end before
    the node is gone, and the node removed is by construction the one hosting the actor. Ray Data then restarts
    the actor on the surviving node and redoes the lost work; the output must still hold each row once.
    No step waits for a set time: every wait is for an event (a file written), with a generous deadline.
    """
    cluster, workers = cluster
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    GatedScoreActor.waiting = str(tmp_path / "actor-waiting")
    GatedScoreActor.gate = str(tmp_path / "gate-open")
    images = tmp_path / "bucket"
    images.mkdir()
    for i in range(12):
        (images / f"{i:02d}.jpg").write_bytes(_jpeg(i))
    output = tmp_path / "out"
    removed: list[str] = []
    problems: list[str] = []

    def remove_the_actors_node_then_open_the_gate():
        try:
            deadline = time.monotonic() + GATE_TIMEOUT_S
            waiting = Path(GatedScoreActor.waiting)
            while not waiting.exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            if not waiting.exists():
                problems.append(f"the scoring actor did not reach the gate in {GATE_TIMEOUT_S}s")
                return
            hosting = waiting.read_text()
            victim = next((w for w in workers if w.node_id == hosting), None)
            if victim is None:
                problems.append(f"the scoring actor runs on node {hosting}, not on a worker node")
                return
            cluster.remove_node(victim, allow_graceful=False)
            removed.append(victim.node_id)
        finally:
            Path(GatedScoreActor.gate).write_text("open")

    killer = threading.Thread(target=remove_the_actors_node_then_open_the_gate, daemon=True)
    killer.start()
    summary = run_job(JobConfig(manifest=str(images), output=str(output), weights=str(checkpoints["dgiqa"]),
                                depth_weights=str(checkpoints["depth"]), run_date="2026-11-22",
                                shard_rows=2, cpus_per_actor=1, actor_class=GatedScoreActor, **FAST_JOB))
    killer.join(timeout=60)
    assert not problems, problems
    assert removed, "no node was removed during the run"
    dead = {n["NodeID"] for n in ray.nodes() if not n["Alive"]}
    assert removed[0] in dead, "Ray does not report the removed node dead"
    assert summary["status_counts"] == {"ok": 12, "error": 0, "rejected": 0}
    table = pads.dataset(str(output), format="parquet", partitioning="hive").to_table()
    _counts_close(table, 12)
    print(f"\nnode loss: removed the worker node hosting the scoring actor while it held a batch; rows in 12, "
          f"rows out {table.num_rows}, duplicates 0, lost 0; summary {json.dumps(summary['status_counts'])}, "
          f"duplicate results dropped {summary['duplicate_results_dropped']}")
