"""Benchmark: the published algorithm as rewritten here (a, `baseline.py`), the scorer (b) and the Ray job (c).

    python bench/bench_scoring.py [--count 2] [--sizes 4000x3000,1024x768] [--encoder vits] [--crops 20]
                                  [--weights URI --depth-weights URI] [--variants fp32,bf16,fp32+draft]
                                  [--rounds 1] [--skip-job] [--job-repeat 3]

All three run in this one process on the same generated JPEG photos, with the same weights (random ones are
generated when none are given: speed does not depend on the values). Prints images/s, the ratios (b)/(a) and
(c)/(a), peak memory per phase, achieved TFLOP/s (and the fraction of the device peak on a GPU), and each
variant's score deviation from the baseline; writes everything to a JSON file. The job's steady-state rate
(without Ray's start, model loading and the commit) is the extra images over the extra time of a second run
on ``--job-repeat`` times the images.

A scorer variant is a precision (fp32, bf16, fp16) with optional ``+draft`` (JPEG draft-mode decode),
``+math`` (the published explicit attention products instead of the default fused kernel) and ``+compile``
(torch.compile; it compiles again for every new input shape, batch sizes included, so the whole timed pass is
run once untimed first and the figure is the steady-state rate). The baseline computes attention as the
published code does (``math``); FLOPs are counted on that arithmetic, since the counter does not see inside the
fused kernel.
On a CPU the fraction-of-peak figure uses a measured peak: the rate of a large matrix product in the variant's
precision on this machine, the best the model's dense layers could reach.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.baseline import baseline_score  # noqa: E402
from pipeline.analysis.metrics import finite_or_none, srocc  # noqa: E402
from pipeline.batch.resources import PeakRss  # noqa: E402
from pipeline.scoring.preprocess import PreprocessConfig, depth_input_size, prepare_bytes  # noqa: E402
from pipeline.scoring.sample import synthetic_photo, write_random_depth_anything, write_random_dgiqa  # noqa: E402
from pipeline.scoring.scorer import Scorer, ScorerConfig  # noqa: E402

# Dense bf16 tensor peak by device name, for the fraction-of-peak figure (override with --peak-tflops).
DEVICE_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0}


def _images(folder: Path, sizes: list[tuple[int, int]], count: int) -> list[Path]:
    paths = []
    for w, h in sizes:
        for i in range(count):
            buf = io.BytesIO()
            Image.fromarray(synthetic_photo(h, w, seed=i)).save(buf, "JPEG", quality=90)
            path = folder / f"photo_{w}x{h}_{i}.jpg"
            path.write_bytes(buf.getvalue())
            paths.append(path)
    return paths


def _flops(scorer: Scorer, paths: list[Path], crops: int, preprocess: PreprocessConfig | None = None) -> float:
    """FLOPs of scoring these images: DGIQA per crop, Depth Anything per image.

    Count them on a scorer with ``math`` attention: the counter misses the products inside the fused kernel.
    ``preprocess`` sizes the depth input (default: the published 518 px); ``bench/gpu_check.py``'s dry run
    passes its small one.
    """
    device = scorer.device
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        x = torch.zeros(1, 3, 224, 224, device=device)
        scorer.dgiqa(x, x)
    per_crop = counter.get_total_flops()
    total = per_crop * crops * len(paths)
    for path in paths:
        with Image.open(path) as im:
            w, h = im.size
        dh, dw = depth_input_size(h, w, preprocess or PreprocessConfig())
        with FlopCounterMode(display=False) as counter, torch.inference_mode():
            scorer.depth_model(torch.zeros(1, 3, dh, dw, device=device))
        total += counter.get_total_flops()
    return float(total)


def _measured_peak_tflops(dtype: torch.dtype, n: int = 4096) -> float:
    """TFLOP/s of an ``n x n`` matrix product on the CPU: a practical ceiling for dense layers."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    start = time.perf_counter()
    for _ in range(3):
        a @ b
    return 2 * n**3 * 3 / (time.perf_counter() - start) / 1e12


