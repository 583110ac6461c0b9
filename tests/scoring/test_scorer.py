import io

import cv2
import numpy as np
import pytest
from PIL import Image

from pipeline.scoring.preprocess import ImageError, PreprocessConfig, decode_image
from pipeline.scoring.sample import synthetic_photo
from pipeline.scoring.scorer import Scorer, ScorerConfig, check_models, prepare_item
from pipeline.scoring.weights import WeightsError
from tests.conftest import FAST


def test_real_photographs_score(fast_scorer, photo_paths):
    for path in photo_paths:
        data = path.read_bytes()
        result = fast_scorer.score_bytes(data)
        h, w = decode_image(data).shape[:2]
        assert 0 < result.score < 1
        assert result.score_std >= 0 and result.num_crops == FAST.num_crops
        assert (result.width, result.height) == (w, h)


def test_score_is_mean_of_crop_scores_and_independent_of_batch(fast_scorer, photo_paths):
    images = [decode_image(p.read_bytes()) for p in photo_paths[:3]]
    together = fast_scorer.score_images(images)
    alone = [fast_scorer.score_images([img])[0] for img in images]
    reversed_order = fast_scorer.score_images(images[::-1])[::-1]
    # Same-size depth inputs share a forward pass; its float rounding (which depends on the batch and on the
    # machine's thread count) may move depth-map pixels by one level, so scores agree to rounding, not bit for
    # bit: measured up to 2.1e-5. A row given another photo's crops or scores would be off by the spread below.
    tolerance = 1e-4
    for a, b, c in zip(together, alone, reversed_order, strict=True):
        assert a.score == pytest.approx(b.score, abs=tolerance) == pytest.approx(c.score, abs=tolerance)
        assert a.score_std == pytest.approx(b.score_std, abs=tolerance)
    scores = sorted(r.score for r in together)
    assert min(b - a for a, b in zip(scores, scores[1:], strict=False)) > 100 * tolerance  # photos far apart


def test_depth_map_varies_and_matches_image_size(fast_scorer, photo_paths):
    rgb = decode_image(photo_paths[0].read_bytes())
    depth = fast_scorer.depth_map(rgb)
    assert depth.shape == rgb.shape and depth.dtype == np.uint8
    assert depth.min() == 0 and depth.max() >= 254  # 255 * range / (range + 1e-8) may truncate to 254


def _encoded(kind: str) -> bytes:
    rgb = synthetic_photo(300, 400, seed=7)
    buf = io.BytesIO()
    if kind == "exif_rotated":
        exif = Image.Exif()
        exif[0x0112] = 6
        Image.fromarray(rgb).save(buf, "JPEG", exif=exif.tobytes())
    elif kind == "grayscale":
        Image.fromarray(rgb[..., 1]).save(buf, "JPEG")
    elif kind == "palette":
        Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE).save(buf, "PNG")
    elif kind == "rgba":
        Image.fromarray(rgb).convert("RGBA").save(buf, "PNG")
    elif kind == "cmyk":
        Image.fromarray(rgb).convert("CMYK").save(buf, "JPEG")
    elif kind == "16bit":
        ok, png = cv2.imencode(".png", (rgb.astype(np.uint16) * 257)[..., ::-1])
        assert ok
        return png.tobytes()
    return buf.getvalue()


@pytest.mark.parametrize("kind", ["exif_rotated", "grayscale", "palette", "rgba", "cmyk", "16bit"])
def test_every_image_mode_scores(fast_scorer, kind):
    result = fast_scorer.score_bytes(_encoded(kind))
    assert 0 < result.score < 1
    assert (result.width, result.height) == ((300, 400) if kind == "exif_rotated" else (400, 300))


@pytest.mark.parametrize(("data", "message"), [
    (b"", "empty file"),
    (b"GIF89a but not really", "truncated or corrupt|not a recognised"),
    (_encoded("grayscale")[:200], "truncated or corrupt"),
])
def test_bad_images_raise_image_errors(fast_scorer, data, message):
    with pytest.raises(ImageError, match=message):
        fast_scorer.score_bytes(data)


def test_model_id_names_both_weights_and_the_score_changing_options(fast_scorer):
    info = fast_scorer.info
    assert fast_scorer.model_id == (f"dgiqa@{info.weights_sha256}+depth-anything-v1-vits@{info.depth_sha256}"
                                    "+crops=2,depth-input-size=70")  # the tests' fast settings, not the published
    assert len(info.weights_sha256) == 64 and fast_scorer.encoder == "vits"
    # The driver's check sees the same model id without building the models.
    assert check_models(fast_scorer.config) == info


def test_wrong_weights_fail_at_load_with_clear_errors(checkpoints):
    dgiqa, depth = str(checkpoints["dgiqa"]), str(checkpoints["depth"])
    with pytest.raises(WeightsError, match="--encoder vitl was given, but --depth-weights .* holds a vits model"):
        Scorer(ScorerConfig(weights=dgiqa, depth_weights=depth, encoder="vitl"))
    with pytest.raises(WeightsError, match="not a Depth Anything checkpoint"):
        Scorer(ScorerConfig(weights=dgiqa, depth_weights=dgiqa))
    with pytest.raises(WeightsError, match=r"DGIQA \(--weights .*\) checkpoint does not fit the model: \d+ missing"):
        Scorer(ScorerConfig(weights=depth, depth_weights=depth))


