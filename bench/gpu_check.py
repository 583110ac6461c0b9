"""One prepared check of the GPU path (issue #21, item 2): parity tests, scoring speed, decode speed, one JSON.

    OUT=/some/folder bash bench/gpu_check.sh [--dry-run] [--encoders vitl,vits] [--budget-s 450]

The product has never run on a GPU and a GPU machine is lent for about 15 minutes in all, so everything worth
knowing is measured by one command that cannot overrun: ``pytest tests/test_gpu.py``; the decode rate of the
CPU cores (Pillow, OpenCV and the scorer's own ``prepare_bytes``, a process pool over the JPEGs' bytes) and of
``torchvision.io.decode_jpeg`` batched on the device; and, for each Depth Anything encoder (random weights from
``pipeline.scoring.sample``), precision (bf16, fp32) and batch size, the scorer's rate on prepared 12 MP and 1024x768
JPEGs (``score_prepared``: both models plus the driver's CPU work, the depth map's resize to the full image
among it) beside the two models' forward passes alone (what the device could do if the CPU kept up). Each
phase records images/s, TFLOP/s (``torch.utils.flop_counter``, counted with ``math`` attention as
``bench_scoring`` does), the fraction of a matrix-product peak measured on the device in the phase's precision,
the peak device memory, and how far its scores are from the CPU fp32 scores of the same images.

Sizing (what makes the run fit in eight minutes on an H200):

* every phase aims at ``--target-s`` seconds of timed work (5 s; decode and forward-only phases 3 s);
* the images a phase times are planned from its FLOP count at an assumed throughput of 40 % of the measured
  matrix-product peak (the project's end-to-end target; on an H200 about 300 TFLOP/s in bf16 and 20 in fp32,
  so ViT-L bf16 at about 2 TFLOP per 12 MP image plans about 150 images/s), rounded up to whole batches; an
  untimed warm-up batch (two when the first was quick) then caps the plan at 1.5 x the target time at its
  rate, so a slower device or a CPU-bound driver shortens a phase instead of overrunning it;
* a hard wall-clock budget (``--budget-s``, 450 s, 30 s under eight minutes) is checked before every phase
  against that phase's estimate; a phase that would not fit is recorded as ``skipped`` with the reason, and so
  are all after it that would not fit. The pytest run gets at most 180 s. Phases run in order of what matters
  most: peaks, parity tests, decode, then ViT-L before ViT-S and bf16 before fp32.

Estimated on an H200 with 16 cores: about 6 minutes (pytest about 1, decode under 1, ViT-L's random
checkpoint and CPU reference about 1, the 24 scoring phases about 3).

The JSON (``$OUT/gpu_check.json``) is rewritten atomically after every phase, so a kill leaves what was
measured; a phase that fails (CUDA out of memory at the larger batch, say) is a row with its error, and the
run goes on; the exit status is 1 when a phase failed or the parity tests did. ``--dry-run`` runs every kind
of phase on this CPU (tiny images, ViT-S only, one crop, a 70 px depth input, the torchvision decode on the
CPU, marked as such; bf16 in the forward-only phase at batch 1 only, since a CPU without bf16 instructions takes
seconds per 224 px crop, and the scoring phase's code is the same for every precision): the code paths, not the
figures.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import multiprocessing
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.bench_scoring import _flops, _phase, _spearman  # noqa: E402
from pipeline.models.attention import set_attention  # noqa: E402
from pipeline.scoring.precision import autocast  # noqa: E402
from pipeline.scoring.preprocess import PreparedImage, PreprocessConfig, prepare_bytes  # noqa: E402
from pipeline.scoring.sample import synthetic_photo, write_random_depth_anything, write_random_dgiqa  # noqa: E402
from pipeline.scoring.scorer import Scorer, ScorerConfig  # noqa: E402

ASSUMED_FRACTION_OF_PEAK = 0.4  # the end-to-end target, used to plan each phase's images
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def write_json_atomic(path: Path, obj: object) -> None:
    """Write ``obj`` as JSON to ``path`` so that ``path`` always holds a whole, valid document.

    The text is serialised first (an unserialisable value raises before anything is touched), written to a
    temporary file in the same folder and renamed over ``path``: a kill at any moment leaves either the old
    report or the new one, never half of one.
    """
    text = json.dumps(obj, indent=2, allow_nan=False)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class Report:
    """The run's JSON: machine, plan and one row per phase, rewritten after every phase."""

    def __init__(self, path: Path, budget_s: float, data: dict):
        self.path = path
        self.budget_s = budget_s
        self.started = time.monotonic()
        self.data = {**data, "status": "running", "phases": []}
        self.save()

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def save(self) -> None:
        self.data["elapsed_s"] = round(self.elapsed(), 2)
        write_json_atomic(self.path, self.data)

    def run(self, name: str, kind: str, estimate_s: float, fn: Callable[[], dict]) -> dict | None:
        """Run one phase unless its estimate would overrun the budget; record it either way."""
        row = {"phase": name, "kind": kind, "estimate_s": round(estimate_s, 1)}
        left = self.budget_s - self.elapsed()
        if estimate_s > left:
            row.update(status="skipped", reason=f"estimated {estimate_s:.0f} s, {left:.0f} s of the budget left")
            print(f"[{self.elapsed():6.1f} s] {name}: skipped ({row['reason']})", flush=True)
            self.data["phases"].append(row)
            self.save()
            return None
        print(f"[{self.elapsed():6.1f} s] {name} ...", flush=True)
        began = time.monotonic()
        try:
            result = fn()
            row.update(status="ok", **result)
        except Exception as exc:  # a failed phase is a row with its error; the others still run
            result = None
            row.update(status="error", error=f"{type(exc).__name__}: {exc}"[:2000],
                       traceback=traceback.format_exc()[-4000:])
            print(f"{name}: {row['error']}", flush=True)
        row["duration_s"] = round(time.monotonic() - began, 2)
        self.data["phases"].append(row)
        self.save()
        return result


