"""The model training starts from (``--init``): a published DGIQA checkpoint, ImageNet Swin-T weights, or random.

A ``dgiqa:URI`` checkpoint is loaded strictly in the published key layout. A ``swin:URI`` checkpoint is a timm
``swin_tiny_patch4_window7_224`` classifier state dict; its keys are remapped in one named function
(``swin_backbone_state``) to DGIQA's features-only backbone and loaded into both Swin branches (the image's and the
depth map's), its classifier's final norm and head dropped. Everything not loaded is initialised from ``seed``, so the
same settings give the same starting weights.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping

import torch

from pipeline.models.dgiqa import DGIQA, checkpoint_filter_fn
from pipeline.scoring.weights import WeightsError, check_fits, load_strict, read_checkpoint
from pipeline.training.config import parse_init

logger = logging.getLogger(__name__)

# Keys of a timm Swin-T classifier that the features-only backbones do not have: the final norm and the head.
SWIN_CLASSIFIER_PREFIXES = ("head.", "norm.")


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
