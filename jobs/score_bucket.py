"""Nightly scoring job: ``ray job submit --working-dir . -- python jobs/score_bucket.py --manifest ... ``.

Parses arguments and runs the job (``pipeline.cli.job``, then ``pipeline.batch.job.run_job``). Runs the same
directly (``python jobs/score_bucket.py``), joining the running Ray cluster or starting a local one. ``--demo``
runs it on generated images and random weights in a local folder that plays the bucket.

Exit codes: 0 every row written (some images may have failed: see the summary), 1 the run failed and
nothing was committed, 2 unusable arguments, manifest or weights.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the submitted working dir's own `pipeline`

from pipeline.cli.job import build_parser, main  # noqa: E402
from pipeline.cli.job import config_from_args as _config  # noqa: E402, F401 - the tests build configs from here

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main())