def test_config_validation():
    with pytest.raises(ValueError, match="encoder must be one of"):
        ScorerConfig(weights="a", depth_weights="b", encoder="vitg")
    with pytest.raises(ValueError, match="attention must be one of sdpa, math"):
        ScorerConfig(weights="a", depth_weights="b", attention="xformers")
    with pytest.raises(ValueError, match="num_crops must be at least 1"):
        PreprocessConfig(num_crops=0)


@pytest.mark.slow
def test_full_size_path_on_a_photo(checkpoints, photo_paths):
    """The published sizes end to end: depth input >= 518 px, 384 px short side, 224 px crops."""
    scorer = Scorer(ScorerConfig(weights=str(checkpoints["dgiqa"]), depth_weights=str(checkpoints["depth"]),
                                 device="cpu", preprocess=PreprocessConfig(num_crops=2)))
    data = photo_paths[1].read_bytes()  # coffee.png, 600x400
    result = scorer.score_bytes(data)
    assert 0 < result.score < 1 and (result.width, result.height) == (600, 400)
    fast = Scorer(ScorerConfig(weights=str(checkpoints["dgiqa"]), depth_weights=str(checkpoints["depth"]),
                               device="cpu", preprocess=PreprocessConfig(num_crops=2, depth_input_size=70)))
    # The depth resolution reaches the score: the published 518 px depth input is not a detail.
    assert abs(fast.score_bytes(data).score - result.score) > 1e-7


def test_fused_and_explicit_attention_give_the_same_scores(checkpoints, photo_paths):
    """``--attention`` changes the kernel, not the numbers: the published explicit products (math) and the
    fused kernel (sdpa, the default) agree to float32 rounding on whole images."""
    def scorer(attention: str) -> Scorer:
        return Scorer(ScorerConfig(weights=str(checkpoints["dgiqa"]), depth_weights=str(checkpoints["depth"]),
                                   device="cpu", attention=attention, preprocess=FAST))

    sdpa, math = scorer("sdpa"), scorer("math")
    assert all(m.fused_attn for m in sdpa.depth_model.modules() if hasattr(m, "fused_attn"))
    assert not any(m.fused_attn for m in math.dgiqa.modules() if hasattr(m, "fused_attn"))
    deltas, map_levels = [], []
    for path in photo_paths[:3]:
        data = path.read_bytes()
        deltas.append(abs(sdpa.score_bytes(data).score - math.score_bytes(data).score))
        prepared = [prepare_item(data, sdpa.config)]
        a, b = sdpa.depth_maps(prepared)[0], math.depth_maps(prepared)[0]
        map_levels.append(int(np.abs(a.astype(int) - b.astype(int)).max()))
    assert max(deltas) <= 1e-5
    assert max(map_levels) <= 1  # uint8 depth maps: at most a rounding level apart
    print(f"\nsdpa vs math attention: max |delta score| = {max(deltas):.1e}, depth maps within {max(map_levels)} "
          "level(s)")


def test_scorer_options_defaults_are_the_configs_defaults():
    import dataclasses

    from pipeline.batch.job import JobConfig
    from pipeline.scorers.registry import SCORER_OPTIONS, get_scorer, scorer_names

    job_defaults = {f.name: f.default for f in dataclasses.fields(JobConfig)}
    assert {name: job_defaults[name] for name in SCORER_OPTIONS} == {n: o.default for n, o in SCORER_OPTIONS.items()}
    config = ScorerConfig(weights="w", depth_weights=None, model="dpiqa-student")
    assert config.options() == {n: o.default for n, o in SCORER_OPTIONS.items()}
    # Every option is some scorer's, and each scorer's are known ones (ScorerSpec.options checks the names).
    assert set().union(*(get_scorer(name).options for name in scorer_names())) == set(SCORER_OPTIONS)


@pytest.mark.parametrize(("model", "kwargs", "flag"), [
    ("dpiqa-student", {"depth_weights": "d.pth"}, "--depth-weights"),
    ("dpiqa-student", {"encoder": "vits"}, "--encoder"),
    ("dpiqa-student", {"depth_version": "v2"}, "--depth-version"),
    ("dpiqa-student", {"preprocess": PreprocessConfig(num_crops=3)}, "--crops"),
    ("dpiqa-student", {"preprocess": PreprocessConfig(depth_input_size=70)}, "--depth-input-size"),
    ("dpiqa-student", {"preprocess": PreprocessConfig(draft=True)}, "--draft-decode"),
    ("dgiqa", {"depth_weights": "d.pth", "exif_transpose": True}, "--exif-transpose"),
])
def test_a_config_setting_an_option_its_scorer_does_not_use_is_refused(model, kwargs, flag):
    with pytest.raises(ValueError, match=f"^{flag} is not used by --model {model} "):
        ScorerConfig(weights="w", model=model, **kwargs)
