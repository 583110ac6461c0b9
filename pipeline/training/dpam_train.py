"""Train DPAM-IQA on your own opinion scores with Ray Train: ``dgiqa train --model dpam``.

The authors publish DPAM-IQA's code and training script but no checkpoints yet, so training it is how a user gets
one. The defaults are the authors' recipe (``train_maniqa.py``): MSE loss on the labels mapped to [0, 1], Adam
with learning rate 1e-5 and L2 weight decay 1e-5, a cosine schedule of half period 50 *optimizer steps* (the
authors step it after every batch, so the rate falls to 0 and rises again every 100 steps), 12 images a step, 200
epochs, a horizontal flip with probability 0.7, and for the synthetic sets' presets one random 224x224 crop per
image and epoch (``pipeline.training.dpam_data``). The authors start from ImageNet ViT-B/8 weights
(``--init vit:URI``, a timm ``vit_base_patch8_224`` state dict) and train everything; ``--freeze-backbones`` keeps
the ViT fixed. The ViT's last two blocks, final norm and classifier take no part in the score, so they never
change (the authors' optimizer skips them too, having no gradient for them).

Everything else is DGIQA's training (``pipeline.training.train``), shared: the label layouts and their map to
[0, 1], the allowlist and byte limit, the grouped held-out split, Ray Train workers, one commit per epoch and
resume after a kill (``pipeline.training.store``), ``best.pth`` / ``last.pth`` with sidecars, the metrics log and
the summary. The checkpoints are plain state dicts in the authors' key layout, which ``dgiqa score --model dpam``
(and their own code) load. Held-out images are scored as ``dgiqa score --model dpam --trained-on PRESET`` scores
them, so the held-out SROCC is the one ``dgiqa evaluate`` would report.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.batch.allowlist import redact_text, redact_uri
from pipeline.batch.output import check_writable
from pipeline.models.dpam import DPAM, VIT_FEATURE_BLOCKS, checkpoint_filter_fn
from pipeline.scoring.dpam_preprocess import to_tensors
from pipeline.scoring.weights import check_fits, load_strict, read_checkpoint
from pipeline.training.config import DpamRecipe, DpamTrainConfig, dpam_config_from_args, parse_dpam_init
from pipeline.training.dpam_data import DpamEvalDataset, DpamTrainDataset, SuperpixelCache, SuperpixelMapper
from pipeline.training.loop import WorkerPlan, _world, run_epochs, seed_of, start_worker, val_metrics
from pipeline.training.train import (
    EXIT_RUN_FAILED,
    TrainError,
    _depth_workers,
    _init_ray,
    check_resumable,
    read_training_data,
    run_summary,
    train_splits,
    with_own_ray,
)
from pipeline.training.train_data import epoch_order, precompute_depth


def build_initial_dpam(init: str, storage_options: Mapping | None = None, seed: int = 0,
                       materialize: bool = True) -> tuple[DPAM, dict]:
    """The model training starts from (``--init``), and what it came from.

    ``dpam:URI`` loads the authors' layout strictly; ``vit:URI`` loads a timm ``vit_base_patch8_224`` state dict
    strictly into the ViT; everything not loaded is initialised from ``seed``. ``materialize=False`` checks the
    weights against a model on the meta device.

    Raises:
        WeightsError: The weights cannot be read or do not fit (keys named).
    """
    kind, uri = parse_dpam_init(init)
    torch.manual_seed(seed)
    with contextlib.nullcontext() if materialize else torch.device("meta"):
        model = DPAM()
    info = {"init": init, "kind": kind, "path": None, "sha256": None}
    if kind == "random":
        return model, info
    ckpt = read_checkpoint(uri, storage_options)
    info.update(path=ckpt.path, sha256=ckpt.sha256)
    load = load_strict if materialize else check_fits
    if kind == "dpam":
        load(model, ckpt.state_dict, f"DPAM-IQA (--init dpam:{ckpt.path})", checkpoint_filter_fn)
    else:
        load(model.vit, ckpt.state_dict, f"ViT-B/8 (--init vit:{ckpt.path})")
    return model, info


def trainable_parameters(model: DPAM, freeze_backbone: bool) -> list[nn.Parameter]:
    """Mark what does not train (the ViT's unused tail; the whole ViT when frozen); return what does."""
    vit = model.vit
    vit.requires_grad_(not freeze_backbone)
    for unused in (*vit.blocks[VIT_FEATURE_BLOCKS[-1] + 1:], vit.norm, vit.head):
        unused.requires_grad_(False)
    return [p for p in model.parameters() if p.requires_grad]


def make_optimizer(model: DPAM, recipe: DpamRecipe,
                   ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """Adam with L2 decay, and the cosine of half period ``t_max`` steps (stepped after every batch)."""
    optimizer = torch.optim.Adam(trainable_parameters(model, recipe.freeze_backbone), lr=recipe.lr,
                                 weight_decay=recipe.weight_decay)
    return optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=recipe.t_max, eta_min=0.0)


@torch.inference_mode()
def evaluate(model: DPAM, plan: WorkerPlan, device: torch.device, rank: int = 0, world: int = 1) -> list[float]:
    """Held-out scores as ``dgiqa score --model dpam`` computes them (the mean over the preset's crops)."""
    model.eval()
    recipe = plan.recipe
    dataset = DpamEvalDataset(plan.val_items, range(rank, len(plan.val_items), world), recipe.trained_on,
                              plan.storage_options, access=plan.access)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=plan.resources.loader_workers)
    scores: dict[int, float] = {}
    for index, prepared in loader:
        out = model(*to_tensors([prepared], device)).float().cpu().numpy().astype(np.float64)
        scores[int(index)] = float(out.mean())
    dist = _world()
    if dist is not None:
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, scores)
        scores = {k: v for part in gathered for k, v in part.items()}
    return [scores[i] for i in range(len(plan.val_items))]


