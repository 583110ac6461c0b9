"""Fine-tuning DGIQA with Ray Train on a small synthetic-distortion set cut from real photographs (CPU).

One run is shared by the module: the job script is started as a subprocess, SIGKILLed once its first epoch is
committed, and run again to the end (small depth input, frozen backbones, one crop per held-out image).

The set: eight photographs (each a different scene), each distorted by one kind (blur, noise or JPEG, by scene)
at every level 0..3 and labelled ``1 - level / 3``. The label file's ``group`` column names the scene, so the
split keeps the four versions of a scene together: the held-out images show scenes no training step saw, and
the held-out SROCC measures whether the model learned to rank distortion levels, not whether it remembers scenes.
"""

import contextlib
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import ray
import torch
from PIL import Image, ImageFilter

from pipeline.analysis.labels import LabelError, Labels, read_labels
from pipeline.analysis.metrics import srocc
from pipeline.cli import train as cli_train
from pipeline.models.dgiqa import build_dgiqa
from pipeline.scoring.preprocess import PreprocessConfig
from pipeline.scoring.scorer import Scorer, ScorerConfig
from pipeline.scoring.weights import WeightsError
from pipeline.training.config import TrainConfig, config_from_args
from pipeline.training.init import build_initial_model
from pipeline.training.loop import WorkerPlan, _train_epoch, dgiqa_loss, make_optimizer
from pipeline.training.train import run_training
from pipeline.training.train_data import LabelMap, epoch_order, label_map_for, split_indices
from tests.conftest import SKIMAGE_DATA, read_layout

REPO = Path(__file__).resolve().parents[2]
JOB = REPO / "jobs" / "train_dgiqa.py"
SCENES = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "retina.jpg",
          "hubble_deep_field.jpg", "ihc.png"]
KINDS = ("blur", "noise", "jpeg")
LEVELS = 3
SCENE_LEVELS = range(LEVELS + 1)  # every scene at every level of its distortion
DEPTH_INPUT = 70
EPOCHS = 4


def _distort(image: Image.Image, kind: str, level: int, seed: int) -> Image.Image:
    if level == 0:
        return image
    if kind == "blur":
        return image.filter(ImageFilter.GaussianBlur(1.0 * level))
    if kind == "noise":
        noisy = np.asarray(image, float) + np.random.default_rng(seed).normal(0, 12 * level, (240, 320, 3))
        return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=(40, 15, 5)[level - 1])
    return Image.open(buffer).convert("RGB")


def write_distortion_set(folder: Path) -> Path:
    """Images and a generic CSV (uri,mos,group) with one corrupt and one missing image; returns the CSV.

    The group is the scene (the photograph), so all of a scene's distortion levels land on one side of a split.
    """
    images = folder / "images"
    images.mkdir(parents=True)
    rows = ["uri,mos,group"]
    for k, name in enumerate(SCENES):
        photo = Image.open(SKIMAGE_DATA / name).convert("RGB")
        width, height = photo.size
        crop_w = int(min(width, height * 4 / 3) * 0.8)
        crop_h = crop_w * 3 // 4
        x0, y0 = (width - crop_w) // 2, (height - crop_h) // 2
        window = photo.crop((x0, y0, x0 + crop_w, y0 + crop_h)).resize((320, 240), Image.BICUBIC)
        kind, scene = KINDS[k % len(KINDS)], Path(name).stem
        for level in SCENE_LEVELS:
            path = images / f"{scene}_{kind}{level}.png"
            _distort(window, kind, level, seed=k).save(path)
            rows.append(f"images/{path.name},{1 - level / LEVELS},{scene}")
    (images / "corrupt.png").write_bytes((images / path.name).read_bytes()[:300])
    rows += ["images/corrupt.png,0.5,", "images/missing.png,0.5,"]
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    return folder / "labels.csv"


# Ray Train polls its workers every 2 s and starts a preemption watcher; a test needs neither.
FAST_RAY_TRAIN = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


@pytest.fixture(scope="module")
def local_ray(s3_server):
    """Ray on this machine, started after the S3 server so its workers inherit the test credentials.

    Ray's default (token) authentication, as the other modules' in-process clusters use: a process keeps the
    mode of its first cluster, and a cluster started in another mode cannot reach the driver.
    """
    with pytest.MonkeyPatch.context() as patch:
        for key, value in FAST_RAY_TRAIN.items():
            patch.setenv(key, value)
        # 4 logical CPUs on 2 cores: two workers and two depth actors fit at once.
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
                 _node_ip_address="127.0.0.1")
        yield
        ray.shutdown()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_distortion_set(tmp_path_factory.mktemp("distortions"))


