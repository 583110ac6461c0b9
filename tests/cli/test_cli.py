"""The ``dgiqa`` command as users run it: a real subprocess, real files, real weights files."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli.test_score_bucket import DGIQA_OWN, STUDENT_OWN

DGIQA = [sys.executable, "-m", "pipeline.cli"]


def _run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    return subprocess.run([*DGIQA, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


@pytest.fixture(scope="module")
def images(tmp_path_factory, photo_paths) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("images")
    corrupt = folder / "corrupt.jpg"
    corrupt.write_bytes(photo_paths[3].read_bytes()[:1000])  # rocket.jpg, truncated
    text = folder / "page.jpg"
    text.write_text("<html>404</html>")
    return {"good": str(photo_paths[2]), "corrupt": str(corrupt), "text": str(text),
            "missing": str(folder / "missing.png"), "file_uri": f"file://{photo_paths[1]}"}


def test_score_json_one_line_per_image_and_failures_do_not_stop_others(checkpoints, images):
    order = ["good", "corrupt", "missing", "text", "file_uri"]
    proc = _run("score", *[images[k] for k in order], "--weights", str(checkpoints["dgiqa"]),
                "--depth-weights", f"file://{checkpoints['depth']}", "--crops", "1", "--device", "cpu", "--json")
    assert proc.returncode == 1, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["uri"] for r in rows] == [images[k] for k in order]
    by_kind = dict(zip(order, rows, strict=True))
    for kind in ("good", "file_uri"):
        row = by_kind[kind]
        assert row["status"] == "ok" and row["error"] is None
        assert 0 < row["score"] < 1 and row["score_std"] == 0 and row["num_crops"] == 1
        assert row["model_id"].startswith("dgiqa@") and "+depth-anything-v1-vits@" in row["model_id"]
    assert by_kind["file_uri"]["width"] == 600 and by_kind["file_uri"]["height"] == 400
    assert "truncated or corrupt" in by_kind["corrupt"]["error"]
    assert "no such file" in by_kind["missing"]["error"]
    assert "not a recognised image format" in by_kind["text"]["error"]
    assert all(by_kind[k]["status"] == "error" and by_kind[k]["score"] is None for k in ("corrupt", "missing", "text"))


def test_score_plain_output_and_exit_code_zero(checkpoints, images):
    proc = _run("score", images["good"], "--weights", str(checkpoints["dgiqa"]),
                "--depth-weights", str(checkpoints["depth"]), "--crops", "1", "--encoder", "vits")
    assert proc.returncode == 0, proc.stderr
    uri, score = proc.stdout.strip().split("\t")
    assert uri == images["good"] and 0 < float(score) < 1
    # The published explicit attention products instead of the fused kernel: the same score to rounding.
    math = _run("score", images["good"], "--weights", str(checkpoints["dgiqa"]), "--attention", "math",
                "--depth-weights", str(checkpoints["depth"]), "--crops", "1", "--encoder", "vits")
    assert math.returncode == 0, math.stderr
    assert abs(float(math.stdout.strip().split("\t")[1]) - float(score)) <= 1e-5
    # Paths as a user types them, relative to the current folder (``..`` included): the same image, the same score.
    folder = Path(images["good"]).parent
    relative = _run("score", Path(images["good"]).name, f"../{folder.name}/{Path(images['good']).name}",
                    "--weights", str(checkpoints["dgiqa"]), "--depth-weights", str(checkpoints["depth"]),
                    "--crops", "1", "--encoder", "vits", cwd=folder)
    assert relative.returncode == 0, relative.stdout + relative.stderr
    assert [line.split("\t")[1] for line in relative.stdout.splitlines()] == [score, score]


@pytest.mark.parametrize(("args", "message"), [
    (["--weights", "/nonexistent/dgiqa.pth", "--depth-weights", "/nonexistent/d.pth"], "no weights at /nonexistent"),
    (["--weights", "{dgiqa}", "--depth-weights", "{dgiqa}"], "not a Depth Anything checkpoint"),
    (["--weights", "{depth}", "--depth-weights", "{depth}"], "checkpoint does not fit the model"),
    (["--weights", "{dgiqa}", "--depth-weights", "{depth}", "--encoder", "vitb"], "holds a vits model"),
    (["--weights", "{dgiqa}", "--depth-weights", "{depth}", "--crops", "0"], "expected a positive integer"),
    (["--weights", "{dgiqa}", "--depth-weights", "{depth}", "--storage-options", "{bad"], "not valid JSON"),
    (["--weights", "{dgiqa}", "--depth-weights", "{depth}", "--device", "cuda"], "sees no CUDA device"),
])
def test_bad_arguments_give_one_line_and_no_traceback(checkpoints, images, args, message):
    if "--device" in args and __import__("torch").cuda.is_available():
        pytest.skip("this machine has CUDA, so --device cuda is valid here")
    paths = {"{dgiqa}": str(checkpoints["dgiqa"]), "{depth}": str(checkpoints["depth"])}
    args = [paths.get(a, a) for a in args]
    proc = _run("score", images["good"], *args)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(("dgiqa: error:", "dgiqa score: error:"))
    assert message in last


@pytest.mark.slow
def test_make_sample_then_score_as_in_the_readme(tmp_path):
    made = _run("make-sample", str(tmp_path / "sample"))
    assert made.returncode == 0, made.stderr
    command = made.stdout.strip().splitlines()[-1].split()
    assert command[:2] == ["dgiqa", "score"]
    proc = _run(*command[1:], "--crops", "2")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 3
    assert all(0 < float(line.split("\t")[1]) < 1 for line in lines)




@pytest.mark.parametrize(("model", "option"), [
    ("dpiqa-student", ["--crops", "20"]),  # the default value, given explicitly, is still refused
    ("dpiqa-student", ["--encoder", "auto"]),
    ("dpiqa-student", ["--depth-version", "v1"]),
    ("dpiqa-student", ["--draft-decode"]),
    ("dpiqa-student", ["--depth-weights", "d.pth"]),
    ("dgiqa", ["--exif-transpose"]),
])
def test_an_option_the_model_does_not_use_is_a_one_line_error(model, option, images, capsys):
    from pipeline.cli import main

    depth = ["--depth-weights", "d.pth"] if model == "dgiqa" else []
    # Refused before any weights are read: these paths do not exist.
    code = main(["score", images["good"], "--model", model, "--weights", "w.pth", *depth, *option])
    captured = capsys.readouterr()
    own = STUDENT_OWN if model == "dpiqa-student" else DGIQA_OWN
    assert code == 2 and captured.out == ""
    assert captured.err.splitlines() == [f"dgiqa: error: {option[0]} is not used by --model {model} {own}"]


def test_a_signed_weights_url_is_redacted_in_the_error_line(checkpoints, images, capsys):
    """The weights reader names the URI it could not read; the command's one line keeps the signature out."""
    from pipeline.cli import main

    signed = "http://127.0.0.1:9/w.pth?X-Amz-Credential=AKIAEXAMPLE&X-Amz-Signature=0123456789abcdef"
    code = main(["score", images["good"], "--weights", signed, "--depth-weights", str(checkpoints["depth"])])
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("dgiqa: error: ")
    assert "0123456789abcdef" not in err and "AKIAEXAMPLE" not in err and "X-Amz-Signature=***" in err
