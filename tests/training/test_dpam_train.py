"""``dgiqa train --model dpam`` end to end on a local Ray (CPU): killed after its first epoch, resumed, scored.

One run is shared by the module: ``jobs/train.py --model dpam`` as a subprocess, SIGKILLed with the Ray it
started once epoch 1 is committed, then the same command to the end in this process. The full-size DPAM-IQA
(172 M parameters) on a CPU: a small set (three scenes at two distortion levels, a corrupt and a missing file;
one scene trained, two held out), the ViT frozen, the authors' learning rate, one step of two images an epoch.
"""

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from PIL import Image
from safetensors.torch import load_file

from pipeline.analysis.metrics import srocc
from pipeline.models.dpam import VIT_FEATURE_BLOCKS
from pipeline.scoring.sample import write_random_dpam
from pipeline.training.config import DpamRecipe, dpam_config_from_args
from tests.conftest import SKIMAGE_DATA, read_layout
from tests.training.test_train import FAST_RAY_TRAIN, _distort

REPO = Path(__file__).resolve().parents[2]
JOB = REPO / "jobs" / "train.py"
SCENES = ["astronaut.png", "chelsea.png", "coffee.png"]
EPOCHS = 2


def write_set(folder: Path) -> Path:
    """Three scenes noisy at levels 0 and 2 (labels 1 and 1/3), grouped by scene; a corrupt and a missing file."""
    images = folder / "images"
    images.mkdir(parents=True)
    rows = ["uri,mos,group"]
    for k, name in enumerate(SCENES):
        window = Image.open(SKIMAGE_DATA / name).convert("RGB").resize((320, 240), Image.BICUBIC)
        for level in (0, 2):
            path = images / f"{Path(name).stem}_noise{level}.png"
            _distort(window, "noise", level, seed=k).save(path)
            rows.append(f"images/{path.name},{1 - level / 3},{Path(name).stem}")
    (images / "corrupt.png").write_bytes(path.read_bytes()[:300])
    rows += ["images/corrupt.png,0.5,", "images/missing.png,0.5,"]
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    return folder / "labels.csv"


def _args(labels: Path, output: Path, init: str) -> list[str]:
    return [str(labels), "--model", "dpam", "--images-prefix", str(labels.parent), "--output", str(output),
            "--init", init, "--epochs", str(EPOCHS), "--batch-size", "2", "--t-max", "1",
            "--val-fraction", "0.5", "--seed", "1", "--freeze-backbones", "--loader-workers", "0",
            "--depth-actors", "0", "--ray-storage", str(output.parent / "ray_runs")]


@pytest.fixture(scope="module")
def local_ray():
    with pytest.MonkeyPatch.context() as patch:
        for key, value in FAST_RAY_TRAIN.items():
            patch.setenv(key, value)
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 _node_ip_address="127.0.0.1")
        yield
        ray.shutdown()


