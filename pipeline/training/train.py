"""Fine-tune DGIQA on your own opinion scores with Ray Train: ``dgiqa train`` and ``jobs/train_dgiqa.py``.

The published DGIQA code ships inference only; this is the training recipe its paper describes, with every
number that the paper does not state in text exposed as an option.

Data: a labelled manifest in any ``pipeline.analysis.labels`` layout. Labels are mapped to DGIQA's [0, 1] sigmoid range
by a documented affine map (``pipeline.training.train_data.LabelMap``, recorded in the metrics log and in the sidecar
JSON of every checkpoint), flipped when lower is better. Depth maps are computed once with Depth Anything
(Ray actors, or the driver with ``--depth-actors 0``) and cached next to the data, so reruns and later
experiments skip the depth model; an image that cannot be read or decoded is skipped, logged and counted.

Which images may be read: the label file is data, so every image URI in it is checked before any request
(``pipeline.training.train_data.ImageAccess``) against ``--allow-prefix``, or by default the ``--images-prefix``
(else the label file's own folder), never against anything the file itself says. A refused URI (another bucket,
``file:///etc/passwd``, an HTTP address, ``..``, ``::`` chaining, a symlink out) is skipped as ``rejected`` and
counted with its reason; an image over ``--max-bytes`` is skipped as ``too large``. Logs and the summary carry
URIs and messages redacted (no ``user:password@``, no signed-URL query values).

Recipe (paper): per image and epoch, ``--crops-per-image`` random 224x224 crops, cut at the same place from the
384-short-side image and its depth map (the sizes inference crops from), both flipped horizontally and
vertically at random. Loss ``MSE(pred, label) + lambda * MSE(pred(crop), pred(hflip(crop)))``: the consistency
term asks for the same score from a mirrored crop, which a quality judgement should not notice. AdamW (no
decay on biases and norms), cosine annealing per epoch from ``--lr`` to ``--min-lr``. Initialisation from a
published DGIQA checkpoint (``--init dgiqa:URI``), from ImageNet Swin-T classification weights loaded into both
Swin branches (``--init swin:URI``, a timm ``swin_tiny_patch4_window7_224`` state dict; its head is dropped),
or random (``--init random``). ``--freeze-backbones`` trains the bridges, attention and head only: less to
overfit on a small dataset, and no backward pass through the two Swin-T (three times faster steps).

Defaults, and why: ``--lr`` 2e-5 from a DGIQA checkpoint (already a quality model; a larger step forgets it),
1e-4 from Swin or random weights (the new layers must move); weight decay 0.01 (AdamW's usual value);
``--batch-size`` 16 crops (global, split over the workers; the consistency term doubles the crops per forward
pass); 20 epochs; lambda 0.1 (the consistency term regularises, the MSE term leads); 1 crop per image per
epoch (an epoch then visits each image once; more crops help small datasets); held-out evaluation with 20
crops at the fixed positions of ``pipeline.scoring.preprocess.crop_positions``, exactly as ``dgiqa score`` scores, so
the held-out SROCC is the one ``dgiqa evaluate`` would report for the same images.

Ray Train: a ``TorchTrainer`` with ``--workers`` workers (``--gpus`` GPUs each, 0 for CPU trials); the model is
wrapped by ``ray.train.torch.prepare_model`` (DDP), each worker trains on its share of every epoch and
evaluates its share of the held-out images; rank 0 writes. Output (``--output``, local or any fsspec URI):

* ``best.pth`` / ``last.pth``: plain DGIQA state dicts in the published key layout (``dgiqa score --weights``),
  best by held-out SROCC over the trained epochs; ``best.json`` / ``last.json`` beside them: epoch, metrics,
  SHA-256, label map, init, depth model and recipe;
* ``train_state.pt``: model, optimizer, scheduler, epoch, history, settings (``torch.load(weights_only=True)``);
  it is written first, so it is the commit point of an epoch and the derived files are repaired from it;
* ``metrics.jsonl``: one line per epoch (epoch 0 is the untrained model), with train loss, held-out SROCC and
  PLCC, learning rate and time;
* ``summary.json``: the run summary (also printed).

Resume: a rerun with the same ``--output`` and settings continues after the last finished epoch; a killed run
loses at most the epoch in progress. Randomness is drawn from ``--seed``, split, epoch and rank, so a resumed
epoch draws the crops and dropout masks an uninterrupted run would have, with no generator state to carry.

Splits: the paper repeats an 80/20 split with different seeds and reports the median. ``--splits K`` trains K
splits (seeds ``--seed`` .. ``--seed + K - 1``) in ``<output>/split_<k>/`` and reports the median best held-out
SROCC and PLCC; the default is one split, written to ``<output>`` itself. The best epoch is chosen on the same
held-out images it is reported on, which flatters it a little, as in the paper's protocol. A split keeps each
group of images (one scene: the generic layout's ``group`` column, KADID-10k's reference image; see
``pipeline.analysis.labels``) on one side, so the held-out images show scenes no training step saw.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import io
import json
import logging
import math
import posixpath
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import fsspec
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.analysis.labels import (
    GROUP_COLUMN,
    default_allow_prefixes,
    read_labels,
)
from pipeline.analysis.metrics import finite_or_none, plcc, srocc
from pipeline.batch.allowlist import Allowlist, redact_text, redact_uri
from pipeline.batch.output import atomic_target, check_writable, is_local
from pipeline.limits import DEFAULT_MAX_BYTES
from pipeline.models.dgiqa import DGIQA, build_dgiqa, checkpoint_filter_fn
from pipeline.scoring.preprocess import PreprocessConfig
from pipeline.scoring.scorer import read_depth_weights
from pipeline.scoring.weights import WeightsError, check_fits, load_strict, read_checkpoint
from pipeline.training.train_data import (
    UNUSABLE,
    CropDataset,
    DepthCache,
    DepthWorkers,
    EvalDataset,
    ImageAccess,
    atomic_write,
    dumps,
    epoch_order,
    label_map_for,
    precompute_depth,
    split_indices,
)

logger = logging.getLogger(__name__)

INIT_KINDS = ("dgiqa", "swin", "random")
DEFAULT_LR = {"dgiqa": 2e-5, "swin": 1e-4, "random": 1e-4}
# Keys of a timm Swin-T classifier that the features-only backbones do not have: the final norm and the head.
SWIN_CLASSIFIER_PREFIXES = ("head.", "norm.")
STATE_FILE, BEST, LAST, METRICS_FILE, SUMMARY_FILE = "train_state.pt", "best", "last", "metrics.jsonl", "summary.json"
STATE_FORMAT = 1
EXIT_USAGE, EXIT_RUN_FAILED = 2, 1


class TrainError(RuntimeError):
    """The training run failed after it started; finished epochs are kept and a rerun resumes after them."""


def parse_init(spec: str) -> tuple[str, str | None]:
    """``dgiqa:URI``, ``swin:URI`` or ``random`` -> ``(kind, uri)``.

    Raises:
        ValueError: Anything else.
    """
    kind, sep, uri = spec.partition(":")
    if spec == "random":
        return "random", None
    if kind in ("dgiqa", "swin") and sep and uri:
        return kind, uri
    raise ValueError(f"--init must be dgiqa:URI, swin:URI or random, got {spec!r}")


def swin_backbone_state(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A timm ``swin_tiny_patch4_window7_224`` classifier state dict -> DGIQA's features-only backbone keys.

    timm's features-only Swin names stage ``N`` ``layers_N`` (the classifier: ``layers.N``) and has no final
    ``norm`` or ``head``; those are dropped. Older layouts (patch merging at the end of a stage, saved
    ``attn_mask``/``relative_position_index`` buffers, the original Microsoft files wrapped in ``model``) are
    renamed by DGIQA's own ``checkpoint_filter_fn``, applied under a ``backbone.`` prefix.

    Returns:
        The remapped state dict and the sorted dropped classifier keys.
    """
    dropped = sorted(k for k in state_dict if k.startswith(SWIN_CLASSIFIER_PREFIXES))
    kept = {f"backbone.{k}": v for k, v in state_dict.items() if not k.startswith(SWIN_CLASSIFIER_PREFIXES)}
    return {k.removeprefix("backbone."): v for k, v in checkpoint_filter_fn(kept).items()}, dropped