def _decode_rate(paths: list[Path], preprocess: PreprocessConfig, repeats: int = 2) -> float:
    """Images/s of decode + preprocessing alone, one CPU core's work per image."""
    blobs = [q.read_bytes() for q in paths]
    start = time.perf_counter()
    for _ in range(repeats):
        for data in blobs:
            prepare_bytes(data, preprocess)
    return len(blobs) * repeats / (time.perf_counter() - start)


def _spearman(a: list[float], b: list[float]) -> float | None:
    """``metrics.srocc`` (average ranks, so ties count as ties), or None for fewer than three or constant scores."""
    return finite_or_none(srocc(a, b)) if len(a) >= 3 else None


def _phase(name: str, run, n_images: int, flops: float, peak_tflops: float | None) -> tuple[dict, list[float]]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    with PeakRss() as rss:
        start = time.perf_counter()
        scores = run()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
    tflops = flops / wall / 1e12
    row = {"phase": name, "images": n_images, "wall_s": round(wall, 3), "images_per_s": round(n_images / wall, 4),
           "peak_rss_mib": round(rss.peak / 2**20), "achieved_tflops": round(tflops, 4)}
    if peak_tflops:
        row["fraction_of_peak"] = round(tflops / peak_tflops, 4)
        # The rate if every FLOP ran at the peak: no variant of the same arithmetic can go faster.
        row["bound_images_per_s"] = round(peak_tflops * 1e12 / (flops / n_images), 4)
    print(f"{name}: {row['images_per_s']:.3f} images/s, {wall:.1f} s, peak RSS {row['peak_rss_mib']} MiB, "
          f"{tflops:.3f} TFLOP/s", flush=True)
    return row, scores


