"""Select scored images into a manifest: ``python jobs/filter_scores.py OUTPUT --min-score 0.6 --out keep.parquet``.

The same as ``dgiqa filter`` (see ``dgiqa filter --help``), as a script that ``ray job submit --working-dir .``
can run next to the nightly job without installing the package. Reading Parquet needs no Ray.

Exit codes: 0 written, 2 unusable arguments, no scores at the URI or an --out that cannot be written.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the submitted working dir's own `pipeline`

import pipeline.cli  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """Run ``dgiqa filter`` with ``argv`` (default: this script's arguments); returns the exit code."""
    return pipeline.cli.main(["filter", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
