"""``dgiqa filter`` and ``dgiqa report`` over histories of growing size: wall time and peak memory of the process.

Each history holds two nights of N images each (every image scored on both, so the latest row per image has
to be found among 2N rows), written as the job writes them (one part file a night, sorted by score, row groups
of 16,384). For each size, three selections run in fresh processes, their RSS sampled while they work: the
best 1 % of the latest rows (``--top``), a score threshold over the latest rows (``--min-score``), and every
night's rows above a threshold (``--all-runs``). Memory that stays flat from the smallest history to the
largest is the point: the selection runs in DuckDB under its memory limit. The report over both nights (its
histogram, per-night quartiles and thumbnail thresholds) and ``dgiqa evaluate --scores`` of 1,000 labelled images
run in fresh processes too; ``--code-root`` runs the children on another checkout (an earlier commit's
worktree), for a side-by-side run.

    python bench/bench_query.py --rows 250000 1000000 5000000 --json bench/results_query.json
    python bench/bench_query.py --only report --rows 1000000 5000000 --code-root /tmp/before --json ...
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
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
from pipeline.cli import main
started = time.monotonic()
with PeakRss(interval_s=0.01) as rss:
    code = main(sys.argv[1:])
print(json.dumps({{"exit": code, "wall_s": round(time.monotonic() - started, 2),
                  "peak_rss_mib": round(rss.peak / 2**20, 1)}}))
"""

SELECTIONS = {
    "top 1 % of the latest": ["--top", "0.01"],
    "latest with score >= 0.99": ["--min-score", "0.99"],
    "all runs with score >= 0.99": ["--min-score", "0.99", "--all-runs"],
}


def image_uri(i: int) -> str:
    """The ``i``-th image of a generated history."""
    return f"s3://photos/library/{i // 1000:06d}/IMG_{i:09d}.jpg"


def write_history(root: Path, n: int) -> int:
    """Two nights of ``n`` images each, in the job's output schema; returns the bytes written."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.batch.output import ROW_GROUP_SIZE, output_schema

    schema = output_schema(pa.schema([]))
    rng = np.random.default_rng(0)
    uris = pa.array([image_uri(i) for i in range(n)])
    for night in ("2026-11-20", "2026-11-21"):
        order = np.argsort(rng.random(n).astype(np.float32))
        scores = np.sort(rng.random(n).astype(np.float32))
        at = dt.datetime.fromisoformat(night + "T03:00:00+00:00")
        table = pa.table({
            "uri": uris.take(pa.array(order)), "etag": pa.array([f"{i:032x}" for i in order]),
            "size_bytes": pa.array(np.full(n, 2_000_000, np.int64)), "width": pa.array(np.full(n, 4000, np.int32)),
            "height": pa.array(np.full(n, 3000, np.int32)), "score": pa.array(scores),
            "score_std": pa.array(np.full(n, 0.01, np.float32)), "num_crops": pa.array(np.full(n, 20, np.int32)),
            "status": pa.array(["ok"] * n), "error": pa.nulls(n, pa.string()),
            "model_id": pa.array(["dgiqa@aaaa+depth-anything-v1-vitl@bbbb"] * n), "scorer": pa.array(["dgiqa"] * n),
            "weights_sha256": pa.array(["aaaa"] * n), "aux_model": pa.nulls(n, pa.string()),
            "scored_at": pa.array([at] * n, pa.timestamp("us", tz="UTC")), "run_id": pa.array([f"run-{night}"] * n),
        }, schema=schema)
        folder = root / f"run_date={night}"
        folder.mkdir(parents=True)
        pq.write_table(table, folder / "part-0.parquet", row_group_size=ROW_GROUP_SIZE)
    return sum(p.stat().st_size for p in root.rglob("*.parquet"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[250_000, 1_000_000, 5_000_000],
                   help="images per night (the history holds twice as many rows)")
    p.add_argument("--only", choices=("filter", "report", "evaluate"), help="run only these commands")
    p.add_argument("--code-root", default=str(ROOT), help="checkout whose pipeline the children import")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-query-"))
    script = work / "child.py"
    script.write_text(CHILD.format(root=args.code_root))
    commands = {} if args.only not in (None, "filter") else {
        name: ["filter", "{history}", *flags, "--out", str(work / "selection.parquet")]
        for name, flags in SELECTIONS.items()}
    if args.only in (None, "report"):
        commands["report over both nights"] = ["report", "{history}", "--from", "2026-11-20", "--until",
                                               "2026-11-21", "--html", str(work / "report.html")]
    if args.only in (None, "evaluate"):
        commands["evaluate 1,000 labelled images"] = ["evaluate", "{labels}", "--scores", "{history}",
                                                      "--bootstrap", "0", "--json"]
    results = []
    for n in args.rows:
        history = work / f"scores-{n}"
        size = write_history(history, n)
        labels = work / f"labels-{n}.csv"
        picked = sorted(random.Random(0).sample(range(n), min(n, 1000)))
        labels.write_text("uri,mos\n" + "".join(f"{image_uri(i)},{1 + 4 * (i % 97) / 96:.3f}\n" for i in picked))
        for name, argv in commands.items():
            run = subprocess.run([sys.executable, str(script),
                                  *(a.format(history=history, labels=labels) for a in argv)],
                                 capture_output=True, text=True)
            if run.returncode:
                raise SystemExit(run.stderr[-3000:])
            row = json.loads(run.stdout.strip().splitlines()[-1])
            row.update(history_rows=2 * n, history_mib=round(size / 2**20, 1), selection=name,
                       code_root=args.code_root, stats=(run.stderr.strip().splitlines() or [""])[-1])
            results.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": f"{os.cpu_count()} CPUs", "memory_mb": 256,
                                               "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    started = time.monotonic()
    main()
    print(f"{time.monotonic() - started:.0f} s", file=sys.stderr)
