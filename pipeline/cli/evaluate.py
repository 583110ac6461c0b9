"""``dgiqa evaluate`` and ``dgiqa separation``: how well scores agree with opinion scores or tell two sets apart."""

from __future__ import annotations

import argparse
from functools import partial

from pipeline.cli.argtypes import add_read_limit_arguments, add_storage_options, non_negative_int, positive_int
from pipeline.cli.label_args import add_label_arguments


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1 (exclusive), got {value}")
    return value


def _run(command: str, args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from pipeline.analysis import evaluate

    return getattr(evaluate, command)(args, parser)


def register(commands: argparse._SubParsersAction) -> None:
    """Add the ``evaluate`` and ``separation`` subcommands to the ``dgiqa`` parser's subcommands."""
    ev = commands.add_parser(
        "evaluate", help="compare scores with human opinion scores (SROCC, PLCC, KROCC, RMSE)",
        description="Join a dataset's opinion scores with a model's scores on URI and report SROCC, PLCC (raw and "
                    "after the VQEG logistic mapping), KROCC and RMSE with bootstrap confidence intervals.")
    add_label_arguments(ev, "generic layout: labels are DMOS-like (correlations then use the negated labels)")
    source = ev.add_mutually_exclusive_group(required=True)
    source.add_argument("--scores", metavar="OUTPUT_URI", help="a scoring job's output root to read scores from")
    source.add_argument("--weights", help="score the labelled images now with this DGIQA checkpoint")
    ev.add_argument("--depth-weights", help="with --weights: the Depth Anything checkpoint")
    ev.add_argument("--output", metavar="URI",
                    help="with --weights: keep the scores in this job output (default: a temporary folder)")
    ev.add_argument("--crops", type=positive_int, default=20, help="with --weights: crops per image (20)")
    ev.add_argument("--depth-input-size", type=positive_int, default=518,
                    help="with --weights: depth-model input side (518 as published)")
    add_read_limit_arguments(ev, "with --weights: the --images-prefix, else the label file's folder")
    ev.add_argument("--model-id", help="with --scores: the model whose scores to use, when the output holds several")
    ev.add_argument("--bootstrap", type=non_negative_int, default=1000, metavar="N",
                    help="bootstrap resamples for the confidence intervals; 0 for none (1000)")
    ev.add_argument("--confidence", type=_fraction, default=0.95, help="confidence interval coverage (0.95)")
    ev.add_argument("--seed", type=int, default=0, help="bootstrap seed, for repeatable intervals (0)")
    ev.add_argument("--json", action="store_true", help="print the result as JSON")
    ev.add_argument("--out", metavar="FILE", help="also write the JSON result here (any fsspec URI)")
    add_storage_options(ev, "labels, images, scores and --out")
    ev.set_defaults(run=partial(_run, "evaluate_command", parser=ev))

    sep = commands.add_parser(
        "separation", help="how well scores separate a high-quality image set from a low-quality one",
        description="Fit a Gaussian to each set's scores; report means, standard deviations, the overlap "
                    "coefficient of the two densities and d'; optionally draw both distributions as SVG.")
    sep.add_argument("--scores", required=True, metavar="OUTPUT_URI", help="a scoring job's output root")
    sep.add_argument("--high", required=True, metavar="MANIFEST", help="manifest of the high-quality images")
    sep.add_argument("--low", required=True, metavar="MANIFEST", help="manifest of the low-quality images")
    sep.add_argument("--model-id", help="the model whose scores to use, when the output holds several")
    sep.add_argument("--plot", metavar="SVG", help="write the histograms and fitted densities here as SVG")
    sep.add_argument("--bins", type=positive_int, default=20, help="histogram bins over [0, 1] (20)")
    sep.add_argument("--json", action="store_true", help="print the result as JSON")
    add_storage_options(sep, "scores, manifests and --plot")
    sep.set_defaults(run=partial(_run, "separation_command", parser=sep))
