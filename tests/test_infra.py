"""Deployment files: they parse, match their schemas, keep the job API private, and name commands that exist."""

import configparser
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "ray_cluster.yaml"
RAYCLUSTER = REPO / "infra" / "kuberay" / "raycluster.yaml"
CRONJOB = REPO / "infra" / "kuberay" / "nightly-cronjob.yaml"
SERVICE = REPO / "infra" / "systemd" / "dgiqa-nightly.service"
TIMER = REPO / "infra" / "systemd" / "dgiqa-nightly.timer"
DOCKERFILE = REPO / "infra" / "Dockerfile"


@pytest.fixture(scope="module")
def job_options() -> set[str]:
    """Every option string the job's parser accepts, read from the parser (exact names, not help text).

    The script's ``--help`` must also run, and show each of them as a whole word.
    """
    from jobs.score_bucket import build_parser

    options = {o for action in build_parser()._actions for o in action.option_strings if o.startswith("--")}
    help_text = subprocess.run([sys.executable, str(REPO / "jobs" / "score_bucket.py"), "--help"],
                               capture_output=True, text=True, check=True).stdout
    assert {o for o in options if not _names_flag(help_text, o)} == set()
    return options


def _names_flag(text: str, flag: str) -> bool:
    """``flag`` appears in ``text`` as a whole option name: ``--depth`` is not found in ``--depth-weights``."""
    return re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text) is not None


def test_flag_checks_match_whole_option_names(job_options):
    assert "--depth-weights" in job_options and "--depth" not in job_options
    assert _names_flag("  --depth-weights URI", "--depth-weights")
    assert not _names_flag("  --depth-weights URI", "--depth") and not _names_flag("--no-depth", "--depth")


def _job_flags(command: str) -> set[str]:
    assert "python jobs/score_bucket.py" in command, command
    return set(re.findall(r"(--[a-z][a-z-]+)", command.split("jobs/score_bucket.py", 1)[1]))


