"""Benchmark: the cost of one image under each scorer, side by side in one run (the README's model table).

    python bench/bench_models.py [--count 2] [--models dgiqa,dpiqa-student,dpiqa,dpam] [--out FILE]

Each scorer is loaded through the registry (``make_scorer``, the road ``dgiqa score`` and the job take) with
random weights at the published architecture's full size (speed does not depend on the values) and scores the
same generated 1024x768 JPEGs, one untimed image first. Prints seconds per image, the ratio to DGIQA (20 crops,
Depth Anything ViT-S at 518), the weights' size and the process's peak resident memory after each scorer, and
writes them to a JSON file. Scorers run one after the other in one process, so each peak includes the earlier
ones' freed memory only as far as the allocator kept it.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.batch.resources import peak_rss_bytes  # noqa: E402
from pipeline.scoring.sample import (  # noqa: E402
    synthetic_photo,
    write_random_depth_anything,
    write_random_dgiqa,
    write_random_dpam,
    write_random_dpiqa_student,
    write_random_prompts,
)
from pipeline.scoring.scorer import ScorerConfig, make_scorer  # noqa: E402

_WRITE_SD15 = """
import sys, torch
from pipeline.models.dpiqa_diffusion import build_dpiqa
from pipeline.scoring.sample import _save
torch.manual_seed(0)
_save(build_dpiqa("sd15").state_dict(), sys.argv[1])
"""


def _weights(model: str, folder: Path) -> dict:
    if model == "dgiqa":
        return {"weights": str(write_random_dgiqa(folder / "dgiqa.safetensors")),
                "depth_weights": str(write_random_depth_anything(folder / "depth.safetensors"))}
    if model == "dpiqa-student":
        return {"weights": str(write_random_dpiqa_student(folder / "student.safetensors"))}
    if model == "dpam":
        return {"weights": str(write_random_dpam(folder / "dpam.safetensors"))}
    # Written by another process: building the 1.06 B-parameter network here would set this process's peak memory,
    # which is to be the scorer's.
    path = folder / "dpiqa.safetensors"
    subprocess.run([sys.executable, "-c", _WRITE_SD15, str(path)], check=True, cwd=Path(__file__).resolve().parents[1])
    return {"weights": str(path),
            "prompt_embeddings": str(write_random_prompts(folder / "prompts.pth", count=495, dim=768))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=2, help="timed images per scorer (2)")
    parser.add_argument("--models", default="dgiqa,dpiqa-student,dpiqa", help="scorers, comma-separated")
    parser.add_argument("--out", default=str(Path(__file__).with_name("results_models.json")))
    args = parser.parse_args(argv)
    images = []
    for i in range(args.count + 1):
        buffer = io.BytesIO()
        Image.fromarray(synthetic_photo(768, 1024, seed=i)).save(buffer, "JPEG", quality=90)
        images.append(buffer.getvalue())
    results = {"machine": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
               "images": f"{args.count} JPEGs of 1024x768 after one untimed", "models": {}}
    with tempfile.TemporaryDirectory(prefix="bench-models-") as scratch:
        for model in args.models.split(","):
            folder = Path(scratch) / model
            folder.mkdir()
            sources = _weights(model, folder)
            size = sum(Path(p).stat().st_size for p in sources.values())
            started = time.perf_counter()
            scorer = make_scorer(ScorerConfig(model=model, device="cpu", **sources))
            load_s = time.perf_counter() - started
            scorer.score_bytes(images[0])
            started = time.perf_counter()
            for data in images[1:]:
                scorer.score_bytes(data)
            per_image = (time.perf_counter() - started) / args.count
            results["models"][model] = {"seconds_per_image": round(per_image, 2), "load_s": round(load_s, 1),
                                        "weights_mb": round(size / 2**20),
                                        "peak_rss_mb": round(peak_rss_bytes() / 2**20)}
            print(model, results["models"][model], flush=True)
            del scorer
            gc.collect()
    base = results["models"].get("dgiqa", {}).get("seconds_per_image")
    for entry in results["models"].values():
        if base:
            entry["ratio_to_dgiqa"] = round(entry["seconds_per_image"] / base, 2)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
