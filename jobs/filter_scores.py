"""Select scored images into a manifest: ``python jobs/filter_scores.py OUTPUT --min-score 0.6 --out keep.parquet``.

The same as ``dgiqa filter`` (see ``dgiqa filter --help``), as a script that ``ray job submit --working-dir .``
can run next to the nightly job without installing the package. Reading Parquet needs no Ray.

Exit codes: 0 written, 2 unusable arguments or no scores at the URI.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the submitted working dir's own `pipeline`

from pipeline.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["filter", *sys.argv[1:]]))
