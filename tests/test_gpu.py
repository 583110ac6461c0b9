"""The parity checks on a GPU: fp32 (fused and explicit attention) and bf16 against the published numbers.

Skipped, with the reason printed, where no CUDA device is.
"""

import pytest
import torch

from pipeline.scoring.preprocess import prepare_bytes
from tests.test_published_parity import BF16_TOLERANCE, GOLDEN, SMALL, _image_bytes, _scorer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine"),
]

# cuDNN may run fp32 convolutions in TF32 (PyTorch's default), so the GPU's fp32 is not the CPU's bit for bit; both
# tolerances stay under a tenth of the recorded scores' spread (test_published_parity checks that spread).
TOLERANCE = {"fp32": 2e-3, "bf16": BF16_TOLERANCE}


@pytest.mark.parametrize(("precision", "attention"), [("fp32", "sdpa"), ("fp32", "math"), ("bf16", "sdpa")])
def test_gpu_scores_match_the_published_scores(checkpoints, precision, attention):
    gpu = _scorer(checkpoints, device="cuda", precision=precision, attention=attention)
    assert gpu.device.type == "cuda"
    results = gpu.score_prepared([prepare_bytes(_image_bytes(name), gpu.config.preprocess) for name in SMALL])
    deltas = [abs(result.score - GOLDEN["images"][name]["score"]) for name, result in zip(SMALL, results, strict=True)]
    assert max(deltas) <= TOLERANCE[precision], deltas
    print(f"\nGPU {precision}, {attention} attention vs published: max |delta score| = {max(deltas):.2e}")
