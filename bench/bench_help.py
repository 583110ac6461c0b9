"""How long ``--help`` takes for every command, in fresh interpreters (issue #17: well under a second).

Run: ``.venv/bin/python bench/bench_help.py [--repeat 5]``. Prints one line per command (median wall time of
``--repeat`` runs) and, for comparison in the same run, the time of importing torch alone, which every ``--help``
paid before the parsers moved to light modules.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMMANDS = ([], ["score"], ["filter"], ["report"], ["evaluate"], ["separation"], ["train"], ["make-sample"])


def _median_seconds(argv: list[str], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run(argv, cwd=REPO, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    """Measure and print."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    python = sys.executable
    rows = [(f"dgiqa {' '.join(c)} --help".replace("  ", " "),
             [python, "-c", "import sys, pipeline.cli; sys.exit(pipeline.cli.main(sys.argv[1:]))", *c, "--help"])
            for c in COMMANDS]
    rows += [(f"jobs/{name}.py --help", [python, f"jobs/{name}.py", "--help"]) for name in ("score_bucket", "train")]
    rows += [("python -c 'import torch' (for comparison)", [python, "-c", "import torch"]),
             ("python -c 'pass' (interpreter start)", [python, "-c", "pass"])]
    for name, argv in rows:
        print(f"{_median_seconds(argv, args.repeat):7.3f} s  {name}", flush=True)


if __name__ == "__main__":
    main()
