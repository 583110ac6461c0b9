"""The loop every Ray Train worker runs: resume or initialise, train an epoch, evaluate, commit (rank 0).

Each worker is one DDP process (``ray.train.torch.prepare_model``). It trains on its share of every epoch's crops,
with ``ceil(batch_size / workers)`` crops per step, and scores its share of the held-out images, gathering every
score on every worker. Only rank 0 writes (``pipeline.training.store``).

Randomness is drawn from seed, split, epoch and rank (crop positions and flips in ``train_data.CropDataset``, dropout
masks here), so a resumed epoch draws the crops and dropout masks an uninterrupted run would have, with no generator
state to carry. Evaluation follows the inference protocol, so the held-out SROCC is the one ``dgiqa evaluate`` would
report for the same images.
"""

from __future__ import annotations

import datetime as dt
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.analysis.metrics import plcc, srocc
from pipeline.models.dgiqa import DGIQA, build_dgiqa
from pipeline.scoring.preprocess import PreprocessConfig
from pipeline.training.config import Recipe, Resources
from pipeline.training.init import build_initial_model
from pipeline.training.store import BEST, LAST, STATE_FORMAT, RunStore, epoch_sidecar
from pipeline.training.train_data import CropDataset, EvalDataset, ImageAccess, epoch_order


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


def seed_of(*words: int) -> int:
    """A 32-bit seed from several integers (seed, split, epoch, rank...)."""
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


def val_metrics(predictions: Sequence[float], items: Sequence[tuple[str, float, str]]) -> dict:
    """Held-out SROCC and PLCC of ``predictions`` against the items' targets."""
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
    torch.manual_seed(seed_of(*words, rank))  # dropout masks: a resumed epoch draws what the first attempt drew
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


def worker_context(plan: WorkerPlan) -> tuple[int, int, torch.device]:
    """The Ray Train worker's rank, world size and device (a CPU worker takes its share of threads)."""
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(plan.resources.cpus_per_worker)))
    return context.get_world_rank(), context.get_world_size(), device


def run_epochs(plan: WorkerPlan, state: Mapping | None, core: nn.Module, optimizer: torch.optim.Optimizer,
               scheduler: torch.optim.lr_scheduler.LRScheduler, train_epoch: Callable[[int], dict],
               held_out: Callable[[], dict], rank: int, *, scheduler_per_epoch: bool = True) -> None:
    """The epochs every trainer shares: the untrained baseline, then train, evaluate and commit each epoch.

    ``state`` is the committed state of a resumed run (None for a new one). ``train_epoch(epoch)`` trains one
    epoch and returns its averages; ``held_out()`` returns the held-out metrics. The scheduler steps once an
    epoch here, or inside ``train_epoch`` (``scheduler_per_epoch=False``). Rank 0 writes each finished epoch in
    ``pipeline.training.store``'s commit order; every rank reports it to Ray Train.
    """
    import ray.train

    recipe = plan.recipe
    store = RunStore(plan.folder, plan.storage_options)
    history: list[dict] = list(state["history"]) if state else []
    best = state["best"] if state else None
    start = state["epoch"] + 1 if state else 1
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
        train = train_epoch(epoch)
        if scheduler_per_epoch:
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
            sha256 = store.write_weights(LAST, weights, epoch_sidecar(plan.sidecar, record))
            if improved:
                store.copy_weights(LAST, BEST, sha256, epoch_sidecar(plan.sidecar, record))
            store.write_metrics(history, plan.label_map)
        ray.train.report({k: v for k, v in record.items() if isinstance(v, int | float) and v is not None})


@dataclass
class WorkerStart:
    """A worker ready for ``run_epochs``: its place, the committed state (None for a new run) and its model."""

    rank: int
    world: int
    device: torch.device
    state: dict | None
    model: nn.Module  # the DDP wrapper with several workers, else ``core``
    core: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler


def start_worker(plan: WorkerPlan, initial: Callable[[], nn.Module], empty: Callable[[], nn.Module],
                 mark_trainable: Callable[[nn.Module], object],
                 make: Callable[[nn.Module], tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]],
                 ) -> WorkerStart:
    """Resume from the committed state or start from ``initial()``, then make the optimizer and scheduler.

    A resumed worker fills ``empty()`` with the state, and rank 0 repairs the files derived from it. What trains
    is marked (``mark_trainable``) before DDP registers it.
    """
    import ray.train.torch

    rank, world, device = worker_context(plan)
    store = RunStore(plan.folder, plan.storage_options)
    state = store.read_state()
    if state is None:
        core = initial()
    else:
        core = empty()
        core.load_state_dict(state["model"])
        if rank == 0:
            store.repair(state, plan.sidecar, plan.label_map)
    mark_trainable(core)
    model = ray.train.torch.prepare_model(core)
    core = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    optimizer, scheduler = make(core)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    return WorkerStart(rank, world, device, state, model, core, optimizer, scheduler)


def train_worker(loop_config: Mapping) -> None:
    """The loop every Ray Train worker runs: resume or initialise, train, evaluate, commit each epoch."""
    plan: WorkerPlan = loop_config["plan"]
    recipe = plan.recipe
    seed = seed_of(recipe.seed, plan.split)
    start = start_worker(plan, lambda: build_initial_model(recipe.init, plan.storage_options, seed=seed)[0],
                         build_dgiqa, lambda core: trainable_parameters(core, recipe.freeze_backbones),
                         lambda core: make_optimizer(core, recipe))
    rank, world, device, core, model = start.rank, start.world, start.device, start.core, start.model
    preprocess = recipe.preprocess()

    def held_out() -> dict:
        predictions = evaluate(core, plan.val_items, preprocess, device, rank, world,
                               plan.resources.loader_workers, plan.storage_options, access=plan.access)
        return val_metrics(predictions, plan.val_items)

    run_epochs(plan, start.state, core, start.optimizer, start.scheduler,
               lambda epoch: _train_epoch(model, core, start.optimizer, plan, epoch, rank, world, device), held_out,
               rank)
