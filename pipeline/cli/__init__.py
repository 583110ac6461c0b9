"""The ``dgiqa`` command: one module per subcommand, each adding its parser and running it.

Parsers are built from light modules only (the registry's specs, argument types, limits); each command imports
torch, Ray, Arrow or the models when it runs, so ``--help`` and a bad flag answer at once. Bad arguments and
unusable weights end every command with one line naming the problem, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pipeline.batch.allowlist import error_line
from pipeline.cli import evaluate, report, score, train
from pipeline.cli import filter as filter_scores
from pipeline.cli.score import EXIT_IMAGE_FAILED

EXIT_USAGE = 2
__all__ = ["EXIT_IMAGE_FAILED", "EXIT_USAGE", "build_parser", "error_line", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The ``dgiqa`` argument parser."""
    parser = argparse.ArgumentParser(prog="dgiqa", description="DGIQA image-quality scores for photo libraries.")
    commands = parser.add_subparsers(dest="command", required=True)
    for module in (score, filter_scores, report, evaluate, train):
        module.register(commands)
    score.register_sample(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``dgiqa``; returns the exit code (0 ok, 1 some image failed, 2 unusable arguments or weights)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, OSError) as exc:
        # WeightsError, OutputError and config errors are ValueErrors: one line naming the problem, no traceback.
        print(f"dgiqa: error: {error_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