def _median_round(rows: list[dict], baseline_rows: list[dict]) -> dict:
    """One phase over its rounds: the median round's figures, the largest memory, and the median of the
    per-round ratios to that round's baseline (the machine's speed drifts between rounds, not within one)."""
    if len(rows) == 1:
        return rows[0]
    walls = [r["wall_s"] for r in rows]
    row = dict(sorted(rows, key=lambda r: r["wall_s"])[len(rows) // 2])
    row.update(rounds=len(rows), round_walls_s=walls, peak_rss_mib=max(r["peak_rss_mib"] for r in rows))
    if rows is not baseline_rows:
        ratios = [b["wall_s"] / r["wall_s"] for b, r in zip(baseline_rows, rows, strict=True)]
        row["speedup_vs_baseline"] = round(float(np.median(ratios)), 3)
        row["round_speedups"] = [round(x, 3) for x in ratios]
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=2, help="images per size")
    p.add_argument("--sizes", default="4000x3000,1024x768", help="WxH list")
    p.add_argument("--encoder", default="vits", choices=("vits", "vitb", "vitl"))
    p.add_argument("--crops", type=int, default=20)
    p.add_argument("--weights")
    p.add_argument("--depth-weights")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--variants", default="fp32", help="scorer variants, e.g. fp32,bf16,fp32+draft,fp32+compile")
    p.add_argument("--batch", type=int, default=4, help="images per scorer call")
    p.add_argument("--rounds", type=int, default=1,
                   help="run (a) and (b) this many times, alternating; report medians (noisy machines)")
    p.add_argument("--skip-job", action="store_true", help="skip (c), the Ray job")
    p.add_argument("--job-repeat", type=int, default=3,
                   help="also run the job on this many copies of the images for its steady-state rate (1: off)")
    p.add_argument("--peak-tflops", type=float, help="device peak for the fraction-of-peak figure")
    p.add_argument("--out", default="bench/results.json")
    args = p.parse_args(argv)

    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    work = Path(tempfile.mkdtemp(prefix="dgiqa-bench-"))
    paths = _images(work, sizes, args.count)
    weights = args.weights or str(write_random_dgiqa(work / "dgiqa_random.safetensors"))
    depth_weights = args.depth_weights or str(write_random_depth_anything(work / "depth_random.safetensors",
                                                                          args.encoder))
    preprocess = PreprocessConfig(num_crops=args.crops)
    def scorer(precision: str = "fp32", flags: tuple[str, ...] = ()) -> Scorer:
        return Scorer(ScorerConfig(weights=weights, depth_weights=depth_weights, device=args.device,
                                   precision=precision, compile="compile" in flags,
                                   attention="math" if "math" in flags else "sdpa",
                                   preprocess=PreprocessConfig(num_crops=args.crops, draft="draft" in flags)))

    published = scorer(flags=("math",))  # the baseline's models: explicit attention, as the published code
    device = published.device
    gpu_name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    peak = args.peak_tflops or next((v for k, v in DEVICE_PEAK_TFLOPS.items() if gpu_name and k in gpu_name), None)
    cpu_peaks: dict[str, float] = {}
    if device.type == "cpu" and not args.peak_tflops:
        peak = cpu_peaks["fp32"] = _measured_peak_tflops(torch.float32)
    flops = _flops(published, paths, args.crops)
    print(f"{len(paths)} images {args.sizes}, {args.encoder}, {args.crops} crops, {flops / 1e12:.2f} TFLOP, "
          f"device {gpu_name or platform.processor() or 'cpu'}", flush=True)

    variants = [(v, *v.split("+")) for v in args.variants.split(",")]
    for variant, _, *flags in variants:
        unknown = set(flags) - {"draft", "compile", "math"}
        if unknown:
            p.error(f"unknown variant flag(s) {sorted(unknown)} in {variant!r}")
    by_phase: dict[str, list[dict]] = {}
    all_scores: dict[str, list[float]] = {}
    for round_no in range(args.rounds):
        if args.rounds > 1:
            print(f"round {round_no + 1} of {args.rounds}", flush=True)
        def run_baseline(images=paths):
            return [baseline_score(str(q), published.dgiqa, published.depth_model, args.crops, device)
                    for q in images]

        run_baseline(paths[:1])  # warm, as every phase: one-time kernel set-up is not what a nightly run sees
        row, base = _phase("a_baseline", run_baseline, len(paths), flops, peak)
        by_phase.setdefault(row["phase"], []).append(row)
        for variant, precision, *flags in variants:
            # Built afresh every round and dropped after its phase: each phase's memory holds its own models.
            variant_scorer = scorer(precision, tuple(flags))
            variant_pre = variant_scorer.config.preprocess
            variant_peak = peak
            if device.type == "cpu" and not args.peak_tflops:
                if precision not in cpu_peaks:  # measured once per precision, not every round
                    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
                    cpu_peaks[precision] = _measured_peak_tflops(dtype)
                variant_peak = cpu_peaks[precision]

            def run_scorer(variant_scorer=variant_scorer, variant_pre=variant_pre, images=paths):
                out = []
                for i in range(0, len(images), args.batch):
                    prepared = [prepare_bytes(q.read_bytes(), variant_pre) for q in images[i:i + args.batch]]
                    out += [r.score for r in variant_scorer.score_prepared(prepared)]
                return out

            if "compile" in flags:  # every shape the timed pass meets is compiled here, outside the timing
                began = time.perf_counter()
                run_scorer()
                print(f"{variant}: compiled in {time.perf_counter() - began:.1f} s", flush=True)
            else:
                run_scorer(images=paths[:1])
            row, all_scores[variant] = _phase(f"b_scorer_{variant}", run_scorer, len(paths), flops, variant_peak)
            by_phase.setdefault(row["phase"], []).append(row)
            del variant_scorer, run_scorer
    results = [_median_round(rows, by_phase["a_baseline"]) for rows in by_phase.values()]
    if not args.skip_job:
        import ray

        from pipeline.batch.job import JobConfig, run_job

        manifest = work / "manifest.csv"
        manifest.write_text("uri\n" + "".join(f"{q.name}\n" for q in paths))
        ray.init(num_gpus=torch.cuda.device_count() or None, log_to_driver=False)

        def run_ray_job(listing: Path = manifest, output: Path = work / "scores", names: list[str] | None = None):
            summary = run_job(JobConfig(manifest=str(listing), output=str(output), weights=weights,
                                        depth_weights=depth_weights, crops=args.crops, log_every_s=60))
            expected = names or [q.name for q in paths]
            assert summary["status_counts"]["ok"] == len(expected), summary
            import pyarrow.dataset as pads

            table = pads.dataset(str(output), format="parquet", partitioning="hive").to_table()
            by_uri = dict(zip(table.column("uri").to_pylist(), table.column("score").to_pylist(), strict=True))
            return [by_uri[f"file://{work / name}"] for name in expected]

        row, scores = _phase("c_ray_job", run_ray_job, len(paths), flops, peak)
        all_scores["ray_job"] = scores
        results.append(row)
        if args.job_repeat > 1:
            # Steady state: the same job on `job_repeat` times the images (copies under other names). Start-up,
            # model loading and the commit cost both runs alike, so the extra images over the extra time is the
            # rate a long nightly run settles at.
            names = [f"copy{k}_{q.name}" if k else q.name for k in range(args.job_repeat) for q in paths]
            for name in names[len(paths):]:
                (work / name).write_bytes((work / name.split("_", 1)[1]).read_bytes())
            longer = work / "manifest_repeat.csv"
            longer.write_text("uri\n" + "".join(f"{name}\n" for name in names))
            long_row, _ = _phase(f"c_ray_job_x{args.job_repeat}",
                                 lambda: run_ray_job(longer, work / "scores_repeat", names),
                                 len(names), flops * args.job_repeat, peak)
            extra = len(names) - len(paths)
            marginal_s = long_row["wall_s"] - row["wall_s"]
            results.append({"phase": "c_ray_job_steady_state", "images": extra, "wall_s": round(marginal_s, 3),
                            "images_per_s": round(extra / marginal_s, 4),
                            "peak_rss_mib": long_row["peak_rss_mib"],
                            "achieved_tflops": round(flops * (args.job_repeat - 1) / marginal_s / 1e12, 4),
                            "note": f"(images of x{args.job_repeat} run - images of x1 run) / wall-time difference"})
        ray.shutdown()

    base_rate = results[0]["images_per_s"]
    for row in results[1:]:
        row.setdefault("speedup_vs_baseline", round(row["images_per_s"] / base_rate, 3))
    for row in results:
        if "bound_images_per_s" in row:
            row["bound_vs_baseline"] = round(row["bound_images_per_s"] / base_rate, 3)
    deviations = {name: {"max_abs_delta": float(np.max(np.abs(np.array(s) - np.array(base)))),
                         "spearman": _spearman(s, base)} for name, s in all_scores.items()}
    decode = {"full": round(_decode_rate(paths, preprocess), 3),
              "draft": round(_decode_rate(paths, PreprocessConfig(num_crops=args.crops, draft=True)), 3)}
    print(f"decode + preprocessing alone, one core: {decode['full']:.2f} images/s full, "
          f"{decode['draft']:.2f} images/s draft")
    report = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "gpu": gpu_name,
                    "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "measured_cpu_peak_tflops": {k: round(v, 4) for k, v in cpu_peaks.items()} or None},
        "decode_prepare_images_per_s": decode,
        "config": {"sizes": args.sizes, "count": args.count, "encoder": args.encoder, "crops": args.crops,
                   "weights": "given" if args.weights else "random", "tflop_total": round(flops / 1e12, 4)},
        "phases": results,
        "score_deviation_from_baseline": deviations,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print("\n| phase | images/s | vs baseline | peak RSS MiB | TFLOP/s | of peak | bound vs baseline |")
    print("|---|---|---|---|---|---|---|")
    for row in results:
        print(f"| {row['phase']} | {row['images_per_s']:.3f} | {row.get('speedup_vs_baseline', 1.0):.2f}x | "
              f"{row['peak_rss_mib']} | {row['achieved_tflops']:.3f} | {row.get('fraction_of_peak', '-')} | "
              f"{row.get('bound_vs_baseline', '-')}x |")
    print(f"\nscore deviation from the baseline: {json.dumps(deviations)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
