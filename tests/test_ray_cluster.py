"""``ray_cluster.yaml``: valid for Ray's own launcher schema, the job API kept private, commands that exist."""

import re
import subprocess
import sys
from pathlib import Path

import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "ray_cluster.yaml"


def test_passes_rays_cluster_config_validation():
    # What `ray up` does first: fill in the provider's defaults (a file inside Ray), then check the schema.
    validate_config(prepare_config(yaml.safe_load(CONFIG.read_text())))


def test_dashboard_and_job_api_listen_on_loopback_only():
    config = yaml.safe_load(CONFIG.read_text())
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
    assert "0.0.0.0" not in CONFIG.read_text()
    assert not any("dashboard" in c for c in config["worker_start_ray_commands"])


def test_head_has_no_gpu_and_gpu_workers_autoscale_from_zero():
    config = yaml.safe_load(CONFIG.read_text())
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"].get("GPU") == 0
    workers = [t for name, t in config["available_node_types"].items() if name != config["head_node_type"]]
    assert workers and all(t["min_workers"] == 0 and t["max_workers"] >= 1 for t in workers)
    assert config["idle_timeout_minutes"] > 0


def test_documented_submit_command_uses_existing_script_and_flags():
    text = CONFIG.read_text()
    command = " ".join(line.lstrip("# ").rstrip("\\ ") for line in text.splitlines()
                       if line.startswith("#") and ("score_bucket.py" in line or line.startswith("#       --")))
    assert "python jobs/score_bucket.py" in command
    flags = set(re.findall(r"(--[a-z][a-z-]+)", command.split("score_bucket.py", 1)[1]))
    help_text = subprocess.run([sys.executable, str(REPO / "jobs" / "score_bucket.py"), "--help"],
                               capture_output=True, text=True, check=True).stdout
    assert flags and {f for f in flags if f not in help_text} == set()


def test_the_validation_has_teeth():
    import pytest

    config = yaml.safe_load(CONFIG.read_text())
    config["max_worker"] = 8  # a typo of max_workers
    with pytest.raises(Exception, match="max_worker"):
        validate_config(prepare_config(config))
