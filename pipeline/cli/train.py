"""``dgiqa train`` (and ``jobs/train.py``): train DGIQA or DPAM-IQA on opinion scores with Ray Train."""

from __future__ import annotations

import argparse
import contextlib

from pipeline.cli.argtypes import (
    add_read_limit_arguments,
    add_storage_options,
    float_pair,
    non_negative_int,
    positive_int,
)
from pipeline.cli.label_args import add_label_arguments
from pipeline.scorers.registry import SCORER_OPTIONS, get_scorer, resolve, trainable_scorers


def _init_arg(text: str) -> str:
    """A spec one of the trainers takes; which one fits ``--model`` is checked once the model is known."""
    from pipeline.training.config import parse_dpam_init, parse_init

    for parse in (parse_init, parse_dpam_init):
        with contextlib.suppress(ValueError):
            parse(text)
            return text
    raise argparse.ArgumentTypeError(f"--init must be dgiqa:URI, swin:URI or random (--model dgiqa), or dpam:URI, "
                                     f"vit:URI or random (--model dpam); got {text!r}")


def run(args: argparse.Namespace, prog: str = "dgiqa") -> int:
    """Train from parsed options with the trainer the scorer's spec names; returns the exit code."""
    return resolve(get_scorer(args.model).trainer)(args, prog=prog)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The training options, shared by ``dgiqa train`` and ``jobs/train.py``."""
    data = parser.add_argument_group("labels and images")
    add_label_arguments(data, "generic layout: labels are DMOS-like; they are flipped (1 - x) for training")
    data.add_argument("--label-range", type=float_pair, metavar="LO,HI",
                      help="map LO..HI to 0..1 (default: the layout's published scale; generic: min-max)")
    add_storage_options(data, "every URI")
    add_read_limit_arguments(data, "the --images-prefix, else the label file's folder")

    out = parser.add_argument_group("models and output")
    out.add_argument("--model", default=trainable_scorers()[0], choices=trainable_scorers(),
                     help="which scorer to train (the registry's scorers that train: "
                          f"{', '.join(trainable_scorers())})")
    out.add_argument("--output", required=True, metavar="URI",
                     help="folder or fsspec URI for checkpoints, metrics and summary; a rerun resumes there")
    out.add_argument("--init", required=True, type=_init_arg, metavar="SPEC",
                     help="dgiqa: dgiqa:URI (a published DGIQA checkpoint), swin:URI (timm Swin-T ImageNet "
                          "classifier weights, loaded into both branches) or random; dpam: dpam:URI (the authors' "
                          "checkpoint layout), vit:URI (timm vit_base_patch8_224 weights, as the authors start) or "
                          "random")
    out.add_argument("--depth-weights", metavar="URI",
                     help="URI of the Depth Anything checkpoint (dgiqa only, required there)")
    out.add_argument("--encoder", choices=SCORER_OPTIONS["encoder"].choices,
                     help="Depth Anything encoder; auto reads it from the checkpoint (dgiqa only; auto)")
    out.add_argument("--depth-version", choices=SCORER_OPTIONS["depth_version"].choices,
                     help="Depth Anything version (dgiqa only; v1)")
    out.add_argument("--depth-input-size", type=positive_int,
                     help="lower bound of the depth-model input side (dgiqa only; 518 as published; smaller is "
                          "faster and gives other maps)")
    out.add_argument("--depth-cache", metavar="URI",
                     help="depth-map cache root (dgiqa only; default: depth_cache next to the label file)")
    out.add_argument("--trained-on", choices=SCORER_OPTIONS["trained_on"].choices,
                     help="dpam only: which of the authors' loaders prepares the images (whole image or random "
                          "224 px crops, SLIC settings), as dgiqa score --trained-on scores them (livec)")
    out.add_argument("--superpixel-cache", metavar="URI",
                     help="dpam only: superpixel-feature cache root (default: superpixel_cache next to the label "
                          "file)")

    hp = parser.add_argument_group("recipe (defaults: dgiqa's, then dpam's, the authors')")
    hp.add_argument("--epochs", type=positive_int, help="epochs (20; dpam 200)")
    hp.add_argument("--batch-size", type=positive_int,
                    help="crops (dpam: images) per optimizer step over all workers (16; dpam 12)")
    hp.add_argument("--lr", type=float,
                    help="peak learning rate (2e-5 with --init dgiqa:, else 1e-4; dpam 1e-5)")
    hp.add_argument("--min-lr", type=float, help="learning rate at the end of the cosine (dgiqa only; 0)")
    hp.add_argument("--weight-decay", type=float,
                    help="weight decay: AdamW's (0.01), dpam Adam's L2 as the authors (1e-5)")
    hp.add_argument("--t-max", type=positive_int,
                    help="dpam only: the cosine's half period in optimizer steps, stepped every batch (50)")
    hp.add_argument("--flip-prob", type=float, help="dpam only: probability of a horizontal flip (0.7)")
    hp.add_argument("--consistency-weight", type=float, metavar="LAMBDA",
                    help="weight of the hflip-consistency loss (dgiqa only; 0.1; 0 turns it off)")
    hp.add_argument("--crops-per-image", type=positive_int,
                    help="random crops per image per epoch (dgiqa only; 1)")
    hp.add_argument("--val-crops", type=positive_int,
                    help="crops per held-out image, at inference's fixed positions (dgiqa only; 20)")
    hp.add_argument("--val-fraction", type=float, default=0.2, help="share of images held out (0.2)")
    hp.add_argument("--splits", type=positive_int, default=1,
                    help="random splits with seeds SEED..SEED+K-1, each in split_<k>/, median reported (1)")
    hp.add_argument("--seed", type=int, default=0, help="seed of the split, initialisation and crops (0)")
    hp.add_argument("--freeze-backbones", action="store_true",
                    help="keep the backbones fixed: dgiqa trains the bridges, attention and head only, dpam all but "
                         "the ViT (small datasets, fast CPU trials)")
    hp.add_argument("--freeze-bn", action="store_true",
                    help="keep BatchNorm layers on their running statistics (dgiqa only; small batches)")
    hp.add_argument("--no-baseline", dest="baseline", action="store_false",
                    help="skip evaluating the untrained model (epoch 0 of the metrics log)")

    ray_group = parser.add_argument_group("cluster")
    ray_group.add_argument("--workers", type=positive_int, default=1, help="Ray Train workers (1)")
    ray_group.add_argument("--gpus", type=float, default=0.0, help="GPUs per worker; 0 trains on CPUs (0)")
    ray_group.add_argument("--cpus-per-worker", type=float, default=2.0, help="CPUs per worker (2)")
    ray_group.add_argument("--loader-workers", type=non_negative_int, default=2,
                           help="image-decoding processes per worker (2; 0 decodes in the training loop)")
    ray_group.add_argument("--depth-actors", type=non_negative_int,
                           help="actors computing missing depth maps (dpam: superpixel features) (default: --workers; "
                                "0 on the driver)")
    ray_group.add_argument("--depth-batch", type=positive_int, default=4, help="depth inputs per forward pass (4)")
    ray_group.add_argument("--max-failures", type=non_negative_int, default=0,
                           help="worker failures to recover from, resuming after the last finished epoch (0)")
    ray_group.add_argument("--ray-storage", metavar="URI",
                           help="Ray Train's storage_path for its run records (default: Ray's)")
    return parser


def register(commands: argparse._SubParsersAction) -> None:
    """Add the ``train`` subcommand to the ``dgiqa`` parser's subcommands."""
    train = commands.add_parser(
        "train", help="train DGIQA or DPAM-IQA on labelled images with Ray Train (checkpoints, metrics, resume)",
        description="Train DGIQA (fine-tune) or DPAM-IQA on opinion scores with Ray Train; a rerun with the same "
                    "--output resumes.",
        epilog="See pipeline/training/train.py (dgiqa) and pipeline/training/dpam_train.py (dpam) for the recipes "
               "and their defaults.")
    add_arguments(train)
    train.set_defaults(run=run)