def build_initial_model(init: str, storage_options: Mapping | None = None, seed: int = 0,
                        materialize: bool = True) -> tuple[DGIQA, dict]:
    """The model training starts from, and what it came from.

    Args:
        init: ``dgiqa:URI``, ``swin:URI`` or ``random``.
        storage_options: fsspec options for the URI.
        seed: Seeds the random initialisation (of everything not loaded).
        materialize: Load the weights; False checks them against a model on the meta device (the driver's
            early check, which allocates nothing).

    Returns:
        The model (train/eval mode untouched) and ``{"init", "kind", "path", "sha256", "dropped_keys"}``.

    Raises:
        WeightsError: The weights cannot be read or do not fit; the message names missing/unexpected keys.
    """
    kind, uri = parse_init(init)
    torch.manual_seed(seed)
    with contextlib.nullcontext() if materialize else torch.device("meta"):
        model = DGIQA()
    info = {"init": init, "kind": kind, "path": None, "sha256": None, "dropped_keys": []}
    if kind == "random":
        return model, info
    ckpt = read_checkpoint(uri, storage_options)
    info.update(path=ckpt.path, sha256=ckpt.sha256)
    load = load_strict if materialize else check_fits
    if kind == "dgiqa":
        load(model, ckpt.state_dict, f"DGIQA (--init dgiqa:{ckpt.path})", checkpoint_filter_fn)
        return model, info
    backbone, dropped = swin_backbone_state(ckpt.state_dict)
    if not backbone:
        raise WeightsError(f"--init swin:{ckpt.path} holds only classifier keys ({', '.join(dropped)})")
    for branch in (model.backbone, model.depth_backbone):
        load(branch, backbone, f"Swin-T backbone (--init swin:{ckpt.path})")
    info["dropped_keys"] = dropped
    if dropped:
        logger.info("--init swin:%s: loaded %d tensors into both Swin branches; dropped the classifier's %s",
                    ckpt.path, len(backbone), ", ".join(dropped))
    return model, info


@dataclass(frozen=True)
class LabelSource:
    """Which labels to train on (see ``pipeline.analysis.labels.read_labels``).

    Attributes:
        path: Label file, or the live-challenge dataset folder.
        layout: One of ``pipeline.analysis.labels.LAYOUTS``.
        images_prefix: Folder or URI prefix image names are joined onto.
        label_column: Another label column than the layout's default.
        uri_column: The generic layout's uri column.
        lower_is_better: Generic labels are DMOS-like (flipped for training).
        keep_training_images: live-challenge: keep its 7 training images.
        label_range: ``(LO, HI)`` mapped to [0, 1] instead of the layout's published scale or the min-max.
    """

    path: str
    layout: str = "generic"
    images_prefix: str | None = None
    label_column: str | None = None
    uri_column: str = "uri"
    lower_is_better: bool = False
    keep_training_images: bool = False
    label_range: tuple[float, float] | None = None


