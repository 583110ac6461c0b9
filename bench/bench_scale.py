"""Scale benchmark: the real job entry point over manifests and histories of N rows, as a user runs it.

For each N: a manifest of N rows (Parquet, CSV, or an S3 Inventory layout on a local folder), and an output
whose history holds N - NEW of those rows scored ``ok`` by the same weights on an earlier night. The NEW
rows point at missing objects, so they flow through the whole pipeline (fetch, decode, the actor pool) as
error rows and the models never run: what is measured is planning, the pipeline's per-row cost, and commit.
A second case scores a night whose rows are all new (``--all-new``), again missing objects.

Every run is ``/usr/bin/time -v python jobs/score_bucket.py ...`` in a fresh process with its own local Ray
(``RAY_ADDRESS=local``): wall time, the driver's peak RSS (from the job's summary: the driver process alone,
not Ray's workers), and rows per second beyond the fixed start-up cost (the N = 1,000 run's wall time).

    python bench/bench_scale.py --rows 1000 1000000 10000000 --formats parquet csv --json bench/results_scale.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.batch.output import RESULT_SCHEMA  # noqa: E402
from pipeline.scoring.sample import depth_random_name, write_random_depth_anything, write_random_dgiqa  # noqa: E402
from pipeline.scoring.scorer import ScorerConfig, check_models  # noqa: E402

CHUNK = 2_000_000
RUN_DATE, EARLIER = "2026-11-30", "2026-11-29"


def _manifest_chunks(home: str, n: int):
    """Rows ``home/photos/<i>.jpg`` with an ETag and a size, in chunks."""
    for start in range(0, n, CHUNK):
        stop = min(n, start + CHUNK)
        ids = np.arange(start, stop)
        numbers = pc.cast(pa.array(ids), pa.string())
        yield pa.table({"uri": pc.binary_join_element_wise(f"{home}photos/", numbers, ".jpg", ""),
                        "etag": pc.cast(pa.array(ids * 7919 % 1_000_003), pa.string()),
                        "size": pa.array(1000 + ids % 5000, pa.int64())})


def write_manifest(folder: Path, home: str, n: int, fmt: str) -> str:
    """The manifest in one of the three layouts; returns its URI."""
    folder.mkdir(parents=True, exist_ok=True)
    if fmt == "parquet":
        path = folder / "manifest.parquet"
        with pq.ParquetWriter(path, next(_manifest_chunks(home, 1)).schema) as writer:
            for chunk in _manifest_chunks(home, n):
                writer.write_table(chunk, row_group_size=128_000)
        return str(path)
    if fmt == "csv":
        path = folder / "manifest.csv"
        with pacsv.CSVWriter(path, next(_manifest_chunks(home, 1)).schema) as writer:
            for chunk in _manifest_chunks(home, n):
                writer.write_table(chunk)
        return str(path)
    # An S3 Inventory report (CSV data files, no header, gzip) laid out on a local folder.
    data = folder / "data"
    data.mkdir(exist_ok=True)
    files = []
    for k, chunk in enumerate(_manifest_chunks(home, n)):
        keys = pc.utf8_slice_codeunits(chunk.column("uri"), len(home))
        part = pa.table({"bucket": pa.repeat(pa.scalar("bucket"), len(chunk)), "key": keys,
                         "size": chunk.column("size"), "etag": chunk.column("etag")})
        name = data / f"part-{k:05d}.csv.gz"
        with pa.CompressedOutputStream(str(name), "gzip") as out:
            pacsv.write_csv(part, out, write_options=pacsv.WriteOptions(include_header=False))
        files.append({"key": f"data/{name.name}", "size": name.stat().st_size})
    report = {"sourceBucket": "bucket", "destinationBucket": str(folder), "fileFormat": "CSV",
              "fileSchema": "Bucket, Key, Size, ETag", "files": files}
    (folder / "manifest.json").write_text(json.dumps(report))
    return str(folder / "manifest.json")


def write_history(output: Path, home: str, n_done: int, model_id: str, encoder: str) -> None:
    """``n_done`` rows scored ok by ``model_id`` on an earlier night, as committed part files."""
    partition = output / f"run_date={EARLIER}"
    partition.mkdir(parents=True, exist_ok=True)
    now = pa.scalar(time.time_ns() // 1000, pa.timestamp("us", tz="UTC"))
    for k, chunk in enumerate(_manifest_chunks(home, n_done)):
        m = len(chunk)
        rng = np.random.default_rng(k)
        columns = {"uri": chunk.column("uri"), "etag": chunk.column("etag"), "size_bytes": chunk.column("size"),
                   "width": pa.repeat(pa.scalar(640, pa.int32()), m),
                   "height": pa.repeat(pa.scalar(480, pa.int32()), m),
                   "score": pa.array(np.sort(rng.random(m, np.float32))),
                   "score_std": pa.repeat(pa.scalar(0.01, pa.float32()), m),
                   "num_crops": pa.repeat(pa.scalar(20, pa.int32()), m),
                   "status": pa.repeat(pa.scalar("ok"), m), "error": pa.nulls(m, pa.string()),
                   "model_id": pa.repeat(pa.scalar(model_id), m), "encoder": pa.repeat(pa.scalar(encoder), m),
                   "scored_at": pa.repeat(now, m), "run_id": pa.repeat(pa.scalar(f"{EARLIER}-bench"), m)}
        pq.write_table(pa.table(columns).cast(RESULT_SCHEMA), partition / f"part-bench{k:04d}.parquet",
                       row_group_size=16_384, compression="zstd")


def run_job(manifest: str, output: Path, weights: dict, work: Path, extra: list[str]) -> dict:
    """One run of the real entry point under /usr/bin/time -v; its summary plus wall time and peak RSS."""
    cmd = ["/usr/bin/time", "-v", sys.executable, str(ROOT / "jobs" / "score_bucket.py"), "--manifest", manifest,
           "--output", str(output), "--weights", weights["dgiqa"], "--depth-weights", weights["depth"],
           "--run-date", RUN_DATE, "--crops", "1", "--depth-input-size", "70", "--log-every", "60",
           "--spill-dir", str(work), *extra]
    env = {**os.environ, "RAY_ADDRESS": "local", "PYTHONUNBUFFERED": "1"}
    started = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.monotonic() - started
    if proc.returncode != 0:
        raise SystemExit(f"job failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    summary["process_wall_s"] = round(wall, 2)
    summary["time_v_max_rss_mib"] = round(int(rss.group(1)) / 1024, 1) if rss else None
    return summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[1000, 1_000_000, 10_000_000])
    p.add_argument("--formats", nargs="+", default=["parquet", "csv", "inventory"],
                   choices=["parquet", "csv", "inventory"])
    p.add_argument("--new", type=int, default=1000, help="rows not in the history (missing objects)")
    p.add_argument("--all-new", type=int, default=1_000_000, help="rows of the all-new night (0 to skip)")
    p.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args()

    work = Path(args.work or tempfile.mkdtemp(prefix="bench-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    weights = {"dgiqa": str(write_random_dgiqa(work / "dgiqa.safetensors")),
               "depth": str(write_random_depth_anything(work / depth_random_name("vits")))}
    info = check_models(ScorerConfig(weights=weights["dgiqa"], depth_weights=weights["depth"], device="cpu"))
    bucket = work / "bucket"
    (bucket / "photos").mkdir(parents=True, exist_ok=True)
    results = []
    local = f"file://{bucket}/"
    for fmt in args.formats:
        for n in args.rows:
            case = work / f"{fmt}-{n}"
            # An inventory names s3:// objects; with no S3 server here, its rows are all in the history, so
            # the run plans, commits nothing new and never reaches the network.
            home, new = ("s3://bucket/", 0) if fmt == "inventory" else (local, min(n, args.new))
            manifest = write_manifest(case / "manifest", home, n, fmt)
            output = case / "out"
            write_history(output, home, n - new, info.model_id, info.encoder)
            s = run_job(manifest, output, weights, work, ["--allow-prefix", home])
            row = {"case": "history", "format": fmt, "rows": n, "new_rows": new,
                   "wall_s": s["process_wall_s"], "planning_s": s["planning_s"], "job_wall_s": s["wall_time_s"],
                   "driver_peak_rss_mib": s["driver_peak_rss_mib"], "time_v_max_rss_mib": s["time_v_max_rss_mib"],
                   "planning_rss_mib": s["driver_rss_mib"],
                   "rows_written": s["rows_written"], "skipped": s["skipped_done_before"],
                   "status_counts": s["status_counts"],
                   "ray_operators": s["ray_operators"]}
            results.append(row)
            print(json.dumps(row), flush=True)
            subprocess.run(["rm", "-rf", str(case)], check=True)
    if args.all_new:
        case = work / f"allnew-{args.all_new}"
        manifest = write_manifest(case / "manifest", local, args.all_new, "parquet")
        s = run_job(manifest, case / "out", weights, work, ["--allow-prefix", local, "--batch-size", "64"])
        row = {"case": "all-new", "format": "parquet", "rows": args.all_new, "new_rows": args.all_new,
               "wall_s": s["process_wall_s"], "planning_s": s["planning_s"], "job_wall_s": s["wall_time_s"],
               "driver_peak_rss_mib": s["driver_peak_rss_mib"], "time_v_max_rss_mib": s["time_v_max_rss_mib"],
               "planning_rss_mib": s["driver_rss_mib"],
               "rows_written": s["rows_written"], "status_counts": s["status_counts"],
               "rows_per_s": round(args.all_new / s["wall_time_s"], 1), "ray_operators": s["ray_operators"]}
        results.append(row)
        print(json.dumps(row), flush=True)
        subprocess.run(["rm", "-rf", str(case)], check=True)
    base = {r["format"]: r for r in results if r["case"] == "history" and r["rows"] == min(args.rows)}
    for r in results:
        b = base.get(r["format"])
        if r["case"] == "history" and b and r["rows"] > b["rows"]:
            r["rss_growth_mib"] = round(r["driver_peak_rss_mib"] - b["driver_peak_rss_mib"], 1)
            r["planning_peak_growth_mib"] = round(r["planning_rss_mib"]["planning_peak"]
                                                  - b["planning_rss_mib"]["planning_peak"], 1)
            r["rows_per_s_beyond_startup"] = round((r["rows"] - b["rows"]) / max(r["wall_s"] - b["wall_s"], 1e-9))
            r["planning_rows_per_s"] = round((r["rows"] - b["rows"]) / max(r["planning_s"] - b["planning_s"], 1e-9))
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": f"{os.cpu_count()} CPUs", "results": results}, indent=2))


if __name__ == "__main__":
    main()
