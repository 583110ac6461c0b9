"""Peak memory of preparing one image (``prepare_bytes``), before and after the band-by-band preprocessing.

Each measurement runs in a fresh process, so peaks never mix: the process prepares a small image first (code pages,
OpenCV's threads and the allocator's arenas are then in place), resets its peak RSS (``/proc/self/clear_refs``),
and reports how far ``VmHWM`` rose above ``VmRSS`` while preparing the measured image from bytes already in memory.

"before" is the code as it was, copied here: ``ImageOps.exif_transpose`` (a copy of Pillow's pixels even when
nothing turns), ``np.asarray`` of the whole Pillow image (through ``tobytes``: its chunks and their joined copy)
and a float32 copy of the whole image for the depth input's bicubic resize. "after" is ``prepare_bytes`` with
the default ``PreprocessConfig``. Each peak is checked against ``preprocess_peak_bytes`` for the image's pixels.

The images are generated (never checked in): a synthetic photograph of at most 2 MP, resized to the wanted size,
with sensor-like noise added band by band so the JPEG's size is a camera's (about 4 bits per pixel at quality 90).

    python bench/bench_preprocess_memory.py --sizes 4000x3000 11547x8660 --out bench/results_preprocess_memory.json
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image, ImageOps

from pipeline.scoring.preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PreparedImage,
    PreprocessConfig,
    check_size,
    depth_input_size,
    open_image,
    prepare_bytes,
    preprocess_peak_bytes,
    resize_short_side,
)
from pipeline.scoring.sample import synthetic_photo

# Every format is measured at the first size; later sizes take --large-formats (a camera's JPEG, upright and turned).
FORMATS = {
    "jpeg": {"format": "JPEG", "quality": 90},
    "jpeg-exif6": {"format": "JPEG", "quality": 90, "orientation": 6},
    "jpeg-progressive-444": {"format": "JPEG", "quality": 95, "progressive": True, "subsampling": 0},
    "png": {"format": "PNG", "compress_level": 1},
    "webp": {"format": "WEBP", "quality": 90},
}


def before_prepare_bytes(data: bytes, config: PreprocessConfig) -> PreparedImage:
    """The default path as it was before the band-by-band preprocessing (RGB images; all the benchmark makes)."""
    im = open_image(data, config.max_pixels)
    im.seek(0)
    im.load()
    oriented = ImageOps.exif_transpose(im)
    rgb = np.ascontiguousarray(np.asarray(oriented.convert("RGB") if oriented.mode != "RGB" else oriented))
    del im, oriented
    height, width = rgb.shape[:2]
    check_size(height, width, config)
    new_h, new_w = depth_input_size(height, width, config)
    scaled = rgb.astype(np.float32)
    scaled *= np.float32(1 / 255)
    resized = cv2.resize(scaled, (new_w, new_h), interpolation=cv2.INTER_CUBIC)
    del scaled
    resized -= np.array(IMAGENET_MEAN, np.float32)
    resized /= np.array(IMAGENET_STD, np.float32)
    depth_input = torch.from_numpy(np.ascontiguousarray(resized.transpose(2, 0, 1)))
    return PreparedImage(rgb_small=resize_short_side(rgb, config), depth_input=depth_input, height=height,
                         width=width)


VARIANTS = {"before": before_prepare_bytes, "after": prepare_bytes}


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux 4.0+)
        return True
    except OSError:
        return False


def measure(variant: str, path: str) -> dict:
    """Run in the measuring process: peak RSS rise and time of one ``prepare`` call on the file's bytes."""
    prepare, config = VARIANTS[variant], PreprocessConfig()
    warm = io.BytesIO()
    Image.fromarray(synthetic_photo(600, 800, seed=1)).save(warm, "JPEG", quality=90)
    prepare(warm.getvalue(), config)
    data = Path(path).read_bytes()
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # what the warm-up freed leaves RSS, not counted as pre-paid
    reset = _reset_peak()
    base = _status_bytes("VmRSS")
    start = time.perf_counter()
    prepared = prepare(data, config)
    seconds = time.perf_counter() - start
    peak = _status_bytes("VmHWM")
    return {"peak_bytes": peak - base, "seconds": seconds, "peak_reset": reset,
            "depth_input": list(prepared.depth_input.shape), "rgb_small": list(prepared.rgb_small.shape)}


def generate(width: int, height: int, kind: str, path: str) -> None:
    """Write a photo-like image of ``width`` x ``height`` in the format ``kind`` (see ``FORMATS``)."""
    options = dict(FORMATS[kind])
    fmt, orientation = options.pop("format"), options.pop("orientation", None)
    scale = min(1.0, (2e6 / (width * height)) ** 0.5)
    photo = synthetic_photo(round(height * scale), round(width * scale), seed=7)
    if photo.shape[:2] != (height, width):
        photo = cv2.resize(photo, (width, height), interpolation=cv2.INTER_LINEAR)
    rng = np.random.default_rng(7)
    for top in range(0, height, 256):
        band = photo[top:top + 256]
        band[:] = np.clip(band + rng.normal(0, 3, band.shape), 0, 255)
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        options["exif"] = exif.tobytes()
    Image.fromarray(photo).save(path, fmt, **options)


def _child(*args: str) -> dict | None:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout) if out.stdout.strip() else None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["4000x3000", "11547x8660"], help="WIDTHxHEIGHT")
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS),
                        help="formats measured at the first size")
    parser.add_argument("--large-formats", nargs="+", default=["jpeg", "jpeg-exif6"], choices=list(FORMATS),
                        help="formats measured at the later sizes")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out", help="JSON file for the results")
    parser.add_argument("--measure", nargs=2, metavar=("VARIANT", "PATH"), help=argparse.SUPPRESS)
    parser.add_argument("--generate", nargs=4, metavar=("WIDTH", "HEIGHT", "KIND", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(*args.measure)))
        return
    if args.generate:
        width, height, kind, path = args.generate
        generate(int(width), int(height), kind, path)
        return

    runs = []
    with tempfile.TemporaryDirectory() as folder:
        for index, size in enumerate(args.sizes):
            width, height = map(int, size.split("x"))
            pixels = width * height
            bound = preprocess_peak_bytes(pixels)
            for kind in args.formats if index == 0 else args.large_formats:
                path = os.path.join(folder, f"{size}.{kind}")
                _child("--generate", str(width), str(height), kind, path)
                for variant in args.variants:
                    result = _child("--measure", variant, path)
                    run = {"size": size, "pixels": pixels, "format": kind, "file_bytes": os.path.getsize(path),
                           "variant": variant, "peak_mib": round(result["peak_bytes"] / 2**20, 1),
                           "bytes_per_pixel": round(result["peak_bytes"] / pixels, 2),
                           "seconds": round(result["seconds"], 3), "bound_mib": round(bound / 2**20, 1),
                           "under_bound": result["peak_bytes"] < bound, "peak_reset": result["peak_reset"]}
                    runs.append(run)
                    print(json.dumps(run), flush=True)
                os.remove(path)
    report = {
        "command": "python bench/bench_preprocess_memory.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}, "
                   f"OpenCV {cv2.__version__}, Pillow {Image.__version__}",
        "bound_mib_at_default_max_pixels": round(preprocess_peak_bytes(PreprocessConfig().max_pixels) / 2**20, 1),
        "runs": runs,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