@dataclass(frozen=True)
class Recipe:
    """Everything that decides the trained weights; a resumed run must use the same values.

    Attributes:
        init: ``dgiqa:URI``, ``swin:URI`` or ``random``.
        epochs: Passes over the training images.
        batch_size: Crops per optimizer step over all workers (each worker takes ``ceil(batch / workers)``).
        lr: Peak learning rate; None for the init's default (``DEFAULT_LR``).
        min_lr: Learning rate the cosine anneals to at the end.
        weight_decay: AdamW decoupled weight decay (not applied to biases and norm weights).
        consistency_weight: Lambda of the flip-consistency term; 0 turns it (and its second forward pass) off.
        crops_per_image: Random crops of every training image per epoch.
        val_crops: Crops averaged per held-out image (20 as inference).
        val_fraction: Share of the labelled images held out.
        seed: Seed of the split (split ``k`` uses ``seed + k``), initialisation, crops and dropout.
        freeze_backbones: Train the bridges, attention and head only.
        freeze_bn: Keep BatchNorm layers on their running statistics (their affine weights still train).
            Train-mode BatchNorm over a small per-worker batch normalises every channel by that batch's own
            mean, which hides how good the batch is as a whole and makes steps noisy; with the published
            checkpoint's statistics (or the identity of a fresh model) training and evaluation see one function.
        baseline: Evaluate the untrained model first (epoch 0 of the metrics log).
        depth_input_size: Lower bound of the Depth Anything input side (518 as published).
    """

    init: str
    epochs: int = 20
    batch_size: int = 16
    lr: float | None = None
    min_lr: float = 0.0
    weight_decay: float = 0.01
    consistency_weight: float = 0.1
    crops_per_image: int = 1
    val_crops: int = 20
    val_fraction: float = 0.2
    seed: int = 0
    freeze_backbones: bool = False
    freeze_bn: bool = False
    baseline: bool = True
    depth_input_size: int = 518

    def __post_init__(self):
        kind, _ = parse_init(self.init)
        if self.lr is None:
            object.__setattr__(self, "lr", DEFAULT_LR[kind])
        if self.epochs < 1 or self.batch_size < 1 or self.crops_per_image < 1 or self.val_crops < 1:
            raise ValueError("--epochs, --batch-size, --crops-per-image and --val-crops must be at least 1")
        if not (self.lr > 0 and 0 <= self.min_lr <= self.lr):
            raise ValueError(f"need --lr > 0 and 0 <= --min-lr <= --lr, got {self.lr:g} and {self.min_lr:g}")
        if self.weight_decay < 0 or self.consistency_weight < 0:
            raise ValueError("--weight-decay and --consistency-weight must not be negative")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"--val-fraction must be between 0 and 1, got {self.val_fraction:g}")

    def preprocess(self) -> PreprocessConfig:
        """Sizes of inference (384 short side, 224 crops, crop seed 42) with the held-out crop count."""
        return PreprocessConfig(num_crops=self.val_crops, depth_lower_bound=self.depth_input_size)


@dataclass(frozen=True)
class Resources:
    """How the run uses the cluster; may change between a run and its resumption.

    Attributes:
        workers: Ray Train workers (DDP processes).
        gpus_per_worker: GPUs per worker; 0 trains on CPUs. Declared, never inferred from the driver.
        cpus_per_worker: CPUs per worker (and its torch threads on a CPU).
        loader_workers: Decoding processes per worker feeding its steps (0: in the training loop).
        depth_actors: Actors computing missing depth maps, each with a worker's resources; 0 on the driver.
            None: as many as ``workers``.
        depth_batch: Same-size depth inputs per forward pass.
        max_failures: Worker failures Ray Train recovers from (each restart resumes after the last finished
            epoch). Node preemptions are recovered separately by Ray's own default.
        ray_storage: ``RunConfig.storage_path`` for Ray Train's run records (None: Ray's default). Checkpoints
            do not go there: they go to the output.
    """

    workers: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 2.0
    loader_workers: int = 2
    depth_actors: int | None = None
    depth_batch: int = 4
    max_failures: int = 0
    ray_storage: str | None = None

    def __post_init__(self):
        if self.workers < 1 or self.cpus_per_worker <= 0 or self.gpus_per_worker < 0 or self.depth_batch < 1:
            raise ValueError("--workers, --cpus-per-worker and --depth-batch must be positive, --gpus not negative")
        if self.loader_workers < 0 or (self.depth_actors is not None and self.depth_actors < 0):
            raise ValueError("--loader-workers and --depth-actors must not be negative")

    @property
    def device(self) -> str:
        """The device of training workers and depth actors."""
        return "cuda" if self.gpus_per_worker > 0 else "cpu"


