"""The planner's engine, measured: DuckDB out of core against Ray Data's distributed anti-join, same data.

Both answer the night's central question, which manifest rows (URI, ETag, size) the history does not hold
as done, over a Parquet manifest of N rows and a history of N - NEW of them. Each runs in a fresh process,
its RSS sampled while it works (``ru_maxrss`` would include the forking parent's): DuckDB as the job runs
it (``pipeline.batch.plan.make_plan``, which also checks the allowlist, finds duplicates and numbers the shards),
Ray Data (which needs ``polars`` for joins) as ``read_parquet`` of both, then
``Dataset.join(join_type="left_anti")`` on the three key columns, counted, on a local Ray of this
machine's CPUs.

    python bench/bench_planners.py --rows 1000000 --json bench/results_planners.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHILD = r"""
import json, sys, time
sys.path.insert(0, {root!r})
from pipeline.batch.resources import PeakRss
engine, manifest, history, new = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
started = time.monotonic()
rss = PeakRss(interval_s=0.01).__enter__()
if engine == "duckdb":
    import fsspec
    from pipeline.batch.allowlist import Allowlist
    from pipeline.batch.manifest import open_manifest
    from pipeline.batch.plan import make_plan
    reader = open_manifest(manifest)
    fs, root = fsspec.core.url_to_fs(history)
    plan = make_plan(reader, Allowlist(["/"]), fs, root, "m@1", "2026-11-30", True, 1000)
    todo = plan.rows_to_write
    plan.close()
else:
    import ray
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    keys = ["uri", "etag", "size_bytes"]
    m = ray.data.read_parquet(manifest).rename_columns({{"size": "size_bytes"}})
    h = ray.data.read_parquet(history, columns=keys)
    todo = m.join(h, join_type="left_anti", num_partitions=8, on=tuple(keys)).count()
    ray.shutdown()
wall = time.monotonic() - started
rss.__exit__()
assert todo == new, (todo, new)
peak = round(rss.peak / 2**20, 1)
print(json.dumps({{"engine": engine, "wall_s": round(wall, 2), "driver_peak_rss_mib": peak}}))
"""


def main() -> None:
    from bench.bench_scale import write_history, write_manifest

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--new", type=int, default=1000)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-planners-"))
    home = f"file://{work}/bucket/"
    manifest = write_manifest(work / "manifest", home, args.rows, "parquet")
    write_history(work / "out", home, args.rows - args.new, "m@1", "vits")
    history = str(work / "out" / "run_date=2026-11-29")
    script = work / "child.py"
    script.write_text(CHILD.format(root=str(ROOT)))
    results = []
    for engine in ("duckdb", "ray-data"):
        started = time.monotonic()
        run = subprocess.run([sys.executable, str(script), engine, manifest, history if engine != "duckdb"
                              else str(work / "out"), str(args.new)], capture_output=True, text=True,
                             env={**os.environ, "RAY_ADDRESS": "local"})
        if run.returncode:
            raise SystemExit(run.stderr[-3000:])
        row = json.loads(run.stdout.strip().splitlines()[-1])
        row.update(rows=args.rows, process_wall_s=round(time.monotonic() - started, 2))
        results.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": f"{os.cpu_count()} CPUs", "results": results}, indent=2))


if __name__ == "__main__":
    main()