def _unit(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str
    parser.read(path)
    return parser


# ray_cluster.yaml (Ray cluster launcher)

def test_cluster_launcher_config_passes_rays_validation():
    # What `ray up` does first: fill in the provider's defaults (a file inside Ray), then check the schema.
    validate_config(prepare_config(yaml.safe_load(CLUSTER.read_text())))


def test_the_validation_has_teeth():
    config = yaml.safe_load(CLUSTER.read_text())
    config["max_worker"] = 8  # a typo of max_workers
    with pytest.raises(Exception, match="max_worker"):
        validate_config(prepare_config(config))


def test_launcher_dashboard_and_job_api_listen_on_loopback_only():
    config = yaml.safe_load(CLUSTER.read_text())
    assert "--dashboard-host=127.0.0.1" in " ".join(config["head_start_ray_commands"])
    assert "0.0.0.0" not in CLUSTER.read_text()
    assert not any("dashboard" in c for c in config["worker_start_ray_commands"])


def test_launcher_head_has_no_gpu_and_gpu_workers_autoscale_from_zero():
    config = yaml.safe_load(CLUSTER.read_text())
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"].get("GPU") == 0
    workers = [t for name, t in config["available_node_types"].items() if name != config["head_node_type"]]
    assert workers and all(t["min_workers"] == 0 and t["max_workers"] >= 1 for t in workers)
    assert config["idle_timeout_minutes"] > 0


# Kubernetes (KubeRay RayCluster, CronJob)

def test_kubernetes_objects_have_their_required_fields():
    for path, kind, api in ((RAYCLUSTER, "RayCluster", "ray.io/v1"), (CRONJOB, "CronJob", "batch/v1")):
        docs = list(yaml.safe_load_all(path.read_text()))
        assert len(docs) == 1 and docs[0]["kind"] == kind and docs[0]["apiVersion"] == api
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", docs[0]["metadata"]["name"])
        assert isinstance(docs[0]["spec"], dict)


def test_raycluster_has_a_cpu_head_autoscaling_gpu_workers_and_a_private_job_api():
    spec = yaml.safe_load(RAYCLUSTER.read_text())["spec"]
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"  # no LoadBalancer/NodePort: cluster-internal
    assert spec["enableInTreeAutoscaling"] is True
    for container in head["template"]["spec"]["containers"]:
        assert "nvidia.com/gpu" not in container["resources"].get("limits", {})
    for group in spec["workerGroupSpecs"]:
        assert group["minReplicas"] == 0 < group["maxReplicas"]
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert limits["nvidia.com/gpu"] == "1"


def test_cronjob_submits_the_job_nightly_with_the_date_partition(job_options):
    spec = yaml.safe_load(CRONJOB.read_text())["spec"]
    assert len(spec["schedule"].split()) == 5 and spec["concurrencyPolicy"] == "Forbid"
    pod = spec["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["restartPolicy"] in ("Never", "OnFailure")
    command = " ".join(pod["containers"][0]["args"])
    assert command.startswith("ray job submit --address http://dgiqa-head-svc:8265")
    assert '--run-date "$(date -u +%Y-%m-%d)"' in command
    flags = _job_flags(command)
    assert {"--manifest", "--output", "--weights", "--depth-weights", "--run-date"} <= flags
    assert flags - job_options == set()


# systemd (hosts without Kubernetes)

def test_systemd_units_run_the_job_nightly(job_options):
    service, timer = _unit(SERVICE), _unit(TIMER)
    assert service["Service"]["Type"] == "oneshot" and service["Service"]["User"] != "root"
    command = shlex.split(service["Service"]["ExecStart"])[-1].replace("%%", "%")
    assert command.startswith("ray job submit --address http://127.0.0.1:8265")
    assert _job_flags(command) - job_options == set()
    assert timer["Timer"]["OnCalendar"].endswith("02:00:00 UTC") and timer["Install"]["WantedBy"] == "timers.target"


# Commands written in the files exist; the image installs what pyproject.toml pins; no secrets anywhere

def test_launcher_documented_submit_command_uses_existing_flags(job_options):
    lines = [line.lstrip("# ").rstrip("\\ ") for line in CLUSTER.read_text().splitlines()
             if line.startswith("#") and ("score_bucket.py" in line or line.startswith("#       --"))]
    flags = _job_flags(" ".join(lines))
    assert flags and flags - job_options == set()


def test_container_installs_the_package_as_a_non_root_user():
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM nvidia/cuda:\S+", text, re.M)
    # The dependency set of pyproject.toml, nothing else, at the locked versions.
    assert re.search(r'^RUN .*pip install -c requirements\.lock "\.\[dpiqa\]"$', text, re.M)  # with DP-IQA's extra
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0")
    assert not re.search(r"pip install[^\n]*\s-r\s", text)  # no second, drifting dependency list
    for needed in ("pyproject.toml", "pipeline", "jobs"):
        assert re.search(rf"^COPY .*\b{needed}\b", text, re.M), needed


@pytest.mark.parametrize("path", [CLUSTER, RAYCLUSTER, CRONJOB, SERVICE, TIMER, DOCKERFILE])
def test_no_secrets_in_deployment_files(path):
    text = path.read_text()
    assert not re.search(r"AKIA[0-9A-Z]{16}", text)
    assert not re.search(r"(?i)(secret_access_key|password|token)\s*[:=]", text)


def test_lock_pins_every_dependency_of_pyproject_within_its_range():
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    lock = {}
    for line in (REPO / "infra" / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            lock[canonicalize_name(name)] = version
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in map(Requirement, deps):
        version = lock.get(canonicalize_name(dep.name))
        assert version is not None, f"{dep.name} is not in requirements.lock"
        assert dep.specifier.contains(version), f"{dep.name}=={version} is outside {dep.specifier}"