def _job_args(dataset: Path, checkpoints, output: Path, *extra: str) -> list[str]:
    """The shared run: random DGIQA weights, frozen backbones, a small depth input, 1 crop per held-out image.

    lambda 0 halves the cost of a step here; the consistency term is tested on its own. BatchNorm stays on its
    running statistics: with 4 crops a step, train-mode statistics make the held-out ranking swing by epoch.
    """
    return [str(dataset), "--images-prefix", str(dataset.parent), "--output", str(output),
            "--init", f"dgiqa:{checkpoints['dgiqa']}", "--depth-weights", str(checkpoints["depth"]),
            "--depth-input-size", str(DEPTH_INPUT), "--epochs", str(EPOCHS), "--batch-size", "4",
            "--consistency-weight", "0", "--val-crops", "1", "--val-fraction", "0.3", "--seed", "0",
            "--freeze-backbones", "--freeze-bn", "--loader-workers", "0",
            "--ray-storage", str(output.parent / "ray_runs"), *extra]


def _config(*args) -> TrainConfig:
    from jobs.train import build_parser

    return config_from_args(build_parser().parse_args(_job_args(*args)))


@dataclass
class Run:
    config: TrainConfig
    summary: dict
    output: Path
    committed: dict  # the training state the killed attempt had committed
    maps: dict[Path, int]  # the depth maps and their modification times after the killed attempt


@pytest.fixture(scope="module")
def trained(local_ray, dataset, checkpoints, tmp_path_factory) -> Run:
    """The job script as a subprocess with its own local Ray, SIGKILLed with that Ray once epoch 1 is committed
    (a lost driver and cluster), then the same command to the end on the test's Ray."""
    from jobs.train import main

    output = tmp_path_factory.mktemp("run") / "out"
    args = _job_args(dataset, checkpoints, output)
    env = {**os.environ, **FAST_RAY_TRAIN, "RAY_ADDRESS": "local", "PYTHONPATH": str(REPO)}
    killed = subprocess.Popen([sys.executable, str(JOB), *args], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, start_new_session=True)
    # The kill waits for the event (epoch 1's weights, written after its commit), not for a time; the deadline only
    # ends a hung run, and is generous for a busy 2-core machine.
    deadline = time.monotonic() + 1800
    while not (output / "last.pth").exists():
        assert killed.poll() is None, killed.stdout.read().decode()[-3000:]
        assert time.monotonic() < deadline, "no epoch finished in 30 minutes"
        time.sleep(0.2)
    os.killpg(killed.pid, signal.SIGKILL)  # the job script's driver and the Ray it started
    killed.wait(timeout=60)
    committed = torch.load(output / "train_state.pt", weights_only=True)
    maps = {p: p.stat().st_mtime_ns for p in (dataset.parent / "depth_cache").rglob("*.png")}

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(args) == 0  # in this process, joined to the same Ray
    return Run(_config(dataset, checkpoints, output), json.loads(printed.getvalue()), output, committed, maps)


