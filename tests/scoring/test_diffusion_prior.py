"""DP-IQA's runner: a pass that runs out of memory is retried at half the size, with the same scores.

The shortage is real: the scorer runs in its own process whose address space is capped (``RLIMIT_AS``) a few
hundred megabytes above what it holds after one warm-up image, so the CPU allocator refuses a four-image pass of
512x512 images (about 130 MB a tensor) and grants a two-image one, as a container's memory cap would.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.scoring.sample import write_random_dpiqa, write_random_prompts
from tests.conftest import DATA, SKIMAGE_DATA

REPO = Path(__file__).resolve().parents[2]
GOLDEN = json.loads((DATA / "dpiqa_published_scores.json").read_text())

RUNNER = """
import json, re, resource, sys
from pipeline.scoring.scorer import ScorerConfig, make_scorer
from pipeline.scoring.dpiqa_preprocess import prepare_for_scoring

weights, prompts, *paths = sys.argv[1:]
scorer = make_scorer(ScorerConfig(model="dpiqa", device="cpu", weights=weights, prompt_embeddings=prompts,
                                  forward_batch=8))
items = [prepare_for_scoring(open(p, "rb").read(), scorer.config.preprocess) for p in paths]
scorer.score_prepared(items[:1])  # warm: libraries loaded, allocator arenas made
held = int(re.search(r"VmSize:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
cap = held + 400 * 2**20
resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
scores = [r.score for r in scorer.score_prepared(items)]
print(json.dumps({"scores": scores, "forward_batch": scorer.forward_batch}))
"""


def test_a_pass_that_runs_out_of_memory_is_halved_and_scores_the_same(tmp_path):
    weights = write_random_dpiqa(tmp_path / "dpiqa_random.safetensors")
    prompts = write_random_prompts(tmp_path / "prompts.pth", count=495, dim=32)
    entries = GOLDEN["scores"]
    paths = [str((DATA if e["source"] == "tests/data" else SKIMAGE_DATA) / e["image"]) for e in entries]
    proc = subprocess.run([sys.executable, "-c", RUNNER, str(weights), str(prompts), *paths], capture_output=True,
                          text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result["forward_batch"] in (1, 2), result  # 8 and 4 images a pass did not fit under the cap
    assert "ran out of memory on cpu: 4 images per pass from now on" in proc.stderr
    for entry, score in zip(entries, result["scores"], strict=True):
        assert score == pytest.approx(entry["score"], abs=1e-4), entry