# Process-pool work: module-level so that the pool's workers (forked at start-up, before CUDA) can run it.

def _worker_init() -> None:
    """One thread per worker: the pool's size is the parallelism."""
    import cv2

    torch.set_num_threads(1)
    cv2.setNumThreads(1)


def _make_jpeg(task: tuple[int, int, int]) -> bytes:
    from PIL import Image

    width, height, seed = task
    buf = io.BytesIO()
    Image.fromarray(synthetic_photo(height, width, seed=seed)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _decode_pillow(data: bytes) -> int:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB")).shape[0]


def _decode_opencv(data: bytes) -> int:
    import cv2

    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR).shape[0]


def _prepare(task: tuple[bytes, PreprocessConfig]) -> tuple[dict, int, int]:
    item = prepare_bytes(*task)
    return item.to_arrays(), item.height, item.width


def _prepare_only(task: tuple[bytes, PreprocessConfig]) -> int:
    return prepare_bytes(*task).height


# Measurements.

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _figure(rate: float) -> float:
    """A measured rate to four significant digits: a loaded CPU's bf16 rate (under 5e-4 TFLOP/s) is not 0."""
    return float(f"{rate:.4g}")


def matmul_peak_tflops(dtype: torch.dtype, device: torch.device, n: int, seconds: float) -> float:
    """TFLOP/s of repeated ``n x n`` products on ``device``: the ceiling the models' dense layers could reach."""
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    torch.matmul(a, b)
    _sync(device)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or count < 3:
        torch.matmul(a, b)
        count += 1
        if count % 10 == 0 or device.type == "cpu":
            _sync(device)
    _sync(device)
    return 2 * n**3 * count / (time.perf_counter() - start) / 1e12


def _timed_repeats(run_once: Callable[[], None], target_s: float, max_repeats: int = 10_000) -> tuple[int, float]:
    """Run ``run_once`` untimed once, then as many times as fit ``target_s`` at that rate; (repeats, wall)."""
    began = time.perf_counter()
    run_once()
    warm = time.perf_counter() - began
    repeats = max(1, min(max_repeats, int(target_s / max(warm, 1e-6))))
    began = time.perf_counter()
    for _ in range(repeats):
        run_once()
    return repeats, time.perf_counter() - began


def _warm(run_once: Callable[[], object], target_s: float) -> float:
    """Seconds of one untimed call, after a second one when the first was short enough to afford it.

    The first call on a fresh model pays one-time set-up (kernel selection, allocator growth); sizing the phase
    on it alone would cut the timed work short.
    """
    began = time.perf_counter()
    run_once()
    warm = time.perf_counter() - began
    if warm < target_s / 2:
        began = time.perf_counter()
        run_once()
        warm = time.perf_counter() - began
    return warm