def _train_epoch(model: nn.Module, core: DPAM, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, plan: WorkerPlan, epoch: int, rank: int,
                 world: int, device: torch.device) -> dict:
    recipe = plan.recipe
    words = (recipe.seed, plan.split, epoch)
    torch.manual_seed(seed_of(*words, rank))  # dropout masks: a resumed epoch draws what the first attempt drew
    dataset = DpamTrainDataset(plan.train_items, epoch_order(len(plan.train_items), 1, words, rank, world), words,
                               recipe.trained_on, recipe.flip_prob, plan.storage_options, access=plan.access)
    loader = torch.utils.data.DataLoader(dataset, batch_size=math.ceil(recipe.batch_size / world), shuffle=False,
                                         num_workers=plan.resources.loader_workers, pin_memory=device.type == "cuda")
    model.train()
    if recipe.freeze_backbone:
        core.vit.eval()
    sums = torch.zeros(2, dtype=torch.float64)
    for rgb, texture, superpixels, target in loader:
        pred = model(rgb.to(device), texture.to(device), superpixels.to(device))
        loss = F.mse_loss(pred, target.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()  # per batch, as the authors do
        sums += torch.tensor([loss.item() * len(target), len(target)], dtype=torch.float64)
    dist = _world()
    if dist is not None:
        dist.all_reduce(sums)
    count = max(sums[1].item(), 1.0)
    return {"train_loss": sums[0].item() / count, "train_mse": sums[0].item() / count, "train_consistency": None,
            "train_crops": int(sums[1].item())}


def train_worker(loop_config: Mapping) -> None:
    """The loop every Ray Train worker runs for DPAM-IQA (``loop.run_epochs`` with DPAM's model and data)."""
    plan: WorkerPlan = loop_config["plan"]
    recipe = plan.recipe
    seed = seed_of(recipe.seed, plan.split)
    start = start_worker(plan, lambda: build_initial_dpam(recipe.init, plan.storage_options, seed=seed)[0], DPAM,
                         lambda core: trainable_parameters(core, recipe.freeze_backbone),
                         lambda core: make_optimizer(core, recipe))
    rank, world, device, core = start.rank, start.world, start.device, start.core
    run_epochs(plan, start.state, core, start.optimizer, start.scheduler,
               lambda epoch: _train_epoch(start.model, core, start.optimizer, start.scheduler, plan, epoch, rank,
                                          world, device),
               lambda: val_metrics(evaluate(core, plan, device, rank, world), plan.val_items), rank,
               scheduler_per_epoch=False)


def run_dpam_training(config: DpamTrainConfig) -> dict:
    """Train (or resume) every split of a DPAM-IQA run; returns the summary (also in ``<output>/summary.json``).

    Raises:
        LabelError, WeightsError, OutputError, ValueError: As ``train.run_training``, before any training.
        TrainError: Training failed after it started (rerun to resume).
    """
    return with_own_ray(lambda: _run(config))


def _run(config: DpamTrainConfig) -> dict:
    started = time.monotonic()
    source, recipe, options = config.labels, config.recipe, config.storage_options
    check_writable(config.output, options, flag="--output")
    if config.superpixel_cache:
        check_writable(config.superpixel_cache, options, flag="--superpixel-cache")
    data = read_training_data(config)
    _, init_info = build_initial_dpam(recipe.init, options, materialize=False)
    base_settings = {
        "model": "dpam",
        "labels": {**asdict(source), "label_range": list(source.label_range) if source.label_range else None,
                   "digest": data.digest},
        "label_map": asdict(data.label_map), "recipe": asdict(recipe),
    }
    stores, states = check_resumable(config, base_settings)

    workers = _depth_workers(config.resources)
    if workers.actors:
        _init_ray()
    cache = SuperpixelCache(config.cache_root, recipe.trained_on, options)
    features, stats = precompute_depth(data.uris, None, cache, workers, access=data.access, mapper=SuperpixelMapper,
                                       what="superpixel features")

    sidecar_base = {"format": "dgiqa-train/1", "model": "dpam", "labels": redact_uri(source.path),
                    "layout": data.labels.layout, "label_column": data.labels.label_column,
                    "label_map": data.label_map.to_dict(), "init": init_info, "recipe": asdict(recipe),
                    "key_layout": "the DPAM-IQA authors' state_dict (dgiqa score --model dpam --weights)"}
    split_summaries = train_splits(config, data, features, stats, base_settings, sidecar_base, stores, states,
                                   "depth_path", train_worker, "dpam")
    return run_summary(config, data, features, stats, split_summaries, started, model="dpam", init=init_info,
                       trained_on=recipe.trained_on, superpixel_cache=stats)


def run_command(args: argparse.Namespace, prog: str = "dgiqa") -> int:
    """``dgiqa train --model dpam``: train from parsed options and print the summary as JSON; the exit code."""
    config = dpam_config_from_args(args)
    try:
        summary = run_dpam_training(config)
    except TrainError as exc:
        print(f"{prog}: run failed: {redact_text(str(exc))}", file=sys.stderr)
        return EXIT_RUN_FAILED
    print(json.dumps(summary, indent=2, sort_keys=True), flush=True)
    return 0
