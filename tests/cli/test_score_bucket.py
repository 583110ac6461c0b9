"""``jobs/score_bucket.py`` as a user runs it: flags, one-line errors, exit codes."""

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "jobs" / "score_bucket.py"


def _run(*args, cwd=None):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300,
                          cwd=cwd)


def test_help_lists_the_options_users_expect():
    proc = _run("--help")
    assert proc.returncode == 0
    for flag in ("--manifest", "--output", "--weights", "--depth-weights", "--encoder", "--crops", "--actors",
                 "--gpus-per-actor", "--batch-size", "--run-date", "--incremental", "--full", "--allow-prefix",
                 "--storage-options", "--limit", "--demo", "--precision", "--compile", "--attention",
                 "--draft-decode", "--exif-transpose"):
        assert flag in proc.stdout, flag


@pytest.mark.parametrize(("args", "message"), [
    ([], "missing --manifest, --output, --weights, --depth-weights (or use --demo)"),
    (["--actors", "3,1"], "expected N or MIN,MAX with 1 <= MIN <= MAX"),
    (["--storage-options", "[1]"], "must be a JSON object"),
    (["--limit", "0"], "expected a positive integer"),
    (["--incremental", "--full"], "not allowed with argument"),
    (["--precision", "fp8"], "invalid choice: 'fp8'"),
    (["--attention", "flash"], "invalid choice: 'flash'"),
])
def test_bad_arguments_are_one_line(args, message):
    proc = _run(*args)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert message in proc.stderr.strip().splitlines()[-1]


def test_unusable_inputs_fail_before_any_work(tmp_path, checkpoints):
    manifest = tmp_path / "m.csv"
    manifest.write_text("uri\na.jpg\n")
    base = ["--output", str(tmp_path / "out"), "--weights", str(checkpoints["dgiqa"]),
            "--depth-weights", str(checkpoints["depth"])]
    cases = [
        (["--manifest", str(tmp_path / "nope.csv"), *base], "no manifest at"),
        (["--manifest", str(manifest), *base, "--run-date", "22-11-2026"], "--run-date must be a date YYYY-MM-DD"),
        (["--manifest", str(manifest), *base[:2], "--weights", str(tmp_path / "w.pth"),
          "--depth-weights", str(checkpoints["depth"])], "no weights at"),
        (["--manifest", str(manifest), *base[:2], "--weights", str(checkpoints["depth"]),
          "--depth-weights", str(checkpoints["depth"])], "checkpoint does not fit the model"),
    ]
    cases += [(["--manifest", str(manifest), *base, "--spill-dir", str(tmp_path / "none")],
               f"--spill-dir {tmp_path / 'none'} is not a folder on this machine"),
              (["--manifest", str(manifest), *base, "--spill-dir", str(manifest)],
               f"--spill-dir {manifest} is not a folder on this machine")]
    (tmp_path / "bad.csv").write_text("path\na.jpg\n")
    cases.append((["--manifest", str(tmp_path / "bad.csv"), *base], "has no 'uri' column (columns: path)"))
    for args, message in cases:
        proc = _run(*args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert "Traceback" not in proc.stderr
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("score_bucket.py: error:") and message in last, last
    assert not (tmp_path / "out").exists()  # nothing was written


class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_malicious_checkpoint_is_refused_and_its_payload_never_runs(tmp_path, checkpoints):
    marker = tmp_path / "payload-ran"
    evil = tmp_path / "DGIQA_koniq.pth"
    evil.write_bytes(pickle.dumps({"state_dict": {"fc.weight": _Payload(str(marker))}}))
    manifest = tmp_path / "m.csv"
    manifest.write_text("uri\na.jpg\n")
    proc = _run("--manifest", str(manifest), "--output", str(tmp_path / "out"), "--weights", str(evil),
                "--depth-weights", str(checkpoints["depth"]))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "not a readable PyTorch weights file (loaded with weights_only=True" in proc.stderr
    assert not marker.exists()


def _job_script():
    """``jobs/score_bucket.py`` imported in this process: its parser, ``_config`` and ``main`` without Ray."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("score_bucket", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


JOB = ["--manifest", "m.csv", "--output", "out", "--weights", "w.pth"]
STUDENT_OWN = "(its own options are --exif-transpose)"
DGIQA_OWN = "(its own options are --depth-weights, --encoder, --depth-version, --crops, --depth-input-size, " \
            "--draft-decode, --decode)"


@pytest.mark.parametrize(("model", "option"), [
    ("dpiqa-student", ["--crops", "20"]),  # the default value, given explicitly, is still refused
    ("dpiqa-student", ["--encoder", "auto"]),
    ("dpiqa-student", ["--depth-version", "v2"]),
    ("dpiqa-student", ["--depth-input-size", "518"]),
    ("dpiqa-student", ["--draft-decode"]),
    ("dpiqa-student", ["--depth-weights", "d.pth"]),
    ("dgiqa", ["--exif-transpose"]),
])
def test_an_option_the_model_does_not_use_is_a_one_line_error(model, option, capsys):
    script = _job_script()
    depth = ["--depth-weights", "d.pth"] if model == "dgiqa" else []
    assert script.main([*JOB, *depth, "--model", model, *option]) == 2
    captured = capsys.readouterr()
    own = STUDENT_OWN if model == "dpiqa-student" else DGIQA_OWN
    assert captured.err.splitlines() == [f"score_bucket.py: error: {option[0]} is not used by --model {model} {own}"]
    assert captured.out == ""


def test_options_left_out_take_their_defaults_and_the_students_exif_flag_reaches_the_scorer():
    script = _job_script()
    parser = script.build_parser()
    dgiqa = script._config(parser.parse_args([*JOB, "--depth-weights", "d.pth"]), parser)
    assert (dgiqa.encoder, dgiqa.depth_version, dgiqa.crops, dgiqa.depth_input_size, dgiqa.draft_decode,
            dgiqa.exif_transpose) == ("auto", "v1", 20, 518, False, False)
    student = script._config(parser.parse_args([*JOB, "--model", "dpiqa-student", "--exif-transpose"]), parser)
    assert student.exif_transpose and student.depth_weights is None
    assert student.scorer_config().exif_transpose


def test_help_says_which_model_uses_each_option(capsys):
    with pytest.raises(SystemExit):
        _job_script().main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(dgiqa only; 20)" in text and "dpiqa, dpiqa-student: dgiqa always applies it" in text


@pytest.mark.parametrize(("output", "expected"), [
    ("/proc/dgiqa-out", "cannot write to --output /proc/dgiqa-out: a folder on its path does not exist"),
    ("README.md/out", "cannot write to --output README.md/out: a part of its path is a file, not a folder"),
    ("README.md", r"--output README.md is a file; give a folder"),
])
def test_an_unwritable_output_is_found_before_the_manifest_and_the_weights(output, expected, capsys, monkeypatch):
    """Nothing named by --manifest or --weights exists here: the output is what the run must stop at first."""
    import re

    monkeypatch.chdir(SCRIPT.parents[1])
    code = _job_script().main(["--manifest", "/nonexistent/m.csv", "--output", output,
                               "--weights", "/nonexistent/w.pth", "--depth-weights", "/nonexistent/d.pth"])
    err = capsys.readouterr().err.splitlines()
    assert code == 2 and len(err) == 1 and re.search(expected, err[0]), err
    assert not (SCRIPT.parents[1] / "README.md" / "out").exists()
