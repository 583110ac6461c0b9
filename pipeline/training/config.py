"""The settings of a ``dgiqa train`` run: cheap, picklable dataclasses built from the command line.

The settings are split by how a resumed run treats them: ``LabelSource`` and ``Recipe`` decide the trained weights,
so a resumed run must repeat them (the driver compares them with the settings stored in the run's state);
``Resources`` only says how the cluster is used, so it may change between a run and its resumption.

Importing this module loads neither torch nor Ray: ``dgiqa train`` checks ``--init`` with ``parse_init`` while it
parses its arguments.
"""

from __future__ import annotations

import argparse
import posixpath
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pipeline.limits import DEFAULT_MAX_BYTES

if TYPE_CHECKING:
    from pipeline.scoring.preprocess import PreprocessConfig

INIT_KINDS = ("dgiqa", "swin", "random")
DEFAULT_LR = {"dgiqa": 2e-5, "swin": 1e-4, "random": 1e-4}


def _parse_init(spec: str, kinds: tuple[str, str], flag: str) -> tuple[str, str | None]:
    kind, sep, uri = spec.partition(":")
    if spec == "random":
        return "random", None
    if kind in kinds and sep and uri:
        return kind, uri
    raise ValueError(f"{flag} must be {kinds[0]}:URI, {kinds[1]}:URI or random, got {spec!r}")


def parse_init(spec: str) -> tuple[str, str | None]:
    """``dgiqa:URI``, ``swin:URI`` or ``random`` -> ``(kind, uri)``.

    Raises:
        ValueError: Anything else.
    """
    return _parse_init(spec, ("dgiqa", "swin"), "--init")


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
        from pipeline.scoring.preprocess import PreprocessConfig  # torch: not needed to parse the command line

        return PreprocessConfig(num_crops=self.val_crops, depth_input_size=self.depth_input_size)


DPAM_INIT_KINDS = ("dpam", "vit", "random")


def parse_dpam_init(spec: str) -> tuple[str, str | None]:
    """``dpam:URI``, ``vit:URI`` or ``random`` -> ``(kind, uri)`` (``dgiqa train --model dpam``).

    Raises:
        ValueError: Anything else.
    """
    return _parse_init(spec, ("dpam", "vit"), "--init for --model dpam")


@dataclass(frozen=True)
class DpamRecipe:
    """What decides DPAM-IQA's trained weights: the authors' recipe (``train_maniqa.py``) by default.

    Attributes:
        init: ``dpam:URI`` (the authors' checkpoint layout), ``vit:URI`` (a timm ``vit_base_patch8_224`` state
            dict, as the authors start from ImageNet weights; its classifier is kept, unused) or ``random``.
        epochs: Passes over the training images (200).
        batch_size: Images per optimizer step over all workers (12).
        lr: Adam's learning rate (1e-5).
        weight_decay: Adam's L2 penalty, added to the gradient as ``torch.optim.Adam`` does (1e-5).
        t_max: The cosine schedule's half period in optimizer steps (50): the authors step it after every
            batch, so the rate falls to 0 and rises again every 100 steps.
        flip_prob: Probability of a horizontal flip of a training image's ViT and texture inputs (0.7).
        val_fraction: Share of the labelled images held out.
        seed: Seed of the split, initialisation, flips, crops and dropout.
        freeze_backbone: Train everything but the ViT (no backward pass through it: about three times faster
            steps; small datasets).
        baseline: Evaluate the untrained model first (epoch 0 of the metrics log).
        trained_on: The preprocessing preset (``--trained-on``): which of the authors' loaders the images go
            through, in training (a random 224 crop for the synthetic sets' presets) and evaluation (as
            ``dgiqa score --model dpam`` scores).
    """

    init: str
    epochs: int = 200
    batch_size: int = 12
    lr: float = 1e-5
    weight_decay: float = 1e-5
    t_max: int = 50
    flip_prob: float = 0.7
    val_fraction: float = 0.2
    seed: int = 0
    freeze_backbone: bool = False
    baseline: bool = True
    trained_on: str = "livec"

    def __post_init__(self):
        parse_dpam_init(self.init)
        if self.epochs < 1 or self.batch_size < 1 or self.t_max < 1:
            raise ValueError("--epochs, --batch-size and --t-max must be at least 1")
        if not self.lr > 0 or self.weight_decay < 0 or not 0 <= self.flip_prob <= 1:
            raise ValueError("need --lr > 0, --weight-decay >= 0 and 0 <= --flip-prob <= 1")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"--val-fraction must be between 0 and 1, got {self.val_fraction:g}")


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
        return self.depth_cache or posixpath.join(_labels_folder(self.labels), "depth_cache")

    def split_folder(self, split: int) -> str:
        """Where split ``split`` writes: the output itself for a single split."""
        return _split_folder(self.output, self.splits, split)


def _split_folder(output: str, splits: int, split: int) -> str:
    return output if splits == 1 else posixpath.join(output.rstrip("/"), f"split_{split}")


def _labels_folder(labels: LabelSource) -> str:
    """The folder of the label file (the live-challenge dataset folder itself), where caches go by default."""
    path = labels.path.rstrip("/")
    return path if labels.layout == "live-challenge" else posixpath.dirname(path)


