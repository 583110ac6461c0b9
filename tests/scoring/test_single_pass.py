"""The DP-IQA student through the registry: the CLI and the actor score what the authors' inference computes."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.batch.allowlist import Allowlist
from pipeline.batch.stages import ScoreActor, fetch_batch, prepare_batch
from pipeline.cli import main as dgiqa
from pipeline.models.dpiqa import build_dpiqa_student
from pipeline.scoring.sample import write_random_dgiqa
from pipeline.scoring.scorer import ScorerConfig, check_models, make_scorer
from pipeline.scoring.single_pass import PreparedPixels, SinglePassScorer
from pipeline.scoring.weights import WeightsError
from tests.conftest import DATA

EVERYWHERE = Allowlist(["/"])  # these tests read their own temporary files


@pytest.fixture(scope="module")
def student(dpiqa_student):
    return dpiqa_student


@pytest.fixture(scope="module")
def scorer(student):
    # One image per pass: random EfficientNet-B7 weights are chaotic enough that the last float bit of a
    # batch-size-dependent kernel choice shows in the score; trained weights are not (see tests/models).
    return make_scorer(ScorerConfig(weights=str(student), model="dpiqa-student", device="cpu", forward_batch=1))


def _authors_inference(model: torch.nn.Module, path) -> float:
    """What the authors' script computes: Pillow RGB, Pillow bilinear 512x512, /255, one forward."""
    image = Image.open(path).convert("RGB").resize((512, 512), Image.BILINEAR)
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div(255)[None]
    with torch.inference_mode():
        return float(model(x).reshape(-1)[0])


@pytest.mark.slow
def test_scores_equal_the_authors_inference(scorer, student, photo_paths):
    assert isinstance(scorer, SinglePassScorer)
    model = build_dpiqa_student()
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(student)), strict=True)
    results = [scorer.score_bytes(p.read_bytes()) for p in photo_paths[:2]]
    for path, result in zip(photo_paths[:2], results, strict=True):
        assert result.score == pytest.approx(_authors_inference(model, path), abs=1e-5)
        assert result.num_crops == 1 and result.score_std is None
    # Different photographs, different scores: the score is a function of the pixels.
    assert results[0].score != results[1].score


def test_model_id_names_the_scorer_and_its_weights(scorer, student):
    info = check_models(ScorerConfig(weights=str(student), model="dpiqa-student"))
    assert info.model_id == scorer.model_id and info.model_id.startswith("dpiqa-student@")
    assert len(info.model_id.split("@")[1]) == 64 and "MOS" in info.output_scale


def test_dgiqa_weights_are_refused_for_the_student(tmp_path):
    dgiqa_weights = write_random_dgiqa(tmp_path / "dgiqa.safetensors")
    refused = r"^DP-IQA student \(--weights .*dgiqa.safetensors\) checkpoint does not fit the model"
    with pytest.raises(WeightsError, match=refused):
        check_models(ScorerConfig(weights=str(dgiqa_weights), model="dpiqa-student"))


@pytest.mark.slow
def test_actor_and_cli_give_the_same_scores(scorer, student, photo_paths, tmp_path, capsys):
    uris = [f"file://{p}" for p in photo_paths[:2]]
    import pyarrow as pa

    batch = pa.table({"row_index": pa.array([0, 1], pa.int64()), "uri": uris,
                      "status": ["ok", "ok"], "error": pa.array([None, None], pa.string())})
    prepared = prepare_batch(fetch_batch(batch, allowlist=EVERYWHERE), scorer.config)
    out = ScoreActor(scorer.config, scorer.model_id)(prepared).to_pylist()
    assert [r["status"] for r in out] == ["ok", "ok"] and all(r["num_crops"] == 1 for r in out)
    code = dgiqa(["score", "--model", "dpiqa-student", "--weights", str(student), "--json",
                  *map(str, photo_paths[:2])])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 0 and [r["model_id"] for r in lines] == [scorer.model_id] * 2
    assert [r["score"] for r in lines] == pytest.approx([r["score"] for r in out], abs=1e-6)


def test_a_bad_image_is_one_error_line(student, tmp_path, capsys):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    good = tmp_path / "good.png"
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (120, 30, 200)).save(buf, "PNG")
    good.write_bytes(buf.getvalue())
    code = dgiqa(["score", "--model", "dpiqa-student", "--weights", str(student), str(bad), str(good)])
    out = capsys.readouterr().out.splitlines()
    assert code == 1 and "error:" in out[0] and out[1].startswith(str(good))


def test_prepared_pixels_round_trip():
    item = PreparedPixels(np.arange(12, dtype=np.uint8).reshape(2, 2, 3), 7, 9)
    again = PreparedPixels.from_arrays(item.to_arrays(), 7, 9)
    assert np.array_equal(again.pixels, item.pixels) and (again.height, again.width) == (7, 9)


# Scores of the same pixels on two paths agree to 1e-5 (above); a setting that changes the pixels a score sees
# must move it by far more than that to count as a change.
EXIF_CHANGE = 1e-2


def test_exif_transpose_flag_scores_a_rotated_photo_upright(student, capsys):
    # Stored 300x451 with the EXIF tag "rotate 90 degrees to view": squashed to 512x512 sideways or upright.
    photo = str(DATA / "chelsea_exif_rotated.jpg")
    rows = []
    for flag in ([], ["--exif-transpose"]):
        code = dgiqa(["score", "--model", "dpiqa-student", "--weights", str(student), "--device", "cpu", "--json",
                      photo, *flag])
        assert code == 0
        rows.append(json.loads(capsys.readouterr().out))
    sideways, upright = rows
    assert (sideways["width"], sideways["height"], upright["width"], upright["height"]) == (300, 451, 451, 300)
    # Measured with the random test weights: 0.605 sideways, 0.795 upright.
    assert abs(upright["score"] - sideways["score"]) > EXIF_CHANGE