def _metrics(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def _split(config: TrainConfig) -> tuple[Labels, np.ndarray, np.ndarray]:
    """The run's labels and its (train, val) row indices, as ``run_training`` draws them: grouped by scene."""
    labels = read_labels(config.labels.path, "generic", config.labels.images_prefix)
    return labels, *split_indices(len(labels), config.recipe.val_fraction, config.recipe.seed, labels.groups)


def _usable(uri: str) -> bool:
    return Path(uri).exists() and "corrupt" not in uri


def _held_out(config: TrainConfig) -> tuple[list[str], list[float]]:
    labels, _, val = _split(config)
    uris, targets = labels.table.column("uri").to_pylist(), labels.table.column("label").to_pylist()
    kept = [i for i in val if _usable(uris[i])]
    return [uris[i] for i in kept], [targets[i] for i in kept]


def test_no_held_out_image_shows_a_scene_the_run_trained_on(trained):
    labels, train, val = _split(trained.config)
    uris = labels.table.column("uri").to_pylist()
    assert labels.groups == tuple(Path(u).stem.rsplit("_", 1)[0] for u in uris[:-2]) + (None, None)
    scene = {uri: group for uri, group in zip(uris, labels.groups, strict=True)}
    trained_scenes = {scene[uris[i]] for i in train if _usable(uris[i])}
    held_out_scenes = {scene[uris[i]] for i in val if _usable(uris[i])}
    assert held_out_scenes and trained_scenes and not held_out_scenes & trained_scenes
    # Every usable image of a held-out scene is held out: all its levels, not a sample of them.
    split = trained.summary["splits"][0]
    assert split["val_images"] == len(SCENE_LEVELS) * len(held_out_scenes)
    assert split["train_images"] == len(SCENE_LEVELS) * len(trained_scenes)
    # The run used this split: the held-out SROCC it logged is reproduced on exactly these images
    # (test_training_lowers_the_loss_...), and a crop-level split of the same rows would hold out other counts.
    ungrouped = split_indices(len(labels), trained.config.recipe.val_fraction, trained.config.recipe.seed)[1]
    assert {scene[uris[i]] for i in ungrouped if _usable(uris[i])} & trained_scenes


def test_label_files_name_each_rows_group(tmp_path):
    """The generic layout's optional ``group`` column (an empty cell: a group of its own), KADID-10k's ``ref_img``."""
    generic = tmp_path / "labels.csv"
    generic.write_text("uri,mos,group\na.png,1,7\nb.png,2,\nc.png,3,7\n")
    assert read_labels(str(generic), "generic").groups == ("7", None, "7")
    plain = tmp_path / "plain.csv"
    plain.write_text("uri,mos\na.png,1\nb.png,2\n")
    assert read_labels(str(plain), "generic").groups is None
    kadid = tmp_path / "dmos.csv"
    kadid.write_text("dist_img,ref_img,dmos,var\nI01_01_01.png,I01.png,4.57,0.5\nI02_01_01.png,I02.png,4.3,0.6\n"
                     "I01_01_02.png,I01.png,4.1,0.4\n")
    assert read_labels(str(kadid), "kadid", "/data/kadid").groups == ("I01.png", "I02.png", "I01.png")


def test_the_split_keeps_groups_whole_and_repeats_with_its_seed():
    groups = [f"scene{i // 4}" for i in range(40)] + [None] * 4  # 10 scenes of 4, and 4 rows of no scene
    for seed in range(5):
        train, val = split_indices(44, 0.2, seed, groups)
        assert sorted([*train, *val]) == list(range(44))
        assert not {groups[i] for i in train} & {groups[i] for i in val} - {None}
        assert 9 <= len(val) < 9 + 4  # round(44 * 0.2) = 9, overshot by less than one group
        again = split_indices(44, 0.2, seed, groups)
        assert np.array_equal(again[0], train) and np.array_equal(again[1], val)
    assert not np.array_equal(split_indices(44, 0.2, 0, groups)[1], split_indices(44, 0.2, 1, groups)[1])
    # Without groups the split is the row shuffle it always was, so runs begun before groups existed resume.
    order = np.random.default_rng(4).permutation(10)
    assert np.array_equal(split_indices(10, 0.3, 4)[1], np.sort(order[:3]))
    assert np.array_equal(split_indices(10, 0.3, 4, [None] * 10)[1], np.sort(order[:3]))
    with pytest.raises(ValueError, match=r"5 labelled images \(1 groups\) .* give 0 training and 5 held-out"):
        split_indices(5, 0.5, 0, ["one"] * 5)


def test_a_killed_run_resumes_after_its_last_finished_epoch(trained):
    assert trained.committed["epoch"] == 1 and [r["epoch"] for r in trained.committed["history"]] == [0, 1]
    log = _metrics(trained.output)
    assert [r["epoch"] for r in log] == list(range(EPOCHS + 1))
    for before, after in zip(trained.committed["history"], log, strict=False):
        assert {k: v for k, v in after.items() if k != "label_map"} == before  # epochs 0, 1: not run again
    split = trained.summary["splits"][0]
    assert split["resumed_after_epoch"] == 1 and split["epochs_done"] == EPOCHS and split["trained_now"]
    state = torch.load(trained.output / "train_state.pt", weights_only=True)
    assert state["epoch"] == EPOCHS and state["scheduler"]["last_epoch"] == EPOCHS
    assert [r["epoch"] for r in state["history"]] == list(range(EPOCHS + 1))


def test_training_lowers_the_loss_and_best_pth_ranks_the_held_out_images_as_logged(trained, checkpoints):
    log = _metrics(trained.output)
    assert log[0]["train_loss"] is None and log[0]["label_map"]["rule"].startswith("generic mos: min-max")
    losses = [r["train_loss"] for r in log[1:]]
    assert losses[-1] < losses[0], losses
    assert [r["lr"] for r in log[1:]] == sorted((r["lr"] for r in log[1:]), reverse=True)  # cosine
    split = trained.summary["splits"][0]
    assert split["train_images"] + split["val_images"] == len(SCENES) * len(SCENE_LEVELS) and split["val_images"] >= 8
    assert split["best"]["val_srocc"] >= split["last"]["val_srocc"]

    # The held-out images scored by the product's own scorer (inference protocol, depth model run afresh): best.pth
    # ranks them exactly as the training log says.
    val_uris, targets = _held_out(trained.config)
    fast = PreprocessConfig(num_crops=1, depth_input_size=DEPTH_INPUT)
    scorer = Scorer(ScorerConfig(weights=str(trained.output / "best.pth"), depth_weights=str(checkpoints["depth"]),
                                 device="cpu", preprocess=fast))
    scores = [scorer.score_bytes(Path(uri).read_bytes()).score for uri in val_uris]
    assert len(scores) == split["val_images"]
    assert srocc(scores, targets) == pytest.approx(split["best"]["val_srocc"], abs=1e-6)


@pytest.mark.xfail(strict=True, reason="on scenes it never saw, 4 CPU epochs from the test's spread random weights "
                                       "do not learn to rank distortions (measured: held-out SROCC -0.02 untrained, "
                                       "-0.24 and -0.45 after 4 epochs in two runs); the bar is kept (issue #15)")
def test_training_beats_the_untrained_model_on_held_out_scenes(trained):
    """The trained model ranks unseen scenes' distortion levels well; the untrained one does not.

    The bar (SROCC above 0.5 and 0.5 above the untrained model's), judged after the cosine has cooled down rather
    than at a lucky epoch, is one that neither the untrained model nor one trained on shuffled labels can clear by
    remembering scenes, since no held-out scene was trained on. A run on shuffled labels is not made: the module's
    one run (killed and resumed) takes about 10 minutes on a busy 2-core machine (45-70 s an epoch), and a second
    would double that.

    Marked as a strict expected failure: since the split holds out whole scenes, the short CPU run does not reach
    the bar (before, it was reached on held-out crops of trained scenes). Strict, so the mark must go once a
    recipe or data set that generalises makes it pass.
    """
    split = trained.summary["splits"][0]
    assert split["last"]["val_srocc"] > max(0.5, split["baseline"]["val_srocc"] + 0.5), _metrics(trained.output)


def test_checkpoints_are_published_layout_state_dicts_that_dgiqa_score_loads(trained, checkpoints, capsys):
    from pipeline.cli import main

    output = trained.output
    best = torch.load(output / "best.pth", weights_only=True)
    assert {k: tuple(v.shape) for k, v in best.items()} == {k: shape for k, (shape, _) in read_layout("dgiqa").items()}
    sidecar = json.loads((output / "best.json").read_text())
    assert sidecar["sha256"] == hashlib.sha256((output / "best.pth").read_bytes()).hexdigest()
    assert sidecar["epoch"] == trained.summary["splits"][0]["best"]["epoch"]
    assert sidecar["label_map"]["lo"] == 0 and sidecar["label_map"]["hi"] == 1
    assert sidecar["init"]["kind"] == "dgiqa" and sidecar["depth_model"].startswith("depth-anything-v1-vits@")
    assert json.loads((output / "last.json").read_text())["epoch"] == EPOCHS
    image = next((Path(trained.summary["labels"]).parent / "images").glob("astronaut_*0.png"))
    capsys.readouterr()
    assert main(["score", str(image), "--weights", str(output / "best.pth"), "--depth-weights",
                 str(checkpoints["depth"]), "--crops", "1", "--device", "cpu", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["status"] == "ok" and 0 < row["score"] < 1


def test_unreadable_images_are_skipped_and_counted(trained):
    images = trained.summary["images"]
    reasons = images.pop("skipped_reasons")
    assert images == {"labelled": 34, "usable": 32, "skipped": 2}
    # Causes as the job's summary and the report count them (pipeline.batch.error_reasons).
    assert reasons.pop("no such file or object: <uri>") == 1
    [(corrupt, count)] = reasons.items()
    assert corrupt.startswith("truncated or corrupt image data") and count == 1
    # By default images may be read from the --images-prefix only, at most 256 MiB each.
    assert trained.summary["allowed_prefixes"] == [f"file://{trained.config.labels.images_prefix}/"]
    assert trained.summary["max_bytes"] == 256 * 2**20 and trained.summary["depth_cache"]["rejected"] == 0


def test_depth_maps_are_computed_once_and_reused_by_reruns(trained):
    assert len(trained.maps) == 32  # written by the killed attempt
    resumed = trained.summary["depth_cache"]
    assert resumed["computed"] == 0 and resumed["reused"] == 32 and resumed["depth_forward_passes"] == 0
    assert Path(resumed["folder"]).is_relative_to(Path(trained.config.labels.path).parent / "depth_cache")

    again = run_training(trained.config)  # every epoch done: nothing to train, no map to compute
    assert again["depth_cache"]["computed"] == 0 and again["depth_cache"]["depth_forward_passes"] == 0
    assert {p: p.stat().st_mtime_ns for p in trained.maps} == trained.maps
    assert again["splits"][0]["trained_now"] is False and again["splits"][0]["resumed_after_epoch"] == EPOCHS
    assert again["splits"][0]["best"] == trained.summary["splits"][0]["best"]


def test_an_output_holding_other_settings_is_refused(trained, dataset, checkpoints):
    with pytest.raises(ValueError, match=r"other settings \(changed: recipe.lr\)"):
        run_training(_config(dataset, checkpoints, trained.output, "--lr", "1e-3"))


def test_a_step_scores_mirrored_crops_and_leaves_frozen_backbones_alone(trained):
    from dataclasses import replace

    from pipeline.batch.allowlist import Allowlist
    from pipeline.training.train_data import DepthCache, DepthMapper, ImageAccess

    config = trained.config
    recipe = replace(config.recipe, consistency_weight=0.1, batch_size=2)
    uris, targets = _held_out(config)
    cache = DepthCache(config.cache_root, trained.summary["depth_model"], recipe.preprocess())
    access = ImageAccess(Allowlist([config.labels.images_prefix]))
    found = DepthMapper(weights=None, cache=cache, access=access).run(uris[:2])  # cached: no depth model needed
    assert [r["status"] for r in found] == ["cached", "cached"]
    items = [(r["uri"], t, r["depth_path"]) for r, t in zip(found, targets, strict=False)]
    model = build_dgiqa()
    model.load_state_dict(torch.load(trained.output / "last.pth", weights_only=True))
    optimizer, _ = make_optimizer(model, recipe)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = WorkerPlan(folder="unused", split=0, recipe=recipe, train_items=items, val_items=[], label_map={},
                      settings={}, sidecar={}, resources=config.resources, access=access)
    result = _train_epoch(model, model, optimizer, plan, epoch=1, rank=0, world=1, device=torch.device("cpu"))
    assert result["train_crops"] == 2 and result["train_consistency"] > 0
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith(("backbone.", "depth_backbone.")))
    assert not torch.equal(before["fc.weight"], after["fc.weight"])


def test_swin_init_loads_an_imagenet_classifier_into_both_branches(tmp_path, checkpoints):
    import timm

    torch.manual_seed(3)
    classifier = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False)
    path = tmp_path / "swin_tiny.pth"
    torch.save({"model": classifier.state_dict()}, path)
    model, info = build_initial_model(f"swin:{path}")
    assert info["dropped_keys"] == ["head.fc.bias", "head.fc.weight", "norm.bias", "norm.weight"]
    source = classifier.state_dict()
    for branch in (model.backbone, model.depth_backbone):
        for key, value in branch.state_dict().items():
            assert torch.equal(value, source[key.replace("layers_", "layers.", 1)]), key
    assert build_initial_model(f"swin:{path}", materialize=False)[1]["sha256"] == info["sha256"]

    with pytest.raises(WeightsError, match=r"Swin-T backbone .* does not fit the model: 169 missing keys: "
                                           r".*unexpected keys: .*backbone\.layers_0"):
        build_initial_model(f"swin:{checkpoints['dgiqa']}", materialize=False)
    with pytest.raises(WeightsError, match="DGIQA .* does not fit the model"):
        build_initial_model(f"dgiqa:{path}", materialize=False)


def _labels(layout: str, column: str, values, higher_is_better=True) -> Labels:
    table = pa.table({"uri": [f"/x/{i}.jpg" for i in range(len(values))], "label": pa.array(values, pa.float64())})
    return Labels(table, higher_is_better, "labels.csv", layout, column)


@pytest.mark.parametrize(("layout", "column", "values", "lo", "hi"), [
    ("koniq", "MOS_zscore", [3.0, 50.0, 88.4], 0, 100),
    ("koniq", "MOS", [1.1, 3.0, 4.3], 1, 5),
    ("kadid", "dmos", [1.0, 2.5, 5.0], 1, 5),
    ("live-challenge", "AllMOS_release", [3.4, 92.4, 40.0], 0, 100),
    ("spaq", "MOS", [0.0, 55.5, 98.0], 0, 100),
    ("generic", "mos", [2.0, 7.0, 4.0], 2, 7),
])
def test_label_maps_follow_the_layout_and_round_trip(layout, column, values, lo, hi):
    label_map = label_map_for(_labels(layout, column, values))
    assert (label_map.lo, label_map.hi) == (lo, hi)
    targets = label_map.normalize(values)
    assert np.all((targets >= 0) & (targets <= 1))
    assert np.allclose(label_map.denormalize(targets), values)
    assert LabelMap.from_dict(json.loads(json.dumps(label_map.to_dict()))) == label_map


def test_label_maps_flip_lower_is_better_and_take_an_explicit_range():
    dmos = label_map_for(_labels("generic", "dmos", [10.0, 30.0, 20.0], higher_is_better=False))
    assert np.allclose(dmos.normalize([10.0, 30.0, 20.0]), [1.0, 0.0, 0.5])
    assert np.allclose(dmos.denormalize([1.0, 0.0, 0.5]), [10.0, 30.0, 20.0])
    fixed = label_map_for(_labels("generic", "mos", [2.0, 3.0]), label_range=(0.0, 10.0))
    assert np.allclose(fixed.normalize([2.0, 3.0]), [0.2, 0.3]) and fixed.rule.startswith("--label-range")
    with pytest.raises(LabelError, match="outside the range 0..100"):
        label_map_for(_labels("koniq", "MOS_zscore", [3.0, 120.0]))
    with pytest.raises(LabelError, match="nothing to learn"):
        label_map_for(_labels("generic", "mos", [4.0, 4.0, 4.0]))


def test_training_crops_cut_image_and_depth_map_at_the_same_place_and_flip_both():
    from pipeline.scoring.preprocess import IMAGENET_MEAN, IMAGENET_STD
    from pipeline.training.train_data import random_crop_pair

    rng = np.random.default_rng(0)
    height, width = 240, 250
    rgb = np.empty((height, width, 3), np.uint8)
    rgb[..., 0] = np.arange(height)[:, None]  # red: the row, blue: the column, green: noise
    rgb[..., 2] = np.arange(width)[None, :]
    rgb[..., 1] = rng.integers(0, 256, (height, width))
    depth = rgb[..., 1].copy()  # a map equal to the green channel: any misalignment or lone flip shows
    flips, corners = set(), set()
    for _ in range(40):
        image, gray = random_crop_pair(rgb, depth, 224, rng)
        assert image.shape == gray.shape == (3, 224, 224)
        pixels = [(image[c] * IMAGENET_STD[c] + IMAGENET_MEAN[c]) * 255 for c in range(3)]
        rows, green, cols = (p.round().numpy().astype(int) for p in pixels)
        for channel in range(3):
            mapped = (gray[channel] * IMAGENET_STD[channel] + IMAGENET_MEAN[channel]) * 255
            assert np.array_equal(mapped.round().numpy().astype(int), green)
        y, x = rows.min(), cols.min()
        flip_v, flip_h = rows[0, 0] > rows[-1, 0], cols[0, 0] > cols[0, -1]
        window = depth[y:y + 224, x:x + 224][::-1 if flip_v else 1, ::-1 if flip_h else 1]
        assert np.array_equal(green, window)
        flips.add((flip_h, flip_v))
        corners.add((y, x))
    assert flips == {(False, False), (False, True), (True, False), (True, True)} and len(corners) > 20


def test_consistency_loss_compares_a_crop_with_its_mirror_and_epochs_split_evenly():
    pred, mirrored, target = torch.tensor([0.2, 0.8]), torch.tensor([0.4, 0.8]), torch.tensor([0.0, 1.0])
    total, mse, consistency = dgiqa_loss(pred, mirrored, target, 0.5)
    assert mse.item() == pytest.approx((0.04 + 0.04) / 2) and consistency.item() == pytest.approx(0.04 / 2)
    assert total.item() == pytest.approx(mse.item() + 0.5 * consistency.item())
    assert dgiqa_loss(pred, None, target, 0.0)[2].item() == 0
    shares = [epoch_order(7, 2, (0, 0, 1), rank, 3) for rank in range(3)]
    seen = np.bincount(sum(shares, []), minlength=7)
    assert {len(s) for s in shares} == {5} and sorted(seen) == [2] * 6 + [3]  # one entry repeats as padding
    assert epoch_order(7, 2, (0, 0, 1), 0, 3) == shares[0] != epoch_order(7, 2, (0, 0, 2), 0, 3)


@pytest.mark.parametrize(("extra", "message"), [
    (["--init", "imagenet"], "--init must be dgiqa:URI, swin:URI or random"),
    (["--init", "random", "--val-fraction", "1.5"], "--val-fraction must be between 0 and 1"),
    (["--init", "random", "--label-range", "5,1"], "--label-range needs LO < HI"),
    (["--init", "random", "--layout", "koniq"], "needs an images prefix"),
    (["--init", "dgiqa:/nonexistent/dgiqa.pth"], "no weights at /nonexistent/dgiqa.pth"),
    (["--init", "random", "--labels-file"], "unrecognized arguments: --labels-file"),
    (["--init", "random", "--max-bytes", "0"], "expected a finite size of at least 1 byte"),
    (["--init", "random", "--max-bytes", "inf"], "expected a finite size of at least 1 byte"),
    (["--init", "random", "--layout", "generic", "--label-column", "score"], "has no column 'score'"),
])
def test_bad_arguments_end_with_one_line_and_exit_2(tmp_path, checkpoints, capsys, extra, message):
    from jobs.train import main

    labels = tmp_path / "labels.csv"
    labels.write_text("uri,mos\n" + "".join(f"{i}.png,{i}\n" for i in range(20)))
    argv = [str(labels), "--output", str(tmp_path / "out"), "--depth-weights", str(checkpoints["depth"]), *extra]
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert [line for line in err.splitlines() if "error:" in line] == [err.strip().splitlines()[-1]]
    assert not (tmp_path / "out").exists()


def test_dgiqa_train_has_the_documented_defaults():
    from pipeline.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["train", "labels.csv", "--output", "out", "--init", "random", "--depth-weights", "d"])
    assert args.run is cli_train.run  # which calls run_command once the arguments are parsed
    config = config_from_args(args)
    assert config.recipe.lr == 1e-4 and config.recipe.epochs == 20 and config.recipe.batch_size == 16
    assert config.recipe.consistency_weight == 0.1 and config.recipe.val_crops == 20
    assert config.recipe.val_fraction == 0.2 and config.splits == 1 and config.cache_root == "depth_cache"
    dgiqa_init = config_from_args(parser.parse_args(["train", "l.csv", "--output", "o", "--init", "dgiqa:w.pth",
                                                     "--depth-weights", "d"]))
    assert dgiqa_init.recipe.lr == 2e-5
    live = config_from_args(parser.parse_args(["train", "s3://b/ChallengeDB_release/", "--layout", "live-challenge",
                                               "--output", "o", "--init", "random", "--depth-weights", "d"]))
    assert live.cache_root == "s3://b/ChallengeDB_release/depth_cache"
    assert config_from_args(parser.parse_args(["train", "s3://b/koniq/koniq10k_scores.csv", "--output", "o",
                                               "--init", "random", "--depth-weights", "d"])).cache_root == \
        "s3://b/koniq/depth_cache"
    help_text = parser._subparsers._group_actions[0].choices["train"].format_help()
    for option in ("--freeze-backbones", "--consistency-weight", "--splits", "--workers", "--gpus", "--label-range",
                   "--depth-cache", "--lower-is-better"):
        assert option in help_text


