"""Evaluation job: ``ray job submit --working-dir . -- python jobs/evaluate.py LABELS --layout ... --scores ...``.

Runs ``dgiqa evaluate`` with the same arguments (see ``dgiqa evaluate --help``): compare a model's scores with
a dataset's human opinion scores, reading them from a job output (``--scores``) or scoring the labelled images
on the cluster first (``--weights``/``--depth-weights``). Exit codes: 0 done, 1 the scoring run failed,
2 unusable arguments, labels or scores.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the submitted working dir's own `pipeline`

import pipeline.cli  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """Run ``dgiqa evaluate`` with ``argv`` (default: this script's arguments); returns the exit code."""
    return pipeline.cli.main(["evaluate", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
