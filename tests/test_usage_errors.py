"""Every failure a user can cause, for every command: exit 2 and one line naming it, outputs checked first.

Each case runs in this process (``pipeline.cli.main`` or a ``jobs/*.py`` script's ``main``) and asserts what a
user sees: exit code 2, exactly one line on standard error starting with ``<prog>: error:``, no traceback, and the
phrase that names the problem. The output cases give inputs that do not exist as well, so they pass only if the
output is checked before anything is read. Weights are refused from their header and keys (the models are
built on the meta device, or not at all), and the job checks them before Ray starts, so no case starts Ray.
"""

import datetime as dt
import importlib.util
import re
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from pipeline.batch.output import RunOutput, output_schema
from pipeline.cli import main as dgiqa

JOBS = Path(__file__).resolve().parents[1] / "jobs"
PREFIX = re.compile(r"^(dgiqa|dgiqa evaluate|dgiqa separation|train\.py): error: ")
MODEL = "dgiqa@aaaa+depth-anything-v1-vits@bbbb"


def _job(name: str):
    """``jobs/<name>.py`` imported in this process, for its ``main`` (see ``tests/cli/test_score_bucket.py``)."""
    spec = importlib.util.spec_from_file_location(f"usage_errors_{name}", JOBS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture(scope="module")
def files(tmp_path_factory, checkpoints) -> dict[str, str]:
    """Inputs good and bad, by the names the cases' arguments use in braces."""
    tmp = tmp_path_factory.mktemp("usage")
    scores = tmp / "scores"
    uris = [f"file:///data/library/{i}.jpg" for i in range(6)]
    n = len(uris)
    table = pa.table({
        "uri": uris, "etag": ["e"] * n, "size_bytes": [1000] * n, "width": [640] * n, "height": [480] * n,
        "score": [0.1 * i for i in range(n)], "score_std": [0.01] * n, "num_crops": [20] * n, "status": ["ok"] * n,
        "error": [None] * n, "model_id": [MODEL] * n, "scorer": ["dgiqa"] * n, "weights_sha256": ["aaaa"] * n,
        "aux_model": [None] * n,
        "scored_at": [dt.datetime(2026, 11, 22, 3, tzinfo=dt.UTC)] * n, "run_id": ["run-1"] * n,
    }, schema=output_schema(pa.schema([])))
    run = RunOutput(str(scores), "2026-11-22", "k", output_schema(pa.schema([])))
    run.write_shard(0, table.append_column("row_index", pa.array(range(n), pa.int64())))
    run.commit({"run_key": "k"})
    # Enough labelled images for training's smallest split (3 held out), so its weights are what it stops at.
    (tmp / "labels.csv").write_text("uri,mos\n" + "".join(f"{i}.jpg,{i % 5 + 1}\n" for i in range(20)))
    (tmp / "high.csv").write_text("uri\n" + "".join(f"{u}\n" for u in uris[:3]))
    (tmp / "text.pth").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n")
    (tmp / "weights.json").write_text('{"model": "dgiqa", "url": "https://example.org/DGIQA.pth"}')
    torch.save({"fc.weight": torch.zeros(64, 64)}, tmp / "whole.pth")
    whole = (tmp / "whole.pth").read_bytes()
    (tmp / "truncated.pth").write_bytes(whole[:len(whole) // 2])
    (tmp / "a_file").write_text("not a folder")
    (tmp / "folder.csv").mkdir()
    return {"tmp": str(tmp), "scores": str(scores), "labels": str(tmp / "labels.csv"), "high": str(tmp / "high.csv"),
            "text": str(tmp / "text.pth"), "json": str(tmp / "weights.json"), "truncated": str(tmp / "truncated.pth"),
            "file": str(tmp / "a_file"), "folder": str(tmp / "folder.csv"), "dgiqa": str(checkpoints["dgiqa"]),
            "depth": str(checkpoints["depth"]), "none": str(tmp / "none")}


# Bad weights of each kind, and the phrase the error names them by.
BAD_WEIGHTS = {
    "missing": ("{none}.pth", "no weights at"),
    "text": ("{text}", "is text, not a checkpoint"),
    "json": ("{json}", "is JSON, not a checkpoint"),
    "truncated": ("{truncated}", "is a damaged or truncated PyTorch checkpoint"),
}
# The other model's checkpoint in each slot: Depth Anything given as DGIQA weights, and DGIQA as depth weights.
OTHER_MODEL = {"<W>": ("{depth}", "checkpoint does not fit the model"),
               "<D>": ("{dgiqa}", "not a Depth Anything checkpoint")}
GOOD = {"<W>": "{dgiqa}", "<D>": "{depth}"}
SLOT_NAMES = {"<W>": "weights", "<D>": "depth"}

# Each command's arguments around a DGIQA checkpoint (<W>) and a Depth Anything checkpoint (<D>).
WEIGHTS_SLOTS = {
    "score": ["score", "{tmp}/photo.jpg", "--weights", "<W>", "--depth-weights", "<D>"],
    "evaluate": ["evaluate", "{labels}", "--images-prefix", "/data/library", "--weights", "<W>", "--depth-weights",
                 "<D>", "--bootstrap", "0"],
    "train": ["train", "{labels}", "--output", "{tmp}/train-out", "--init", "dgiqa:<W>", "--depth-weights", "<D>"],
    "report": ["report", "{scores}", "--html", "{tmp}/r.html", "--thumbnails", "1", "--depth-weights", "<D>"],
}


def _weights_cases():
    """Every bad kind of weights in every weights slot of every command, the other slot holding good ones."""
    for command, argv in WEIGHTS_SLOTS.items():
        for slot in [s for s in GOOD if any(s in a for a in argv)]:
            for kind, (path, phrase) in {**BAD_WEIGHTS, "other model": OTHER_MODEL[slot]}.items():
                fill = {**GOOD, slot: path}
                args = [next((a.replace(k, v) for k, v in fill.items() if k in a), a) for a in argv]
                yield pytest.param("dgiqa", args, phrase, id=f"{command}-{SLOT_NAMES[slot]}-{kind}")


CASES = [
    # Missing inputs.
    pytest.param("dgiqa", ["filter", "{none}"], "no scores at", id="filter-missing-scores"),
    pytest.param("dgiqa", ["report", "{none}", "--html", "{tmp}/r.html"], "no scores at", id="report-missing-scores"),
    pytest.param("dgiqa", ["evaluate", "{none}.csv", "--scores", "{scores}"], "{none}.csv",
                 id="evaluate-missing-labels"),
    pytest.param("dgiqa", ["evaluate", "{labels}", "--scores", "{none}"], "no scores at",
                 id="evaluate-missing-scores"),
    pytest.param("dgiqa", ["separation", "--scores", "{none}", "--high", "{high}", "--low", "{high}"], "no scores at",
                 id="separation-missing-scores"),
    pytest.param("dgiqa", ["separation", "--scores", "{scores}", "--high", "{none}.csv", "--low", "{high}"],
                 "no manifest at", id="separation-missing-manifest"),
    pytest.param("dgiqa", ["train", "{none}.csv", "--output", "{tmp}/t", "--init", "random", "--depth-weights",
                           "{depth}"], "{none}.csv", id="train-missing-labels"),
    # Unwritable outputs, found before the (missing) inputs are read.
    pytest.param("dgiqa", ["filter", "{none}", "--out", "/proc/dgiqa-x.csv"],
                 "cannot write to --out /proc/dgiqa-x.csv: a folder on its path does not exist", id="filter-out-proc"),
    pytest.param("dgiqa", ["filter", "{none}", "--out", "{file}/sel.csv"],
                 "cannot write to --out {file}/sel.csv: a part of its path is a file", id="filter-out-under-a-file"),
    pytest.param("dgiqa", ["report", "{none}", "--html", "/proc/dgiqa-x.html"], "cannot write to --html",
                 id="report-html-proc"),
    pytest.param("dgiqa", ["filter", "{none}", "--out", "{folder}"], "--out {folder} is a folder; give a file name",
                 id="filter-out-folder"),
    pytest.param("dgiqa", ["filter", "{none}", "--out", "{tmp}/sel.txt"], "cannot tell the format of",
                 id="filter-out-format"),
    pytest.param("dgiqa", ["evaluate", "{none}.csv", "--scores", "{none}", "--out", "/proc/dgiqa-x.json"],
                 "cannot write to --out /proc/dgiqa-x.json", id="evaluate-out-proc"),
    pytest.param("dgiqa", ["evaluate", "{none}.csv", "--scores", "{none}", "--out", "{folder}"],
                 "--out {folder} is a folder; give a file name", id="evaluate-out-folder"),
    pytest.param("dgiqa", ["evaluate", "{none}.csv", "--weights", "{none}.pth", "--depth-weights", "{none}.pth",
                           "--output", "/proc/dgiqa-x"], "cannot write to --output /proc/dgiqa-x",
                 id="evaluate-output-proc"),
    pytest.param("dgiqa", ["evaluate", "{none}.csv", "--weights", "{none}.pth", "--depth-weights", "{none}.pth",
                           "--output", "{file}"], "--output {file} is a file; give a folder",
                 id="evaluate-output-file"),
    pytest.param("dgiqa", ["separation", "--scores", "{none}", "--high", "{none}", "--low", "{none}", "--plot",
                           "/proc/dgiqa-x.svg"], "cannot write to --plot /proc/dgiqa-x.svg",
                 id="separation-plot-proc"),
    pytest.param("dgiqa", ["separation", "--scores", "{none}", "--high", "{none}", "--low", "{none}", "--plot",
                           "{folder}"], "--plot {folder} is a folder; give a file name", id="separation-plot-folder"),
    pytest.param("dgiqa", ["train", "{none}.csv", "--output", "/proc/dgiqa-x", "--init", "dgiqa:{none}",
                           "--depth-weights", "{none}"], "cannot write to --output /proc/dgiqa-x",
                 id="train-output-proc"),
    pytest.param("dgiqa", ["train", "{none}.csv", "--output", "{file}", "--init", "dgiqa:{none}", "--depth-weights",
                           "{none}"], "--output {file} is a file; give a folder", id="train-output-file"),
    pytest.param("dgiqa", ["train", "{none}.csv", "--output", "{tmp}/t", "--depth-cache", "/proc/dgiqa-x", "--init",
                           "random", "--depth-weights", "{none}"], "cannot write to --depth-cache /proc/dgiqa-x",
                 id="train-depth-cache-proc"),
    # The jobs' wrappers say the same.
    pytest.param("evaluate", ["{none}.csv", "--scores", "{none}", "--out", "/proc/dgiqa-x.json"],
                 "cannot write to --out /proc/dgiqa-x.json", id="job-evaluate-out-proc"),
    pytest.param("evaluate", ["{labels}", "--scores", "{none}"], "no scores at", id="job-evaluate-missing-scores"),
    pytest.param("filter_scores", ["{none}", "--out", "/proc/dgiqa-x.csv"], "cannot write to --out /proc/dgiqa-x.csv",
                 id="job-filter-out-proc"),
    pytest.param("filter_scores", ["{none}"], "no scores at", id="job-filter-missing-scores"),
    pytest.param("train", ["{none}.csv", "--output", "/proc/dgiqa-x", "--init", "random", "--depth-weights",
                                 "{none}"], "cannot write to --output /proc/dgiqa-x", id="job-train-output-proc"),
    pytest.param("train", ["{labels}", "--output", "{tmp}/job-train", "--init", "random", "--depth-weights",
                                 "{dgiqa}"], "not a Depth Anything checkpoint", id="job-train-depth-is-dgiqa"),
    *_weights_cases(),
]


@pytest.mark.parametrize(("runner", "argv", "phrase"), CASES)
def test_a_users_mistake_is_one_line_and_exit_2(runner, argv, phrase, files, capsys):
    run = dgiqa if runner == "dgiqa" else _job(runner)
    code = run([arg.format(**files) for arg in argv])
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert "Traceback" not in captured.err + captured.out
    assert code == 2 and len(lines) == 1, captured.err
    assert PREFIX.match(lines[0]) and phrase.format(**files) in lines[0], lines[0]


def test_a_refused_output_leaves_nothing_behind(files, capsys):
    """The probe of an output below a file, or of a folder it would create, leaves no empty folder."""
    target = Path(files["tmp"]) / "new" / "deeper" / "sel.csv"
    assert dgiqa(["filter", files["none"], "--out", str(target)]) == 2
    assert "no scores at" in capsys.readouterr().err
    assert not (Path(files["tmp"]) / "new").exists()


def test_an_os_error_is_told_as_its_path_and_reason_without_errno():
    """An ``OSError`` our checks did not foresee (a disk filling up mid-write) still reads as one plain line."""
    from pipeline.cli import error_line

    assert error_line(OSError(28, "No space left on device", "/data/sel.csv")) == \
        "/data/sel.csv: no space left on device"
    assert error_line(ValueError("--top is a fraction in (0, 1],\n got 2")) == "--top is a fraction in (0, 1], got 2"
