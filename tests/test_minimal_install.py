"""The scorer without the job's packages: ``dgiqa score`` in a fresh interpreter where Ray, s3fs, DuckDB,
aiohttp and pillow-heif cannot be imported, as on a bare GPU machine with only torch, timm and OpenCV."""

import json
import subprocess
import sys
from pathlib import Path

from PIL import Image

from pipeline.scoring.sample import synthetic_photo

REPO = Path(__file__).resolve().parents[1]
BLOCKED = ("ray", "s3fs", "duckdb", "aiohttp", "pillow_heif")
RUNNER = f"""
import importlib.abc, sys

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ImportError(f"{{name}} is not installed on this machine (blocked by the test)")
        return None

sys.meta_path.insert(0, Block())
from pipeline.cli import main
code = main(sys.argv[1:])
import tests.test_gpu, bench.bench_scoring  # what a bare GPU machine runs from the source tree
print("LOADED", sorted(m for m in sys.modules if m.split(".")[0] in {BLOCKED!r}), file=sys.stderr)
sys.exit(code)
"""


def test_dgiqa_score_and_the_gpu_tests_run_without_ray_s3fs_duckdb_or_pillow_heif(checkpoints, photo_paths,
                                                                                   tmp_path):
    import pillow_heif

    heic = tmp_path / "phone.heic"
    pillow_heif.from_pillow(Image.fromarray(synthetic_photo(120, 160, seed=3))).save(str(heic))
    jpeg = tmp_path / "photo.jpg"
    Image.fromarray(synthetic_photo(120, 160, seed=4)).save(jpeg, "JPEG")
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER, "score", str(photo_paths[0]), str(jpeg), str(heic), "--json", "--crops", "1",
         "--weights", str(checkpoints["dgiqa"]), "--depth-weights", str(checkpoints["depth"]), "--device", "cpu"],
        capture_output=True, text=True, cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, timeout=600)
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert proc.returncode == 1, proc.stderr[-3000:]  # the HEIC photo failed, the others were scored
    assert [r["status"] for r in rows] == ["ok", "ok", "error"], proc.stderr[-3000:]
    assert 0 < rows[0]["score"] < 1 and 0 < rows[1]["score"] < 1
    assert rows[2]["error"] == "a HEIC/HEIF image, and pillow-heif is not installed here"
    # None of the blocked packages was needed, neither by the scorer nor by tests/test_gpu.py and
    # bench/bench_scoring.py, imported in the same interpreter afterwards.
    assert "LOADED []" in proc.stderr



def test_dp_iqa_without_its_extra_is_one_line_with_the_install_command(tmp_path):
    """diffusers and transformers are the ``dpiqa`` extra: without them the other scorers work, and asking for
    DP-IQA stops before anything is read, with the command that installs them."""
    runner = RUNNER.replace(repr(BLOCKED), repr(("diffusers", "transformers")), 1).split("import tests.test_gpu")[0]
    runner += "sys.exit(code)\n"
    proc = subprocess.run(
        [sys.executable, "-c", runner, "score", str(tmp_path / "none.jpg"), "--model", "dpiqa", "--weights",
         str(tmp_path / "none.safetensors"), "--prompt-embeddings", str(tmp_path / "none.pth")],
        capture_output=True, text=True, cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        "dgiqa: error: --model dpiqa needs diffusers and transformers, which are not installed here: "
        "pip install 'dgiqa-pipeline[dpiqa]'")