def test_a_failed_fit_names_each_workers_own_cause_not_only_the_last_line():
    """Ray Train ends the other workers when one dies; their "placement group was removed" must not hide why."""
    from ray.exceptions import OutOfMemoryError
    from ray.train import WorkerGroupError

    from pipeline.training.train import failure_cause

    removed = "The actor is dead because its worker process has died. Destroying worker since its placement group " \
              "was removed."
    error = WorkerGroupError("2 workers failed", {
        2: RuntimeError(removed), 0: OutOfMemoryError("Task was killed.\nMemory on the node was 23.1GB / 24GB."),
        1: RuntimeError(f"Traceback ...\n  {removed}"),
    })
    assert failure_cause(error) == f"worker 0: Memory on the node was 23.1GB / 24GB.; workers 1, 2: {removed}"
    assert failure_cause(RuntimeError("first\n\n  last  \n")) == "last"
    assert failure_cause(RuntimeError()) == "RuntimeError"


def test_two_workers_repeated_splits_and_everything_on_s3(local_ray, dataset, checkpoints, s3, capsys):
    """Labels, images, depth cache and output in a bucket; 2 DDP workers; the paper's repeated random splits.

    12 of the images (3 scenes at 4 distortion levels) keep the two Ray Train runs short; one scene is held out.
    """
    from jobs.train import main
    from pipeline.cli import main as dgiqa

    fs, options = s3
    fs.mkdir("ratings")
    rows = dataset.read_text().splitlines()[:13]
    for row in rows[1:]:
        fs.put(str(dataset.parent / row.split(",")[0]), f"ratings/set/{row.split(',')[0]}")
    fs.pipe("ratings/set/labels.csv", "\n".join(rows).encode())
    out = "s3://ratings/runs/trial"
    args = [
        "s3://ratings/set/labels.csv", "--images-prefix", "s3://ratings/set", "--output", out,
        "--storage-options", json.dumps(options), "--init", f"dgiqa:{checkpoints['dgiqa']}",
        "--depth-weights", str(checkpoints["depth"]), "--depth-input-size", str(DEPTH_INPUT), "--epochs", "1",
        "--batch-size", "4", "--consistency-weight", "0", "--val-crops", "1", "--val-fraction", "0.3",
        "--freeze-backbones", "--freeze-bn", "--loader-workers", "0", "--workers", "2", "--cpus-per-worker", "1",
        "--depth-actors", "2", "--splits", "2", "--seed", "5", "--no-baseline",
    ]
    capsys.readouterr()
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)

    assert summary["images"]["usable"] == 12 and summary["depth_cache"]["computed"] == 12
    assert len(fs.ls(summary["depth_cache"]["folder"])) == 12
    splits = summary["splits"]
    assert [s["seed"] for s in splits] == [5, 6] and [s["folder"] for s in splits] == [f"{out}/split_0",
                                                                                          f"{out}/split_1"]
    held_out = []
    for split in splits:
        log = [json.loads(line) for line in fs.cat(f"{split['folder']}/metrics.jsonl").decode().splitlines()]
        assert [r["epoch"] for r in log] == [1] and log[0]["val_images"] == split["val_images"] == 4
        # Two workers share the epoch's 8 crops and score the held-out images between them.
        assert split["train_images"] == 8 and log[0]["train_crops"] == 8
        held_out.append(split["best"]["val_srocc"])
        assert json.loads(fs.cat(f"{split['folder']}/best.json"))["split_seed"] == split["seed"]
    assert summary["median_best_val_srocc"] == pytest.approx(float(np.median(held_out)))
    assert json.loads(fs.cat(f"{out}/summary.json"))["median_best_val_srocc"] == summary["median_best_val_srocc"]

    image = f"s3://ratings/set/{rows[1].split(',')[0]}"
    assert dgiqa(["score", image, "--weights", f"{out}/split_1/best.pth", "--depth-weights",
                  str(checkpoints["depth"]), "--crops", "1", "--device", "cpu", "--json",
                  "--storage-options", json.dumps(options)]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["status"] == "ok"