@dataclass(frozen=True)
class TrainConfig:
    """One ``dgiqa train`` run; cheap to build and to pickle.

    Attributes:
        labels: The labelled images.
        output: Output root URI (checkpoints, logs, summary).
        depth_weights: URI of the Depth Anything checkpoint.
        recipe: Hyperparameters and initialisation.
        resources: Workers, GPUs, actors.
        splits: Repeated random splits (the paper's protocol); 1 trains into ``output`` itself.
        encoder: Depth Anything encoder, or ``auto`` to read it from the checkpoint.
        depth_version: Depth Anything version.
        depth_cache: Depth-map cache root; None for ``depth_cache`` next to the labels (see ``cache_root``).
        storage_options: fsspec options for every URI.
        allow_prefixes: Where images may be read from; empty for ``pipeline.analysis.labels.default_allow_prefixes``
            (the images prefix, else the label file's folder), never the label file's own URIs.
        max_bytes: The byte limit per image; a larger one is skipped unread.
    """

    labels: LabelSource
    output: str
    depth_weights: str
    recipe: Recipe
    resources: Resources = field(default_factory=Resources)
    splits: int = 1
    encoder: str = "auto"
    depth_version: str = "v1"
    depth_cache: str | None = None
    storage_options: Mapping | None = None
    allow_prefixes: tuple[str, ...] = ()
    max_bytes: int = DEFAULT_MAX_BYTES

    def __post_init__(self):
        if self.splits < 1:
            raise ValueError(f"--splits must be at least 1, got {self.splits}")
        if self.max_bytes < 1:
            raise ValueError("--max-bytes must be at least 1")

    @property
    def cache_root(self) -> str:
        """``--depth-cache``, or ``depth_cache`` next to the label file (in the live-challenge dataset folder).

        Next to the data rather than the output, so every later experiment on the same images (another
        ``--output``, other hyperparameters) reuses the maps; the cache's folder names keep depth models apart.
        """
        if self.depth_cache:
            return self.depth_cache
        path = self.labels.path.rstrip("/")
        folder = path if self.labels.layout == "live-challenge" else posixpath.dirname(path)
        return posixpath.join(folder, "depth_cache")

    def split_folder(self, split: int) -> str:
        """Where split ``split`` writes: the output itself for a single split."""
        return self.output if self.splits == 1 else posixpath.join(self.output.rstrip("/"), f"split_{split}")


class RunStore:
    """The files of one split's training run under a folder URI (see the module docstring)."""

    def __init__(self, folder: str, storage_options: Mapping | None = None):
        self.folder = folder.rstrip("/")
        self.storage_options = storage_options

    def uri(self, name: str) -> str:
        """URI of a file of the run."""
        return posixpath.join(self.folder, name)

    def read_state(self) -> dict | None:
        """The training state of the last finished epoch, or None before the first."""
        fs, path = fsspec.core.url_to_fs(self.uri(STATE_FILE), **(self.storage_options or {}))
        if not fs.exists(path):
            return None
        if is_local(fs):  # memory-mapped: reading the settings does not read the tensors
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        else:
            with fs.open(path, "rb") as f:
                state = torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"{self.uri(STATE_FILE)} has format {state.get('format')!r}, not {STATE_FORMAT}")
        return state

    def _save(self, name: str, obj) -> bytes:
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        data = buffer.getvalue()
        atomic_write(self.uri(name), data, self.storage_options)
        return data

    def write_state(self, state: Mapping) -> None:
        """Commit an epoch."""
        self._save(STATE_FILE, dict(state))

    def write_weights(self, which: str, state_dict: Mapping[str, torch.Tensor], sidecar: Mapping) -> str:
        """``<which>.pth`` (a plain DGIQA state dict) and ``<which>.json``; returns the SHA-256 of the weights."""
        sha256 = hashlib.sha256(self._save(f"{which}.pth", dict(state_dict))).hexdigest()
        self.write_json(f"{which}.json", {**sidecar, "weights": self.uri(f"{which}.pth"), "sha256": sha256})
        return sha256

    def copy_weights(self, source: str, which: str, sha256: str, sidecar: Mapping) -> None:
        """``<which>.pth`` as a copy of ``<source>.pth`` (a server-side copy on object stores), and its sidecar."""
        fs, src = fsspec.core.url_to_fs(self.uri(f"{source}.pth"), **(self.storage_options or {}))
        _, dst = fsspec.core.url_to_fs(self.uri(f"{which}.pth"), **(self.storage_options or {}))
        with atomic_target(fs, dst) as target:
            fs.copy(src, target)
        self.write_json(f"{which}.json", {**sidecar, "weights": self.uri(f"{which}.pth"), "sha256": sha256})

    def read_json(self, name: str) -> dict:
        """A JSON file of the run, or ``{}`` when there is none."""
        fs, path = fsspec.core.url_to_fs(self.uri(name), **(self.storage_options or {}))
        if not fs.exists(path):
            return {}
        with fs.open(path, "rb") as f:
            return json.loads(f.read())

    def write_json(self, name: str, obj: Mapping) -> None:
        """A JSON file of the run (NaN written as null)."""
        atomic_write(self.uri(name), (json.dumps(finite_or_none(obj), indent=2, sort_keys=True) + "\n").encode(),
                     self.storage_options)

    def write_metrics(self, history: Sequence[Mapping], label_map: Mapping) -> None:
        """Rewrite ``metrics.jsonl`` from the history: one line per epoch, never a duplicate."""
        text = "".join(dumps({**record, "label_map": label_map}) + "\n" for record in history)
        atomic_write(self.uri(METRICS_FILE), text.encode(), self.storage_options)


@dataclass(frozen=True)
class WorkerPlan:
    """What every training worker needs, shipped once through ``train_loop_config``.

    Attributes:
        folder: The split's output folder.
        split: Split index.
        recipe: Hyperparameters.
        train_items: ``(uri, target, depth_path)`` of the training images.
        val_items: The same for the held-out images.
        label_map: ``LabelMap.to_dict()``, written into the log and sidecars.
        settings: What a resumed run must agree with (compared on the driver, stored in the state).
        sidecar: Provenance written next to each checkpoint.
        resources: Threads and loader processes.
        access: Where images may be read from (checked again where each image is read).
        storage_options: fsspec options.
    """

    folder: str
    split: int
    recipe: Recipe
    train_items: list[tuple[str, float, str]]
    val_items: list[tuple[str, float, str]]
    label_map: dict
    settings: dict
    sidecar: dict
    resources: Resources
    access: ImageAccess
    storage_options: Mapping | None = None


