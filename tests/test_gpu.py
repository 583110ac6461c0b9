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


def test_dpiqa_on_the_gpu_measures_its_batch_and_gives_the_authors_scores(tmp_path):
    """DP-IQA's pass size comes from a probe of the GPU's free memory; its scores stay within TF32's rounding of
    the authors' (their photographs lie at least 0.04 apart, twenty times this tolerance)."""
    import json

    from pipeline.scoring.sample import write_random_dpiqa, write_random_prompts
    from pipeline.scoring.scorer import ScorerConfig, make_scorer
    from tests.conftest import DATA, SKIMAGE_DATA

    golden = json.loads((DATA / "dpiqa_published_scores.json").read_text())
    config = ScorerConfig(model="dpiqa", device="cuda",
                          weights=str(write_random_dpiqa(tmp_path / "dpiqa_random.safetensors")),
                          prompt_embeddings=str(write_random_prompts(tmp_path / "prompts.pth", count=495, dim=32)))
    scorer = make_scorer(config)
    assert scorer.device.type == "cuda" and 1 <= scorer.forward_batch <= 32
    for entry in golden["scores"]:
        folder = DATA if entry["source"] == "tests/data" else SKIMAGE_DATA
        result = scorer.score_bytes((folder / entry["image"]).read_bytes())
        assert abs(result.score - entry["score"]) <= 2e-3, entry
    print(f"\nDP-IQA on the GPU: {scorer.forward_batch} images per pass")
