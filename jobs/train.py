"""Training job: ``ray job submit --working-dir . -- python jobs/train.py LABELS --output ... --init ...``.

Trains DGIQA (``--model dgiqa``, the default) or DPAM-IQA (``--model dpam``): parses the arguments of ``dgiqa train``
and runs the trainer the model's registry entry names (the recipes, their defaults and the output files are
described in ``pipeline/training/train.py``, ``pipeline/training/dpam_train.py`` and ``--help``). Run directly
(``python jobs/train.py``) it joins the Ray cluster named by ``RAY_ADDRESS`` or started on this machine with
``ray start``, or starts a local one.
Rerun with the same ``--output`` to resume after the last finished epoch.

Exit codes: 0 trained (the summary is printed as JSON), 1 training failed after it started (finished epochs
are kept), 2 unusable arguments, labels or weights.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the submitted working dir's own `pipeline`

from pipeline.cli import error_line  # noqa: E402
from pipeline.cli.train import add_arguments, run  # noqa: E402

PROG = "train.py"


def build_parser() -> argparse.ArgumentParser:
    """Arguments of the job (the same as ``dgiqa train``)."""
    return add_arguments(argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0]))


def main(argv: list[str] | None = None) -> int:
    """Run the job; returns the exit code."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return run(args, prog=PROG)
    except (ValueError, OSError) as exc:  # LabelError, WeightsError, OutputError and bad settings are ValueErrors
        print(f"{PROG}: error: {error_line(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
