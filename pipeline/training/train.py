"""Fine-tune DGIQA on your own opinion scores with Ray Train: ``dgiqa train`` and ``jobs/train.py``.

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
  it is written first, so it is the commit point of an epoch and the derived files are repaired from it
  (``pipeline.training.store``);
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

This module is the driver: it checks the output, reads the labels and weights, fills the depth cache, starts one
``TorchTrainer`` per split and writes the summary. The parts it drives: ``config`` (the settings), ``init`` (the
model training starts from), ``loop`` (what every worker runs), ``store`` (the files of a run and their commit
order) and ``train_data`` (label map, depth cache, crops, splits), all in ``pipeline.training``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from pipeline.analysis.labels import (
    GROUP_COLUMN,
    Labels,
    default_allow_prefixes,
    read_labels,
)
from pipeline.analysis.metrics import finite_or_none
from pipeline.batch.allowlist import Allowlist, redact_text, redact_uri
from pipeline.batch.output import check_writable
from pipeline.scoring.scorer import read_depth_weights
from pipeline.training.config import Resources, TrainConfig, config_from_args
from pipeline.training.init import build_initial_model
from pipeline.training.loop import WorkerPlan, train_worker
from pipeline.training.store import BEST, LAST, METRICS_FILE, STATE_FILE, SUMMARY_FILE, RunStore
from pipeline.training.train_data import (
    UNUSABLE,
    DepthCache,
    DepthWorkers,
    ImageAccess,
    LabelMap,
    label_map_for,
    precompute_depth,
    split_indices,
)

logger = logging.getLogger(__name__)

EXIT_USAGE, EXIT_RUN_FAILED = 2, 1


class TrainError(RuntimeError):
    """The training run failed after it started; finished epochs are kept and a rerun resumes after them."""


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


def _fit(plan: WorkerPlan, resources: Resources, worker=train_worker, name: str = "dgiqa") -> None:
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    per_worker = {"CPU": resources.cpus_per_worker}
    if resources.gpus_per_worker:
        per_worker["GPU"] = resources.gpus_per_worker
    scaling = ScalingConfig(num_workers=resources.workers, use_gpu=resources.gpus_per_worker > 0,
                            resources_per_worker=per_worker)
    run = RunConfig(name=f"{name}-train-split{plan.split}-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S%f}",
                    storage_path=resources.ray_storage,
                    failure_config=FailureConfig(max_failures=resources.max_failures))
    trainer = TorchTrainer(worker, train_loop_config={"plan": plan}, scaling_config=scaling, run_config=run)
    try:
        trainer.fit()
    except Exception as exc:  # noqa: BLE001 - Ray wraps worker errors in several types; reported in one line
        raise TrainError(f"training split {plan.split} failed: {redact_text(failure_cause(exc))}. Finished epochs "
                         f"are kept in {redact_uri(plan.folder)}; rerun with the same --output to resume after "
                         "them") from exc


def failure_cause(exc: BaseException) -> str:
    """One line saying why a ``trainer.fit()`` failed, naming every worker's own cause.

    When one worker dies (Ray's memory monitor, a crash), Ray Train removes the group's placement group and the
    other workers end with "placement group was removed": the last line of the whole message is often that
    consequence, not the cause. A ``WorkerGroupError`` keeps each rank's exception; the ranks that share a cause
    are listed together.
    """
    failures = getattr(exc, "worker_failures", None)
    if not isinstance(failures, Mapping) or not failures:
        return _last_line(exc)
    ranks_by_cause: dict[str, list[int]] = {}
    for rank in sorted(failures):
        ranks_by_cause.setdefault(_last_line(failures[rank]), []).append(rank)
    return "; ".join(f"worker{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}: {cause}"
                     for cause, ranks in ranks_by_cause.items())


def _last_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


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
    return with_own_ray(lambda: _run_training(config))


def with_own_ray(run: Callable[[], dict]) -> dict:
    """``run()``, then the shutdown of a Ray it started itself; a Ray that was running before is left alone."""
    ray_was_running = _ray_running()
    try:
        return run()
    finally:
        if not ray_was_running and _ray_running():
            import ray

            ray.shutdown()


def _ray_running() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


@dataclass
class TrainingData:
    """The labelled images of a run as the driver reads them (shared by every trainer)."""

    labels: Labels
    access: ImageAccess
    label_map: LabelMap
    uris: list[str]
    raw: list[float]
    targets: np.ndarray
    splits: list[tuple[np.ndarray, np.ndarray]]

    @property
    def digest(self) -> str:
        """What a resumed run must find unchanged (``_labels_digest``)."""
        return _labels_digest(self.uris, self.raw, self.labels.groups)


def read_training_data(config) -> TrainingData:
    """Read the labels, map them to targets, fix the allowlist and draw every split.

    Raises:
        LabelError: The labels cannot be used.
        ValueError: The splits leave too few images.
    """
    source, recipe, options = config.labels, config.recipe, config.storage_options
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
    return TrainingData(labels, access, label_map, uris, raw, targets, splits)


def check_resumable(config, base_settings: Mapping) -> tuple[list[RunStore], list[dict | None]]:
    """The stores and committed states of every split; a state of other settings is refused.

    Raises:
        ValueError: A split's folder holds a run with other settings (the message names them).
    """
    stores = [RunStore(config.split_folder(k), config.storage_options) for k in range(config.splits)]
    states = [store.read_state() for store in stores]
    for k, state in enumerate(states):
        settings = {**base_settings, "split": k, "split_seed": config.recipe.seed + k}
        if state is not None and state["settings"] != settings:
            changed = ", ".join(_differences(state["settings"], settings)) or "format"
            raise ValueError(f"{stores[k].folder} holds a training run with other settings (changed: {changed}); "
                             "rerun with the same settings to resume it, or choose a new --output")
    return stores, states


def train_splits(config, data: TrainingData, cached: Mapping[str, Mapping], cache_stats: Mapping,
                 base_settings: Mapping, sidecar_base: Mapping, stores: Sequence[RunStore],
                 states: Sequence[dict | None], path_key: str, worker, name: str) -> list[dict]:
    """Train (or resume) every split on its usable images; returns the split summaries.

    ``cached`` maps each URI to its cache row (``status`` and the cached file under ``path_key``); items are
    ``(uri, target, cached file)``.

    Raises:
        ValueError: A split has too few usable images.
        TrainError: Training failed after it started.
    """
    recipe, uris, targets = config.recipe, data.uris, data.targets
    usable = {uri for uri, row in cached.items() if row["status"] not in UNUSABLE}
    summaries = []
    for k, (train_idx, val_idx) in enumerate(data.splits):
        def items(indices: np.ndarray) -> list[tuple[str, float, str]]:
            return [(uris[i], float(targets[i]), cached[uris[i]][path_key]) for i in indices if uris[i] in usable]

        train_items, val_items = items(train_idx), items(val_idx)
        if len(val_items) < 3 or not train_items:
            skipped = ", ".join(f"{reason} {n}" for reason, n in sorted(cache_stats["skipped_reasons"].items()))
            raise ValueError(f"split {k}: {len(train_items)} training and {len(val_items)} held-out images can be "
                             f"read; at least 1 and 3 are needed (skipped: {skipped or 'none'})")
        settings = {**base_settings, "split": k, "split_seed": recipe.seed + k}
        plan = WorkerPlan(folder=stores[k].folder, split=k, recipe=recipe, train_items=train_items,
                          val_items=val_items, label_map=data.label_map.to_dict(), settings=settings,
                          sidecar={**sidecar_base, "split": k, "split_seed": recipe.seed + k,
                                   "train_images": len(train_items), "val_images": len(val_items)},
                          resources=config.resources, access=data.access, storage_options=config.storage_options)
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
            _fit(plan, config.resources, worker, name)
            logger.info("split %d: trained in %.1f s", k, time.monotonic() - began)
        final = stores[k].read_state()
        if final is None:
            raise TrainError(f"training split {k} finished without writing {stores[k].uri(STATE_FILE)}")
        summaries.append(_split_summary(final, plan, resumed_after, trained_now))
    return summaries


def run_summary(config, data: TrainingData, cached: Mapping[str, Mapping], cache_stats: Mapping,
                split_summaries: list[dict], started: float, **model_fields) -> dict:
    """The run summary (written to ``<output>/summary.json``); ``model_fields`` are the trainer's own entries."""
    usable = [uri for uri, row in cached.items() if row["status"] not in UNUSABLE]
    summary = {
        "output": redact_uri(config.output), "labels": redact_uri(config.labels.path), "layout": data.labels.layout,
        "label_map": data.label_map.to_dict(), **model_fields,
        "allowed_prefixes": list(data.access.allowlist.prefixes), "max_bytes": data.access.max_bytes,
        "images": {"labelled": len(data.uris), "usable": len(usable), "skipped": len(data.uris) - len(usable),
                   "skipped_reasons": cache_stats["skipped_reasons"]},
        "splits": split_summaries,
        "median_best_val_srocc": _median([s["best"]["val_srocc"] if s["best"] else None for s in split_summaries]),
        "median_best_val_plcc": _median([s["best"]["val_plcc"] if s["best"] else None for s in split_summaries]),
        "median_last_val_srocc": _median([s["last"]["val_srocc"] for s in split_summaries]),
        "wall_time_s": round(time.monotonic() - started, 3),
    }
    RunStore(config.output, config.storage_options).write_json(SUMMARY_FILE, summary)
    return finite_or_none(summary)


def _run_training(config: TrainConfig) -> dict:
    started = time.monotonic()
    source, recipe, options = config.labels, config.recipe, config.storage_options
    # Where the run writes is checked before labels and weights are read: seconds, not minutes on S3.
    check_writable(config.output, options, flag="--output")
    if config.depth_cache:
        check_writable(config.depth_cache, options, flag="--depth-cache")
    data = read_training_data(config)
    _, init_info = build_initial_model(recipe.init, options, materialize=False)
    depth_weights = read_depth_weights(config.depth_weights, config.encoder, config.depth_version, options)
    preprocess = recipe.preprocess()
    base_settings = {
        "labels": {**asdict(source), "label_range": list(source.label_range) if source.label_range else None,
                   "digest": data.digest},
        "label_map": asdict(data.label_map), "recipe": asdict(recipe), "depth_model": depth_weights.label,
        "preprocess": {"short_side": preprocess.short_side, "crop_size": preprocess.crop_size,
                       # The key keeps its old name: runs recorded before the rename resume without a difference.
                       "depth_lower_bound": preprocess.depth_input_size, "crop_seed": preprocess.seed},
    }
    stores, states = check_resumable(config, base_settings)

    workers = _depth_workers(config.resources)
    if workers.actors:
        _init_ray()
    cache = DepthCache(config.cache_root, depth_weights.label, preprocess, options)
    depth, depth_stats = precompute_depth(data.uris, depth_weights, cache, workers, access=data.access)

    sidecar_base = {"format": "dgiqa-train/1", "labels": redact_uri(source.path), "layout": data.labels.layout,
                    "label_column": data.labels.label_column, "label_map": data.label_map.to_dict(),
                    "init": init_info, "depth_model": depth_weights.label, "preprocess": base_settings["preprocess"],
                    "recipe": asdict(recipe), "key_layout": "published DGIQA state_dict (dgiqa score --weights)"}
    split_summaries = train_splits(config, data, depth, depth_stats, base_settings, sidecar_base, stores, states,
                                   "depth_path", train_worker, "dgiqa")
    return run_summary(config, data, depth, depth_stats, split_summaries, started, init=init_info,
                       depth_model=depth_weights.label, depth_cache=depth_stats)


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