def _gpu_memory(device: torch.device) -> dict:
    if device.type != "cuda":
        return {"peak_gpu_mib": None}
    return {"peak_gpu_mib": round(torch.cuda.max_memory_allocated(device) / 2**20)}


def _reset_gpu_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _plan(flops_per_image: float, peak_tflops: float | None, batch: int, target_s: float) -> tuple[int, float]:
    """Batches to time from the FLOP count at the assumed throughput, and the assumed images/s.

    Without a measured peak (its phase failed) 1 TFLOP/s is assumed: the warm-up cap then does the sizing.
    """
    assumed_rate = ASSUMED_FRACTION_OF_PEAK * (peak_tflops or 1.0) * 1e12 / flops_per_image
    return max(1, math.ceil(target_s * assumed_rate / batch)), assumed_rate


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT") or str(Path(tempfile.gettempdir()) / "dgiqa-gpu-check"))
    p.add_argument("--dry-run", action="store_true", help="every phase on tiny inputs, on this machine's CPU")
    p.add_argument("--encoders", help="Depth Anything encoders (default: vitl,vits; dry run: vits)")
    p.add_argument("--budget-s", type=float, help="hard wall-clock budget (default 450; dry run 240)")
    p.add_argument("--target-s", type=float, help="timed seconds per scoring phase (default 5; dry run 0.2)")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="CPU decode processes")
    args = p.parse_args(argv)
    dry = args.dry_run
    encoders = (args.encoders or ("vits" if dry else "vitl,vits")).split(",")
    budget_s = args.budget_s or (240.0 if dry else 450.0)
    target_s = args.target_s or (0.2 if dry else 5.0)
    short_s = target_s * 0.6
    sizes = [(80, 64), (64, 48)] if dry else [(4000, 3000), (1024, 768)]
    distinct = 2 if dry else 8  # different photos per size; a phase cycles through them
    reference_count = 1 if dry else 2  # per size, scored on the CPU in fp32 once per encoder
    # A dry run's bf16 runs at batch 1, forward passes only: a CPU without bf16 instructions is slow at it.
    precision_batches = {"bf16": (1,), "fp32": (1, 2)} if dry else {"bf16": (8, 32), "fp32": (8, 32)}
    batches = sorted({b for bs in precision_batches.values() for b in bs})
    preprocess = PreprocessConfig(num_crops=1, depth_input_size=70) if dry else PreprocessConfig()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="dgiqa-gpu-check-"))

    # A kill by the run tool's time limit (SIGTERM) still marks the report as aborted; SIGKILL leaves the last
    # complete rewrite, which is valid JSON.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    # Spawned, not forked: a fork copies the parent's OpenMP and OpenCV thread-pool state, and a forked decode
    # worker once hung for good in a clean-clone CI run (the dry run stuck at its first OpenCV phase on a busy
    # 2-core machine); a spawned worker starts its own, and touches no CUDA either.
    pool = multiprocessing.get_context("spawn").Pool(args.workers, initializer=_worker_init)

    def pool_map(fn, tasks, **kwargs):
        # Bounded by what is left of the budget: a stuck worker fails its phase instead of the whole run.
        return pool.map_async(fn, tasks, **kwargs).get(timeout=max(10.0, budget_s - report.elapsed()))

    device = torch.device("cuda" if torch.cuda.is_available() and not dry else "cpu")
    gpu_name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    report = Report(out / "gpu_check.json", budget_s, {
        "issue": "#21 item 2", "dry_run": dry,
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
                    "gpu": gpu_name, "device": device.type, "cpu_count": os.cpu_count(), "workers": args.workers},
        "plan": {"budget_s": budget_s, "target_s": target_s, "sizes": [f"{w}x{h}" for w, h in sizes],
                 "encoders": encoders, "batches": precision_batches, "crops": preprocess.num_crops,
                 "depth_lower_bound": preprocess.depth_input_size, "distinct_images_per_size": distinct,
                 "reference_images_per_size": reference_count,
                 "assumed_fraction_of_peak": ASSUMED_FRACTION_OF_PEAK},
    })
    print(f"gpu_check: device {gpu_name or 'cpu'}, budget {budget_s:.0f} s, writing {report.path}", flush=True)
    peaks: dict[str, float] = {}
    jpegs: dict[str, list[bytes]] = {}
    prepared: dict[str, list[PreparedImage]] = {}
    try:
        def measure_peaks() -> dict:
            n, seconds = (256, 0.2) if dry else (8192, 1.5)
            for precision, dtype in DTYPES.items():
                peaks[precision] = matmul_peak_tflops(dtype, device, n, seconds)
            return {"device": device.type, "matmul_n": n,
                    "peak_tflops": {k: _figure(v) for k, v in peaks.items()},
                    "note": "torch defaults: fp32 matmul without TF32 (cuDNN convolutions may use TF32)"}

        report.run("matmul_peak", "env", 10, measure_peaks)

        def run_pytest() -> dict:
            log = out / "pytest_gpu.log"
            limit = max(10.0, min(180.0, budget_s - report.elapsed() - 60))
            began = time.monotonic()
            try:
                proc = subprocess.run([sys.executable, "-m", "pytest", "tests/test_gpu.py", "-v", "-rs", "-s",
                                       "-p", "no:cacheprovider"], cwd=REPO, capture_output=True, text=True,
                                      timeout=limit)
                text, code = proc.stdout + proc.stderr, proc.returncode
            except subprocess.TimeoutExpired as exc:  # its output arrives as bytes, whatever ``text`` said
                parts = [b.decode(errors="replace") if isinstance(b, bytes) else b or ""
                         for b in (exc.stdout, exc.stderr)]
                text, code = "".join(parts) + f"\nTIMED OUT after {limit:.0f} s", None
            log.write_text(text)
            summary = next((line.strip("= ") for line in reversed(text.splitlines()) if line.startswith("=")), "")
            return {"returncode": code, "summary": summary, "log": log.name,
                    "wall_s": round(time.monotonic() - began, 2)}

        report.run("pytest_gpu", "pytest", 60 if dry else 190, run_pytest)

        def make_inputs() -> dict:
            for w, h in sizes:
                jpegs[f"{w}x{h}"] = pool_map(_make_jpeg, [(w, h, seed) for seed in range(distinct)])
                prepared[f"{w}x{h}"] = [PreparedImage.from_arrays(*r) for r in
                                        pool_map(_prepare, [(b, preprocess) for b in jpegs[f"{w}x{h}"]])]
            for name, blobs in jpegs.items():
                for i, data in enumerate(blobs[:1]):
                    (work / f"photo_{name}_{i}.jpg").write_bytes(data)
            return {"jpeg_bytes_mean": {k: round(float(np.mean([len(b) for b in v]))) for k, v in jpegs.items()},
                    "depth_input_shape": {k: list(v[0].depth_input.shape) for k, v in prepared.items()}}

        report.run("inputs", "setup", 20 if dry else 30, make_inputs)

        for name in list(jpegs):
            blobs = jpegs[name]
            cpu_decoders = {"pillow": (_decode_pillow, blobs), "opencv": (_decode_opencv, blobs),
                            "prepare_bytes": (_prepare_only, [(b, preprocess) for b in blobs])}
            for decoder, (fn, tasks) in cpu_decoders.items():
                def cpu_decode(fn=fn, tasks=tasks) -> dict:
                    # Enough tasks per round that every worker has several; rounds repeat for the target time.
                    round_tasks = tasks * max(1, math.ceil(2 * args.workers / len(tasks)))
                    repeats, wall = _timed_repeats(lambda: pool_map(fn, round_tasks, chunksize=1), short_s)
                    return {"device": "cpu", "workers": args.workers, "images": repeats * len(round_tasks),
                            "wall_s": round(wall, 3), "images_per_s": _figure(repeats * len(round_tasks) / wall)}

                report.run(f"decode_cpu_{decoder}_{name}", "decode", short_s * 3 + 2, cpu_decode)

            for batch in batches:
                def device_decode(blobs=blobs, batch=batch) -> dict:
                    from torchvision.io import decode_jpeg

                    tensors = [torch.frombuffer(bytearray(blobs[i % len(blobs)]), dtype=torch.uint8)
                               for i in range(batch)]

                    def once():
                        decode_jpeg(tensors, device=device)
                        _sync(device)

                    _reset_gpu_memory(device)
                    repeats, wall = _timed_repeats(once, short_s)
                    return {"device": device.type, "batch": batch, "images": repeats * batch, "wall_s": round(wall, 3),
                            "images_per_s": _figure(repeats * batch / wall), **_gpu_memory(device)}

                report.run(f"decode_torchvision_{device.type}_b{batch}_{name}", "decode", short_s * 3 + 2,
                           device_decode)

        dgiqa_weights = work / "dgiqa_random.safetensors"
        for encoder in encoders:
            state: dict = {}

            def setup(encoder=encoder, state=state) -> dict:
                if not dgiqa_weights.exists():
                    write_random_dgiqa(dgiqa_weights)
                depth_weights = write_random_depth_anything(work / f"depth_{encoder}_random.safetensors", encoder)
                cpu = Scorer(ScorerConfig(weights=str(dgiqa_weights), depth_weights=str(depth_weights),
                                          device="cpu", preprocess=preprocess))
                set_attention(cpu.dgiqa, "math")
                set_attention(cpu.depth_model, "math")
                flops = {name: _flops(cpu, [work / f"photo_{name}_0.jpg"], preprocess.num_crops, preprocess)
                         for name in prepared}
                set_attention(cpu.dgiqa, "sdpa")
                set_attention(cpu.depth_model, "sdpa")
                reference = {name: [r.score for r in cpu.score_prepared(items[:reference_count])]
                             for name, items in prepared.items()}
                state.update(depth_weights=depth_weights, flops=flops, reference=reference)
                return {"device": "cpu", "encoder": encoder, "cpu_fp32_reference_scores": reference,
                        "tflop_per_image": {k: v / 1e12 for k, v in flops.items()}}

            report.run(f"setup_{encoder}", "setup", 60 if dry else (120 if encoder == "vitl" else 40), setup)
            if not state:
                continue
            for precision in ("bf16", "fp32"):
                peak = peaks.get(precision)
                scorer_box: list[Scorer] = []

                def load(encoder=encoder, precision=precision, state=state, box=scorer_box) -> dict:
                    box.append(Scorer(ScorerConfig(
                        weights=str(dgiqa_weights), depth_weights=str(state["depth_weights"]), device=device.type,
                        precision=precision, depth_batch=max(batches), preprocess=preprocess)))
                    return {"device": device.type, "encoder": encoder, "precision": precision,
                            "crop_batch": box[0].forward_batch, "depth_batch": max(batches)}

                report.run(f"load_{encoder}_{precision}", "setup", 30 if encoder == "vitl" else 15, load)
                if not scorer_box:
                    continue
                scorer = scorer_box[0]
                for batch in precision_batches[precision]:
                    first = next(iter(prepared))
                    flops_first = state["flops"][first]

                    def forward(scorer=scorer, batch=batch, items=prepared[first], flops=flops_first,
                                precision=precision, peak=peak) -> dict:
                        """Both models on device-resident inputs: the device's share, no CPU work."""
                        depth_x = torch.stack([items[i % len(items)].depth_input for i in range(batch)]).to(device)
                        crops = torch.randn(batch * preprocess.num_crops, 3, 224, 224, device=device)

                        def once():
                            with torch.inference_mode(), autocast(device, precision):
                                scorer.depth_model(depth_x)
                                for i in range(0, crops.shape[0], scorer.forward_batch):
                                    scorer.dgiqa(crops[i:i + scorer.forward_batch], crops[i:i + scorer.forward_batch])
                            _sync(device)

                        _reset_gpu_memory(device)
                        planned, assumed = _plan(flops, peak, batch, short_s)
                        warm = _warm(once, short_s)
                        repeats = max(1, min(planned, int(short_s * 1.5 / warm)))
                        row, _ = _phase(f"forward_{scorer.encoder}_{precision}_b{batch}",
                                        lambda: [once() for _ in range(repeats)], repeats * batch,
                                        flops * repeats * batch, peak)
                        return {**row, "device": device.type, "batch": batch, "precision": precision,
                                "planned_images": planned * batch, "assumed_images_per_s": _figure(assumed),
                                "tflop_per_image": flops / 1e12, "warmup_s": round(warm, 3), **_gpu_memory(device)}

                    report.run(f"forward_{encoder}_{precision}_b{batch}", "forward", short_s * 3 + 3, forward)
                    sizes_run = [] if dry and precision == "bf16" else list(prepared)
                    for name in sizes_run:
                        def score(scorer=scorer, batch=batch, items=prepared[name], name=name, precision=precision,
                                  peak=peak, state=state) -> dict:
                            """The scorer on prepared images: both models and the driver's CPU work per batch."""
                            flops = state["flops"][name]

                            def run(n_batches: int) -> list[float]:
                                scores = []
                                for k in range(n_batches):
                                    chunk = [items[(k * batch + i) % len(items)] for i in range(batch)]
                                    scores += [r.score for r in scorer.score_prepared(chunk)]
                                return scores

                            _reset_gpu_memory(device)
                            planned, assumed = _plan(flops, peak, batch, target_s)
                            warm = _warm(lambda: run(1), target_s)
                            # At least enough batches to score every reference image once.
                            n_batches = max(math.ceil(reference_count / batch),
                                            min(planned, int(target_s * 1.5 / warm)))
                            row, scores = _phase(f"score_{scorer.encoder}_{precision}_b{batch}_{name}",
                                                 lambda: run(n_batches), n_batches * batch,
                                                 flops * n_batches * batch, peak)
                            reference = state["reference"][name]
                            ours = scores[:len(reference)]
                            return {**row, "device": device.type, "batch": batch, "precision": precision,
                                    "size": name, "planned_images": planned * batch,
                                    "assumed_images_per_s": _figure(assumed), "tflop_per_image": flops / 1e12,
                                    "warmup_s": round(warm, 3), **_gpu_memory(device),
                                    "max_abs_score_delta_vs_cpu_fp32": max(abs(a - b) for a, b in
                                                                            zip(ours, reference, strict=True)),
                                    "spearman_vs_cpu_fp32": _spearman(ours, reference)}

                        report.run(f"score_{encoder}_{precision}_b{batch}_{name}", "score",
                                   target_s * 2.5 + 3, score)
                del scorer, scorer_box
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            if encoder != encoders[0]:
                continue

            def decoded_on_device(encoder=encoder, state=state) -> dict:
                """--decode gpu: the reference JPEGs decoded and resized on the device, against the CPU fp32 scores."""
                scorer = Scorer(ScorerConfig(
                    weights=str(dgiqa_weights), depth_weights=str(state["depth_weights"]), device=device.type,
                    depth_batch=max(batches), preprocess=preprocess, decode="gpu"))
                deltas, images, wall = {}, 0, 0.0
                for name, blobs in jpegs.items():
                    reference = state["reference"][name]
                    _sync(device)
                    start = time.perf_counter()
                    items = [prepare_bytes(data, preprocess, decode="gpu") for data in blobs[:len(reference)]]
                    ours = [r.score for r in scorer.score_prepared(items)]
                    _sync(device)
                    wall += time.perf_counter() - start
                    images += len(ours)
                    deltas[name] = max(abs(a - b) for a, b in zip(ours, reference, strict=True))
                return {"device": device.type, "encoder": encoder, "precision": "fp32", "images": images,
                        "images_per_s": _figure(images / wall), "max_abs_score_delta_by_size": deltas,
                        "max_abs_score_delta_vs_cpu_fp32": max(deltas.values()), **_gpu_memory(device)}

            report.run(f"score_decode_device_{encoder}_fp32", "score", target_s * 2 + 20, decoded_on_device)
        report.data["status"] = "complete"
    except BaseException as exc:
        report.data["status"] = f"aborted: {type(exc).__name__}: {exc}"
        raise
    finally:
        pool.terminate()
        report.save()
        shutil.rmtree(work, ignore_errors=True)
    counts = {s: sum(r["status"] == s for r in report.data["phases"]) for s in ("ok", "skipped", "error")}
    print(f"gpu_check: {counts} in {report.elapsed():.0f} s; {report.path}", flush=True)
    print("\n| phase | status | images/s | TFLOP/s | of peak | peak GPU MiB | max score delta |")
    print("|---|---|---|---|---|---|---|")
    for r in report.data["phases"]:
        print(f"| {r['phase']} | {r['status']} | {r.get('images_per_s', '-')} | {r.get('achieved_tflops', '-')} | "
              f"{r.get('fraction_of_peak', '-')} | {r.get('peak_gpu_mib', '-')} | "
              f"{r.get('max_abs_score_delta_vs_cpu_fp32', '-')} |")
    pytest_ok = all(r["returncode"] == 0 for r in report.data["phases"]
                    if r["phase"] == "pytest_gpu" and r["status"] == "ok")
    return 0 if counts["error"] == 0 and pytest_ok else 1


if __name__ == "__main__":
    sys.exit(main())