@dataclass(frozen=True)
class DpamTrainConfig:
    """One ``dgiqa train --model dpam`` run; the fields DGIQA's ``TrainConfig`` shares mean the same.

    Attributes:
        labels: The labelled images.
        output: Output root URI.
        recipe: The authors' recipe and the preprocessing preset.
        resources: Workers, GPUs, the actors that compute missing superpixel features (``--depth-actors``).
        splits: Repeated random splits.
        superpixel_cache: Superpixel-feature cache root; None for ``superpixel_cache`` next to the labels.
        storage_options: fsspec options for every URI.
        allow_prefixes: Where images may be read from (see ``TrainConfig``).
        max_bytes: The byte limit per image.
    """

    labels: LabelSource
    output: str
    recipe: DpamRecipe
    resources: Resources = field(default_factory=Resources)
    splits: int = 1
    superpixel_cache: str | None = None
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
        """``--superpixel-cache``, or ``superpixel_cache`` next to the label file."""
        return self.superpixel_cache or posixpath.join(_labels_folder(self.labels), "superpixel_cache")

    def split_folder(self, split: int) -> str:
        """Where split ``split`` writes: the output itself for a single split."""
        return _split_folder(self.output, self.splits, split)


# Options of one trainer only: (dest, flag, default). Given for the other model they are refused, not ignored.
DGIQA_ONLY = (("depth_weights", "--depth-weights", None), ("depth_cache", "--depth-cache", None),
              ("consistency_weight", "--consistency-weight", None), ("crops_per_image", "--crops-per-image", None),
              ("val_crops", "--val-crops", None), ("min_lr", "--min-lr", None), ("freeze_bn", "--freeze-bn", False),
              ("encoder", "--encoder", None), ("depth_version", "--depth-version", None),
              ("depth_input_size", "--depth-input-size", None))
DPAM_ONLY = (("trained_on", "--trained-on", None), ("t_max", "--t-max", None), ("flip_prob", "--flip-prob", None),
             ("superpixel_cache", "--superpixel-cache", None))


def _refuse_other_models_options(args: argparse.Namespace, others: tuple, model: str) -> None:
    for dest, flag, default in others:
        if getattr(args, dest, default) != default:
            raise ValueError(f"{flag} is not used by dgiqa train --model {model}")


def _common(args: argparse.Namespace) -> tuple[LabelSource, Resources]:
    if args.label_range is not None and not args.label_range[0] < args.label_range[1]:
        raise ValueError(f"--label-range needs LO < HI, got {args.label_range[0]:g},{args.label_range[1]:g}")
    labels = LabelSource(path=args.labels, layout=args.layout, images_prefix=args.images_prefix,
                         label_column=args.label_column, uri_column=args.uri_column,
                         lower_is_better=args.lower_is_better, keep_training_images=args.keep_training_images,
                         label_range=tuple(args.label_range) if args.label_range else None)
    resources = Resources(workers=args.workers, gpus_per_worker=args.gpus, cpus_per_worker=args.cpus_per_worker,
                          loader_workers=args.loader_workers, depth_actors=args.depth_actors,
                          depth_batch=args.depth_batch, max_failures=args.max_failures, ray_storage=args.ray_storage)
    return labels, resources


def _given(value, default):
    return default if value is None else value


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """A ``TrainConfig`` (``--model dgiqa``) from parsed ``add_arguments`` options.

    Raises:
        ValueError: A value out of range, a missing ``--depth-weights``, or a DPAM-only option.
    """
    _refuse_other_models_options(args, DPAM_ONLY, "dgiqa")
    parse_init(args.init)
    if not args.depth_weights:
        raise ValueError("--depth-weights is required for dgiqa train --model dgiqa")
    labels, resources = _common(args)
    recipe = Recipe(init=args.init, epochs=_given(args.epochs, 20), batch_size=_given(args.batch_size, 16), lr=args.lr,
                    min_lr=_given(args.min_lr, 0.0), weight_decay=_given(args.weight_decay, 0.01),
                    consistency_weight=_given(args.consistency_weight, 0.1),
                    crops_per_image=_given(args.crops_per_image, 1), val_crops=_given(args.val_crops, 20),
                    val_fraction=args.val_fraction, seed=args.seed, freeze_backbones=args.freeze_backbones,
                    freeze_bn=args.freeze_bn, baseline=args.baseline,
                    depth_input_size=_given(args.depth_input_size, 518))
    return TrainConfig(labels=labels, output=args.output, depth_weights=args.depth_weights, recipe=recipe,
                       resources=resources, splits=args.splits, encoder=_given(args.encoder, "auto"),
                       depth_version=_given(args.depth_version, "v1"), depth_cache=args.depth_cache,
                       storage_options=args.storage_options or None, allow_prefixes=tuple(args.allow_prefix),
                       max_bytes=args.max_bytes)


def dpam_config_from_args(args: argparse.Namespace) -> DpamTrainConfig:
    """A ``DpamTrainConfig`` (``--model dpam``) from parsed ``add_arguments`` options; the authors' defaults.

    Raises:
        ValueError: A value out of range, or a DGIQA-only option.
    """
    _refuse_other_models_options(args, DGIQA_ONLY, "dpam")
    labels, resources = _common(args)
    defaults = DpamRecipe(init="random")
    recipe = DpamRecipe(init=args.init, epochs=_given(args.epochs, defaults.epochs),
                        batch_size=_given(args.batch_size, defaults.batch_size), lr=_given(args.lr, defaults.lr),
                        weight_decay=_given(args.weight_decay, defaults.weight_decay),
                        t_max=_given(args.t_max, defaults.t_max), flip_prob=_given(args.flip_prob, defaults.flip_prob),
                        val_fraction=args.val_fraction, seed=args.seed, freeze_backbone=args.freeze_backbones,
                        baseline=args.baseline, trained_on=_given(args.trained_on, defaults.trained_on))
    return DpamTrainConfig(labels=labels, output=args.output, recipe=recipe, resources=resources, splits=args.splits,
                           superpixel_cache=args.superpixel_cache, storage_options=args.storage_options or None,
                           allow_prefixes=tuple(args.allow_prefix), max_bytes=args.max_bytes)
