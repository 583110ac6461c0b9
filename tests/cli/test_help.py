"""Every command's ``--help`` and argument errors come from light modules: no torch, Ray or Arrow before parsing.

How fast that is lives in ``bench/bench_help.py``; this test holds the property that makes it fast, in a fresh
interpreter (this one has long imported everything).
"""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "torchvision", "timm", "ray", "pyarrow", "numpy", "cv2", "PIL", "fsspec", "s3fs", "duckdb",
         "pandas", "scipy", "safetensors", "diffusers", "transformers")
COMMANDS = ("score", "filter", "report", "evaluate", "separation", "train", "make-sample")

PROBE = """
import contextlib, io, json, runpy, sys
import pipeline.cli
helps = {}
for argv in [[]] + [[c] for c in %(commands)r]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        pipeline.cli.main([*argv, "--help"])
    helps[" ".join(argv) or "dgiqa"] = out.getvalue()
for script in ("score_bucket", "train"):
    out = io.StringIO()
    sys.argv = [script + ".py", "--help"]
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        runpy.run_path(%(jobs)r + "/" + script + ".py", run_name="__main__")
    helps[script] = out.getvalue()
err = io.StringIO()
with contextlib.redirect_stderr(err), contextlib.suppress(SystemExit):
    pipeline.cli.main(["score", "x.jpg", "--weights", "w.pth", "--crops", "0"])
helps["bad flag"] = err.getvalue()
loaded = sorted({m.split(".")[0] for m in sys.modules} & set(%(heavy)r))
print(json.dumps({"loaded": loaded, "helps": helps}))
"""


def test_help_and_bad_flags_of_every_command_load_no_heavy_module():
    code = PROBE % {"commands": COMMANDS, "jobs": str(REPO / "jobs"), "heavy": HEAVY}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    result = json.loads(proc.stdout.splitlines()[-1])
    helps = result["helps"]
    # Each help is the command's own (so the probe did reach every parser), and lists the scorers from the registry.
    assert all(text.startswith("usage: ") for text in helps.values() if text), helps
    assert set(helps) == {"dgiqa", *COMMANDS, "score_bucket", "train", "bad flag"}
    for command in ("score", "score_bucket"):
        assert "{dgiqa,dpam,dpiqa,dpiqa-student}" in helps[command] and "one pass per 512x512 image" in helps[command]
        assert "--trained-on {livec,koniq10k,spaq,kadid10k,tid2013,csiq}" in helps[command]
    assert "--crops: expected a positive integer, got 0" in helps["bad flag"]
    assert result["loaded"] == [], f"imported before parsing: {result['loaded']}"
