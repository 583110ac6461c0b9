"""The same parity checks on a GPU, in fp32 (fused and explicit attention) and bf16.

Skipped, with the reason printed, where no CUDA device is.
"""

import pytest
import torch

from pipeline.preprocess import PreprocessConfig
from pipeline.scorer import Scorer, ScorerConfig

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine"),
]

TOLERANCE = {"fp32": 2e-3, "bf16": 2e-2}


@pytest.fixture(scope="module")
def cpu_reference(checkpoints):
    return Scorer(ScorerConfig(weights=str(checkpoints["dgiqa"]), depth_weights=str(checkpoints["depth"]),
                               device="cpu", attention="math",
                               preprocess=PreprocessConfig(num_crops=4, reference=True)))


@pytest.mark.parametrize(("precision", "attention"), [("fp32", "sdpa"), ("fp32", "math"), ("bf16", "sdpa")])
def test_gpu_scores_match_the_cpu_reference(cpu_reference, checkpoints, photo_paths, precision, attention):
    gpu = Scorer(ScorerConfig(weights=str(checkpoints["dgiqa"]), depth_weights=str(checkpoints["depth"]),
                              device="cuda", precision=precision, attention=attention,
                              preprocess=PreprocessConfig(num_crops=4)))
    assert gpu.device.type == "cuda"
    deltas = []
    for path in photo_paths[:3]:
        data = path.read_bytes()
        deltas.append(abs(gpu.score_bytes(data).score - cpu_reference.score_bytes(data).score))
    assert max(deltas) <= TOLERANCE[precision], deltas
    print(f"\nGPU {precision}, {attention} attention vs CPU reference: max |delta score| = {max(deltas):.2e}")