def dgiqa_loss(pred: torch.Tensor, flipped: torch.Tensor | None, target: torch.Tensor,
               consistency_weight: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``MSE(pred, target) + lambda * MSE(pred, pred of the mirrored crops)``; returns total, MSE, consistency."""
    mse = F.mse_loss(pred, target)
    if flipped is None or consistency_weight == 0:
        consistency = torch.zeros((), device=pred.device)
    else:
        consistency = F.mse_loss(pred, flipped)
    return mse + consistency_weight * consistency, mse, consistency


def trainable_parameters(model: DGIQA, freeze_backbones: bool) -> list[nn.Parameter]:
    """Mark the Swin branches frozen (or not) and return the parameters the optimizer updates."""
    for branch in (model.backbone, model.depth_backbone):
        branch.requires_grad_(not freeze_backbones)
    return [p for p in model.parameters() if p.requires_grad]


def make_optimizer(model: DGIQA, recipe: Recipe) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW with weight decay on weight matrices and kernels only, and the per-epoch cosine schedule."""
    params = trainable_parameters(model, recipe.freeze_backbones)
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=recipe.lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=recipe.epochs, eta_min=recipe.min_lr)
    return optimizer, scheduler


def set_train_mode(model: nn.Module, core: DGIQA, recipe: Recipe) -> None:
    """Training mode for ``model`` (the DDP wrapper or ``core`` itself), except what the recipe freezes."""
    model.train()
    if recipe.freeze_backbones:  # frozen branches stay exactly the functions they were
        core.backbone.eval()
        core.depth_backbone.eval()
    if recipe.freeze_bn:
        for module in core.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


def _seed(*words: int) -> int:
    return int(np.random.SeedSequence(list(words)).generate_state(1)[0])


def _world():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 else None


def evaluate(model: DGIQA, items: Sequence[tuple[str, float, str]], preprocess: PreprocessConfig,
             device: torch.device, rank: int = 0, world: int = 1, loader_workers: int = 0,
             storage_options: Mapping | None = None, *, access: ImageAccess) -> list[float]:
    """Held-out scores by the inference protocol: the mean over ``num_crops`` crops at the fixed positions.

    Each worker scores every ``world``-th image from its rank; all workers get every score back.
    """
    model.eval()
    dataset = EvalDataset(items, range(rank, len(items), world), preprocess, storage_options, access=access)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=loader_workers)
    scores: dict[int, float] = {}
    with torch.inference_mode():
        for index, image_crops, map_crops in loader:
            scores[int(index)] = model(image_crops.to(device), map_crops.to(device)).float().mean().item()
    dist = _world()
    if dist is not None:
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, scores)
        scores = {k: v for part in gathered for k, v in part.items()}
    return [scores[i] for i in range(len(items))]


def _val_metrics(predictions: Sequence[float], items: Sequence[tuple[str, float, str]]) -> dict:
    targets = [target for _, target, _ in items]
    return {"val_srocc": srocc(predictions, targets), "val_plcc": plcc(predictions, targets)}


def _better(candidate: float | None, best: Mapping | None) -> bool:
    value = candidate if candidate is not None and math.isfinite(candidate) else -math.inf
    if best is None:
        return True
    held = best["val_srocc"] if best["val_srocc"] is not None and math.isfinite(best["val_srocc"]) else -math.inf
    return value > held


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _train_epoch(model: nn.Module, core: DGIQA, optimizer: torch.optim.Optimizer, plan: WorkerPlan, epoch: int,
                 rank: int, world: int, device: torch.device) -> dict:
    recipe = plan.recipe
    words = (recipe.seed, plan.split, epoch)
    torch.manual_seed(_seed(*words, rank))  # dropout masks: a resumed epoch draws what the first attempt drew
    order = epoch_order(len(plan.train_items), recipe.crops_per_image, words, rank, world)
    dataset = CropDataset(plan.train_items, order, words, recipe.preprocess(), plan.storage_options,
                          access=plan.access)
    per_worker = math.ceil(recipe.batch_size / world)
    loader = torch.utils.data.DataLoader(dataset, batch_size=per_worker, shuffle=False,
                                         num_workers=plan.resources.loader_workers,
                                         pin_memory=device.type == "cuda")
    set_train_mode(model, core, recipe)
    sums = torch.zeros(4, dtype=torch.float64)
    lam = recipe.consistency_weight
    for image, depth, target in loader:
        image, depth, target = image.to(device), depth.to(device), target.to(device)
        n = target.shape[0]
        if lam > 0:  # one forward pass for both views: DDP expects one forward per backward
            out = model(torch.cat([image, image.flip(-1)]), torch.cat([depth, depth.flip(-1)]))
            pred, flipped = out[:n], out[n:]
        else:
            pred, flipped = model(image, depth), None
        loss, mse, consistency = dgiqa_loss(pred, flipped, target, lam)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sums += torch.tensor([loss.item() * n, mse.item() * n, consistency.item() * n, n], dtype=torch.float64)
    dist = _world()
    if dist is not None:
        dist.all_reduce(sums)
    count = max(sums[3].item(), 1.0)
    return {"train_loss": sums[0].item() / count, "train_mse": sums[1].item() / count,
            "train_consistency": sums[2].item() / count, "train_crops": int(sums[3].item())}


def _sidecar(plan: WorkerPlan, record: Mapping) -> dict:
    return {**plan.sidecar, "epoch": record["epoch"], "metrics": dict(record)}


