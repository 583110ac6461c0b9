"""Shared fixtures: random-weight checkpoints, real photographs and generated images. No network."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import skimage

from pipeline.preprocess import PreprocessConfig
from pipeline.sample import depth_random_name, write_random_depth_anything, write_random_dgiqa
from pipeline.scorer import Scorer, ScorerConfig

DATA = Path(__file__).parent / "data"
SKIMAGE_DATA = Path(os.path.dirname(skimage.__file__)) / "data"
# Real photographs shipped with scikit-image.
PHOTOS = ["astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "motorcycle_left.png"]

# Small depth inputs keep most tests fast; the full 518 px path has its own tests.
FAST = PreprocessConfig(num_crops=2, depth_lower_bound=70)


def read_layout(name: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """A published checkpoint layout: key -> (shape, dtype)."""
    layout = {}
    for line in (DATA / f"{name}_checkpoint_layout.tsv").read_text().splitlines()[1:]:
        key, shape, dtype = line.split("\t")
        dims = shape.strip("()").replace(" ", "").split(",")
        layout[key] = (tuple(int(d) for d in dims if d), dtype)
    return layout


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("weights")
    return {
        "dgiqa": write_random_dgiqa(folder / "dgiqa_random.safetensors"),
        "depth": write_random_depth_anything(folder / depth_random_name("vits")),
    }


@pytest.fixture(scope="session")
def fast_scorer(checkpoints) -> Scorer:
    return Scorer(ScorerConfig(weights=str(checkpoints["dgiqa"]), depth_weights=str(checkpoints["depth"]),
                               device="cpu", preprocess=FAST))


@pytest.fixture(scope="session")
def photo_paths() -> list[Path]:
    paths = [SKIMAGE_DATA / name for name in PHOTOS]
    missing = [p for p in paths if not p.exists()]
    assert not missing, f"scikit-image photographs missing: {missing}"
    return paths
