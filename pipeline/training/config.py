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