def _repair(store: RunStore, state: Mapping, plan: WorkerPlan) -> None:
    """Rewrite what the committed state says should exist but does not (a kill may have come between writes).

    A sidecar is written after its weights, so a sidecar naming the state's epoch proves its weights were.
    """
    due = [(LAST, state["history"][-1])]
    if state["best"] is not None and state["best"]["epoch"] == state["epoch"]:
        due.append((BEST, state["best"]))
    for which, record in due:
        if store.read_json(f"{which}.json").get("epoch") != record["epoch"]:
            logger.info("restoring %s.pth of epoch %d from %s", which, record["epoch"], STATE_FILE)
            store.write_weights(which, state["model"], _sidecar(plan, record))
    store.write_metrics(state["history"], plan.label_map)


def train_worker(loop_config: Mapping) -> None:
    """The loop every Ray Train worker runs: resume or initialise, train, evaluate, commit each epoch."""
    import ray.train
    import ray.train.torch

    plan: WorkerPlan = loop_config["plan"]
    recipe = plan.recipe
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(plan.resources.cpus_per_worker)))
    store = RunStore(plan.folder, plan.storage_options)
    state = store.read_state()
    if state is None:
        core, _ = build_initial_model(recipe.init, plan.storage_options, seed=_seed(recipe.seed, plan.split))
        history: list[dict] = []
        best = None
    else:
        core = build_dgiqa()
        core.load_state_dict(state["model"])
        history, best = list(state["history"]), state["best"]
        if rank == 0:
            _repair(store, state, plan)
    trainable_parameters(core, recipe.freeze_backbones)  # before DDP, which registers what needs gradients
    model = ray.train.torch.prepare_model(core)
    core = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    optimizer, scheduler = make_optimizer(core, recipe)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    start = state["epoch"] + 1 if state else 1
    preprocess = recipe.preprocess()

    def held_out() -> dict:
        predictions = evaluate(core, plan.val_items, preprocess, device, rank, world,
                               plan.resources.loader_workers, plan.storage_options, access=plan.access)
        return _val_metrics(predictions, plan.val_items)

    if start == 1 and recipe.baseline and not history:
        began = time.monotonic()
        history = [{"epoch": 0, "train_loss": None, "train_mse": None, "train_consistency": None,
                    "train_crops": 0, **held_out(), "lr": None, "epoch_time_s": round(time.monotonic() - began, 3),
                    "finished_at": _now(), "val_images": len(plan.val_items)}]
        if rank == 0:
            store.write_metrics(history, plan.label_map)
    for epoch in range(start, recipe.epochs + 1):
        began = time.monotonic()
        lr = optimizer.param_groups[0]["lr"]
        train = _train_epoch(model, core, optimizer, plan, epoch, rank, world, device)
        scheduler.step()
        record = {"epoch": epoch, **train, **held_out(), "lr": lr,
                  "epoch_time_s": round(time.monotonic() - began, 3), "finished_at": _now(),
                  "val_images": len(plan.val_items)}
        history.append(record)
        improved = _better(record["val_srocc"], best)
        if improved:
            best = record
        if rank == 0:
            weights = _cpu_state(core)
            store.write_state({"format": STATE_FORMAT, "epoch": epoch, "model": weights,
                               "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                               "history": history, "best": best, "settings": plan.settings,
                               "rng": {"seed": recipe.seed, "split": plan.split,
                                       "scheme": "per-epoch seeds from (seed, split, epoch, rank)"}})
            sha256 = store.write_weights(LAST, weights, _sidecar(plan, record))
            if improved:
                store.copy_weights(LAST, BEST, sha256, _sidecar(plan, record))
            store.write_metrics(history, plan.label_map)
        ray.train.report({k: v for k, v in record.items() if isinstance(v, int | float) and v is not None})


def _init_ray() -> None:
    """Start (or join) Ray only when work needs it: a run that refuses every image never starts a cluster."""
    import ray

    if not ray.is_initialized():
        ray.init(ignore_reinit_error=True)


def _depth_workers(resources: Resources) -> DepthWorkers:
    actors = resources.workers if resources.depth_actors is None else resources.depth_actors
    return DepthWorkers(actors=actors, cpus=resources.cpus_per_worker, gpus=resources.gpus_per_worker,
                        batch=resources.depth_batch)


def _labels_digest(uris: Sequence[str], labels: Sequence[float], groups: Sequence[str | None] | None = None) -> str:
    """What a resumed run must find unchanged: every URI and label, and the groups (which move the split)."""
    digest = hashlib.sha1()
    for uri, label in zip(uris, labels, strict=True):
        digest.update(f"{uri}\t{label!r}\n".encode())
    if groups is not None:  # a file without groups keeps the digest it had before groups existed
        for group in groups:
            digest.update(f"group\t{group!r}\n".encode())
    return digest.hexdigest()


def _differences(old: Mapping, new: Mapping, prefix: str = "") -> list[str]:
    names = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            names += _differences(a, b, f"{prefix}{key}.")
        elif a != b and not (isinstance(a, list | tuple) and isinstance(b, list | tuple) and list(a) == list(b)):
            names.append(f"{prefix}{key}")
    return names


def _fit(plan: WorkerPlan, resources: Resources) -> None:
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    per_worker = {"CPU": resources.cpus_per_worker}
    if resources.gpus_per_worker:
        per_worker["GPU"] = resources.gpus_per_worker
    scaling = ScalingConfig(num_workers=resources.workers, use_gpu=resources.gpus_per_worker > 0,
                            resources_per_worker=per_worker)
    run = RunConfig(name=f"dgiqa-train-split{plan.split}-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S%f}",
                    storage_path=resources.ray_storage,
                    failure_config=FailureConfig(max_failures=resources.max_failures))
    trainer = TorchTrainer(train_worker, train_loop_config={"plan": plan}, scaling_config=scaling, run_config=run)
    try:
        trainer.fit()
    except Exception as exc:  # noqa: BLE001 - Ray wraps worker errors in several types; reported in one line
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        cause = lines[-1] if lines else type(exc).__name__
        raise TrainError(f"training split {plan.split} failed: {redact_text(cause)}. Finished epochs are kept in "
                         f"{redact_uri(plan.folder)}; rerun with the same --output to resume after them") from exc