@pytest.fixture(scope="module")
def run(local_ray, tmp_path_factory):
    from jobs.train import main

    folder = tmp_path_factory.mktemp("dpam_train")
    labels = write_set(folder / "data")
    init = folder / "init.pth"
    # The parity tests' weights (default ones score every image alike: their score head's ReLU is shut), saved in the
    # authors' layout as their training script saves it.
    torch.save(load_file(str(write_random_dpam(folder / "init.safetensors"))), init)
    output = folder / "out"
    args = _args(labels, output, f"dpam:{init}")
    env = {**os.environ, **FAST_RAY_TRAIN, "RAY_ADDRESS": "local", "PYTHONPATH": str(REPO)}
    killed = subprocess.Popen([sys.executable, str(JOB), *args], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 1800  # ends a hung run only; the kill waits for the event below
    while not (output / "last.pth").exists():
        assert killed.poll() is None, killed.stdout.read().decode()[-3000:]
        assert time.monotonic() < deadline, "no epoch finished in 30 minutes"
        time.sleep(0.2)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait(timeout=60)
    committed = torch.load(output / "train_state.pt", weights_only=True)
    cache = {p: p.stat().st_mtime_ns for p in (labels.parent / "superpixel_cache").rglob("*.npy")}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(args) == 0
    return {"summary": json.loads(printed.getvalue()), "output": output, "labels": labels, "init": init,
            "committed": committed, "cache": cache, "args": args}


def _metrics(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def test_the_defaults_are_the_authors_recipe():
    recipe = DpamRecipe(init="random")
    assert (recipe.epochs, recipe.batch_size, recipe.lr, recipe.weight_decay, recipe.t_max, recipe.flip_prob) == (
        200, 12, 1e-5, 1e-5, 50, 0.7)
    from jobs.train import build_parser

    config = dpam_config_from_args(build_parser().parse_args(["l.csv", "--model", "dpam", "--output", "o",
                                                              "--init", "random"]))
    assert config.recipe == recipe and config.recipe.trained_on == "livec"


@pytest.mark.parametrize(("extra", "message"), [
    (["--depth-weights", "d.pth"], "--depth-weights is not used by dgiqa train --model dpam"),
    (["--consistency-weight", "0.1"], "--consistency-weight is not used by dgiqa train --model dpam"),
    (["--init", "swin:x.pth"], "--init for --model dpam must be dpam:URI, vit:URI or random"),
])
def test_options_of_the_other_trainer_are_refused_in_one_line(extra, message, capsys):
    from jobs.train import main

    assert main(["l.csv", "--model", "dpam", "--output", "o", "--init", "random", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_a_killed_run_resumes_after_its_last_finished_epoch_and_reuses_the_features(run):
    assert run["committed"]["epoch"] == 1
    log = _metrics(run["output"])
    assert [r["epoch"] for r in log] == list(range(EPOCHS + 1))
    for before, after in zip(run["committed"]["history"], log, strict=False):
        assert {k: v for k, v in after.items() if k != "label_map"} == before  # epochs 0 and 1 not run again
    split = run["summary"]["splits"][0]
    assert split["resumed_after_epoch"] == 1 and split["epochs_done"] == EPOCHS
    assert run["cache"] and {p: p.stat().st_mtime_ns for p in run["cache"]} == run["cache"]
    assert run["summary"]["superpixel_cache"]["reused"] == 6


def test_bad_images_are_skipped_and_held_out_scenes_are_unseen(run):
    images = run["summary"]["images"]
    assert (images["labelled"], images["usable"], images["skipped"]) == (8, 6, 2)
    assert sum(images["skipped_reasons"].values()) == 2
    split = run["summary"]["splits"][0]
    assert (split["train_images"], split["val_images"]) == (2, 4)  # whole scenes: both levels of each


def test_the_cosine_steps_every_batch(run):
    """One step an epoch with --t-max 1: the rate is at its top (the authors' 1e-5) for epoch 1 and at 0 after its
    one step, as the authors' per-batch schedule has it (a per-epoch cosine over 2 epochs would be at 5e-6)."""
    log = _metrics(run["output"])
    assert [r["lr"] for r in log[1:]] == pytest.approx([1e-5, 0.0], abs=1e-15)
    assert all(r["val_srocc"] is not None for r in log)  # the held-out scores never all tie


def test_checkpoints_are_the_authors_layout_and_score_the_held_out_images_as_logged(run, capsys):
    from pipeline.cli import main

    output = run["output"]
    best = torch.load(output / "best.pth", weights_only=True)
    assert {k: tuple(v.shape) for k, v in best.items()} == {k: s for k, (s, _) in read_layout("dpam").items()}
    init = torch.load(run["init"], weights_only=True)
    vit = [k for k in best if k.startswith("vit.")]
    assert all(torch.equal(best[k], init[k]) for k in vit)  # --freeze-backbones: the ViT is the init's
    assert not torch.equal(best["fc_score.0.weight"], init["fc_score.0.weight"])  # the rest trained
    tail = f"vit.blocks.{VIT_FEATURE_BLOCKS[-1] + 1}."
    assert any(k.startswith(tail) for k in vit)

    sidecar = json.loads((output / "best.json").read_text())
    assert sidecar["model"] == "dpam" and sidecar["init"]["kind"] == "dpam"
    labels = [line.split(",") for line in run["labels"].read_text().splitlines()[1:7]]
    targets = {Path(uri).name: float(mos) for uri, mos, _ in labels}
    split = run["summary"]["splits"][0]
    held_out = _held_out_names(run)
    capsys.readouterr()
    paths = [str(run["labels"].parent / "images" / name) for name in held_out]
    assert main(["score", *paths, "--model", "dpam", "--weights", str(output / "best.pth"), "--device", "cpu",
                 "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    scores = [row["score"] for row in rows]
    assert srocc(scores, [targets[name] for name in held_out]) == pytest.approx(split["best"]["val_srocc"], abs=1e-6)


def _held_out_names(run) -> list[str]:
    """The held-out images in label-file order (as the run lists them), from the run's grouped split."""
    from pipeline.analysis.labels import read_labels
    from pipeline.training.train_data import split_indices

    labels = read_labels(str(run["labels"]), "generic", str(run["labels"].parent))
    _, val = split_indices(len(labels), 0.5, 1, labels.groups)  # --seed 1: two scenes held out
    uris = labels.table.column("uri").to_pylist()
    return [Path(uris[i]).name for i in val if Path(uris[i]).exists() and "corrupt" not in uris[i]]


def test_the_scene_split_is_by_group(run):
    names = _held_out_names(run)
    scenes = {name.rsplit("_", 1)[0] for name in names}
    assert len(names) == 2 * len(scenes) and np.all([f"{s}_noise0.png" in names for s in scenes])