def _split_summary(state: Mapping, plan: WorkerPlan, resumed_after: int | None, trained_now: bool) -> dict:
    history = state["history"]
    baseline = next((r for r in history if r["epoch"] == 0), None)
    pick = ("epoch", "val_srocc", "val_plcc", "train_loss")
    store = RunStore(plan.folder, plan.storage_options)
    return {
        "split": plan.split, "folder": plan.folder, "seed": plan.settings["split_seed"],
        "train_images": len(plan.train_items), "val_images": len(plan.val_items),
        "epochs_done": state["epoch"], "resumed_after_epoch": resumed_after, "trained_now": trained_now,
        "baseline": {k: baseline[k] for k in pick} if baseline else None,
        "best": {k: state["best"][k] for k in pick} if state["best"] else None,
        "last": {k: history[-1][k] for k in pick},
        "best_weights": store.uri(f"{BEST}.pth"), "last_weights": store.uri(f"{LAST}.pth"),
        "metrics_log": store.uri(METRICS_FILE),
    }


def _median(values: Sequence[float | None]) -> float | None:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.median(finite)) if finite else None


def run_training(config: TrainConfig) -> dict:
    """Train (or resume) every split; returns the run summary, also written to ``<output>/summary.json``.

    Raises:
        LabelError: The labels cannot be used.
        WeightsError: The init or depth weights cannot be used (checked before any work).
        OutputError: ``--output`` (or an explicit ``--depth-cache``) cannot be written; checked first.
        ValueError: Bad settings, too few usable images, or an output holding a run with other settings.
        TrainError: Training failed after it started (rerun to resume).
    """
    ray_was_running = _ray_running()
    try:
        return _run_training(config)
    finally:
        if not ray_was_running and _ray_running():  # a Ray this command started itself goes with it
            import ray

            ray.shutdown()


def _ray_running() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def _run_training(config: TrainConfig) -> dict:
    started = time.monotonic()
    source, recipe, options = config.labels, config.recipe, config.storage_options
    # Where the run writes is checked before labels and weights are read: seconds, not minutes on S3.
    check_writable(config.output, options, flag="--output")
    if config.depth_cache:
        check_writable(config.depth_cache, options, flag="--depth-cache")
    labels = read_labels(source.path, source.layout, source.images_prefix, label_column=source.label_column,
                         uri_column=source.uri_column, lower_is_better=source.lower_is_better,
                         keep_training_images=source.keep_training_images, storage_options=options)
    access = ImageAccess(Allowlist(config.allow_prefixes or default_allow_prefixes(labels)), config.max_bytes)
    label_map = label_map_for(labels, source.label_range)
    uris = labels.table.column("uri").to_pylist()
    raw = labels.table.column("label").to_pylist()
    targets = label_map.normalize(raw)
    logger.info("%d labelled images from %s; labels -> targets: %s; images may be read from %s (at most %d bytes "
                "each)", len(uris), redact_uri(source.path), label_map.rule, ", ".join(access.allowlist.prefixes),
                access.max_bytes)
    if labels.groups is not None:
        n_groups = len(set(labels.groups) - {None}) + labels.groups.count(None)
        logger.info("splitting by the %s column: %d groups, each kept on one side", GROUP_COLUMN[labels.layout],
                    n_groups)
    splits = [split_indices(len(uris), recipe.val_fraction, recipe.seed + k, labels.groups)
              for k in range(config.splits)]
    _, init_info = build_initial_model(recipe.init, options, materialize=False)
    depth_weights = read_depth_weights(config.depth_weights, config.encoder, config.depth_version, options)
    preprocess = recipe.preprocess()
    base_settings = {
        "labels": {**asdict(source), "label_range": list(source.label_range) if source.label_range else None,
                   "digest": _labels_digest(uris, raw, labels.groups)},
        "label_map": asdict(label_map), "recipe": asdict(recipe), "depth_model": depth_weights.label,
        "preprocess": {"short_side": preprocess.short_side, "crop_size": preprocess.crop_size,
                       "depth_lower_bound": preprocess.depth_lower_bound, "crop_seed": preprocess.seed},
    }
    stores = [RunStore(config.split_folder(k), options) for k in range(config.splits)]
    states = [store.read_state() for store in stores]
    for k, state in enumerate(states):
        settings = {**base_settings, "split": k, "split_seed": recipe.seed + k}
        if state is not None and state["settings"] != settings:
            changed = ", ".join(_differences(state["settings"], settings)) or "format"
            raise ValueError(f"{stores[k].folder} holds a training run with other settings (changed: {changed}); "
                             "rerun with the same settings to resume it, or choose a new --output")

    workers = _depth_workers(config.resources)
    if workers.actors:
        _init_ray()
    cache = DepthCache(config.cache_root, depth_weights.label, preprocess, options)
    depth, depth_stats = precompute_depth(uris, depth_weights, cache, workers, access=access)
    usable = {uri for uri, row in depth.items() if row["status"] not in UNUSABLE}

    sidecar_base = {"format": "dgiqa-train/1", "labels": redact_uri(source.path), "layout": labels.layout,
                    "label_column": labels.label_column, "label_map": label_map.to_dict(), "init": init_info,
                    "depth_model": depth_weights.label, "preprocess": base_settings["preprocess"],
                    "recipe": asdict(recipe), "key_layout": "published DGIQA state_dict (dgiqa score --weights)"}
    split_summaries = []
    for k, (train_idx, val_idx) in enumerate(splits):
        def items(indices: np.ndarray) -> list[tuple[str, float, str]]:
            return [(uris[i], float(targets[i]), depth[uris[i]]["depth_path"]) for i in indices if uris[i] in usable]

        train_items, val_items = items(train_idx), items(val_idx)
        if len(val_items) < 3 or not train_items:
            skipped = ", ".join(f"{reason} {n}" for reason, n in sorted(depth_stats["skipped_reasons"].items()))
            raise ValueError(f"split {k}: {len(train_items)} training and {len(val_items)} held-out images can be "
                             f"read; at least 1 and 3 are needed (skipped: {skipped or 'none'})")
        settings = {**base_settings, "split": k, "split_seed": recipe.seed + k}
        plan = WorkerPlan(folder=stores[k].folder, split=k, recipe=recipe, train_items=train_items,
                          val_items=val_items, label_map=label_map.to_dict(), settings=settings,
                          sidecar={**sidecar_base, "split": k, "split_seed": recipe.seed + k,
                                   "train_images": len(train_items), "val_images": len(val_items)},
                          resources=config.resources, access=access, storage_options=options)
        state = states[k]
        resumed_after = state["epoch"] if state else None
        trained_now = state is None or state["epoch"] < recipe.epochs
        if not trained_now:
            logger.info("split %d: all %d epochs were finished before; nothing to train", k, recipe.epochs)
        else:
            logger.info("split %d: %d training, %d held-out images; %s", k, len(train_items), len(val_items),
                        f"resuming after epoch {resumed_after}" if state else "starting")
            began = time.monotonic()
            _init_ray()
            _fit(plan, config.resources)
            logger.info("split %d: trained in %.1f s", k, time.monotonic() - began)
        final = stores[k].read_state()
        if final is None:
            raise TrainError(f"training split {k} finished without writing {stores[k].uri(STATE_FILE)}")
        split_summaries.append(_split_summary(final, plan, resumed_after, trained_now))

    summary = {
        "output": redact_uri(config.output), "labels": redact_uri(source.path), "layout": labels.layout,
        "label_map": label_map.to_dict(), "init": init_info, "depth_model": depth_weights.label,
        "allowed_prefixes": list(access.allowlist.prefixes), "max_bytes": access.max_bytes,
        "images": {"labelled": len(uris), "usable": len(usable), "skipped": len(uris) - len(usable),
                   "skipped_reasons": depth_stats["skipped_reasons"]},
        "depth_cache": depth_stats, "splits": split_summaries,
        "median_best_val_srocc": _median([s["best"]["val_srocc"] if s["best"] else None for s in split_summaries]),
        "median_best_val_plcc": _median([s["best"]["val_plcc"] if s["best"] else None for s in split_summaries]),
        "median_last_val_srocc": _median([s["last"]["val_srocc"] for s in split_summaries]),
        "wall_time_s": round(time.monotonic() - started, 3),
    }
    RunStore(config.output, options).write_json(SUMMARY_FILE, summary)
    return finite_or_none(summary)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """A ``TrainConfig`` from parsed ``add_arguments`` options.

    Raises:
        ValueError: A value out of range.
    """
    if args.label_range is not None and not args.label_range[0] < args.label_range[1]:
        raise ValueError(f"--label-range needs LO < HI, got {args.label_range[0]:g},{args.label_range[1]:g}")
    labels = LabelSource(path=args.labels, layout=args.layout, images_prefix=args.images_prefix,
                         label_column=args.label_column, uri_column=args.uri_column,
                         lower_is_better=args.lower_is_better, keep_training_images=args.keep_training_images,
                         label_range=tuple(args.label_range) if args.label_range else None)
    recipe = Recipe(init=args.init, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, min_lr=args.min_lr,
                    weight_decay=args.weight_decay, consistency_weight=args.consistency_weight,
                    crops_per_image=args.crops_per_image, val_crops=args.val_crops, val_fraction=args.val_fraction,
                    seed=args.seed, freeze_backbones=args.freeze_backbones, freeze_bn=args.freeze_bn,
                    baseline=args.baseline,
                    depth_input_size=args.depth_input_size)
    resources = Resources(workers=args.workers, gpus_per_worker=args.gpus, cpus_per_worker=args.cpus_per_worker,
                          loader_workers=args.loader_workers, depth_actors=args.depth_actors,
                          depth_batch=args.depth_batch, max_failures=args.max_failures, ray_storage=args.ray_storage)
    return TrainConfig(labels=labels, output=args.output, depth_weights=args.depth_weights, recipe=recipe,
                       resources=resources, splits=args.splits, encoder=args.encoder,
                       depth_version=args.depth_version, depth_cache=args.depth_cache,
                       storage_options=args.storage_options or None, allow_prefixes=tuple(args.allow_prefix),
                       max_bytes=args.max_bytes)


def run_command(args: argparse.Namespace, prog: str = "dgiqa") -> int:
    """Run a training from parsed options and print the summary as JSON; returns the exit code.

    Bad settings, labels or weights raise ``ValueError`` (the caller prints one line, exit 2); a failure
    after training started prints one line here and returns 1.
    """
    config = config_from_args(args)
    try:
        summary = run_training(config)
    except TrainError as exc:
        print(f"{prog}: run failed: {redact_text(str(exc))}", file=sys.stderr)
        return EXIT_RUN_FAILED
    print(json.dumps(summary, indent=2, sort_keys=True), flush=True)
    return 0
