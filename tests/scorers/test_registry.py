import dataclasses

import pytest

from pipeline.scorers.registry import SCORER_OPTIONS, get_scorer, model_id_options, resolve, scorer_names
from pipeline.scoring.scorer import ScorerConfig


def test_every_scorer_is_registered_dgiqa_first():
    assert scorer_names() == ("dgiqa", "dpam", "dpiqa", "dpiqa-student")


@pytest.mark.parametrize("name", ["dgiqa", "dpam", "dpiqa-student"])
def test_every_reference_of_a_spec_resolves_to_a_callable(name):
    spec = get_scorer(name)
    refs = [spec.builder, spec.filter_fn, spec.preprocessing, spec.runner] + ([spec.to_tensor] if spec.to_tensor
                                                                             else [])
    for ref in refs:
        assert callable(resolve(ref)), ref
    assert spec.output_scale and spec.summary


def test_unknown_model_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown model 'brisque'; models are dgiqa, dpam, dpiqa, dpiqa-student"):
        get_scorer("brisque")


def test_depth_weights_are_required_only_where_a_depth_model_is_used():
    with pytest.raises(ValueError, match="--depth-weights is required for --model dgiqa"):
        ScorerConfig(weights="w.pth")
    assert ScorerConfig(weights="w.pth", model="dpiqa-student").depth_weights is None


@pytest.mark.parametrize("name", ["dgiqa", "dpam", "dpiqa-student"])
def test_a_spec_declares_exactly_the_options_its_code_reads(name):
    """The light declaration (what ``--help`` and the checks use) agrees with what runner and preprocessing read."""
    spec = get_scorer(name)
    read = set().union(*(getattr(resolve(ref), "uses_options", ()) for ref in (spec.runner, spec.preprocessing)))
    assert spec.options == read


def test_the_option_choices_are_the_depth_models():
    from pipeline.models import depth_anything as da

    assert SCORER_OPTIONS["encoder"].choices == ("auto", *da.ENCODERS)
    assert SCORER_OPTIONS["depth_version"].choices == da.VERSIONS


def test_the_trained_on_choices_are_the_dpam_presets():
    from pipeline.scoring import dpam_preprocess

    assert SCORER_OPTIONS["trained_on"].choices == tuple(dpam_preprocess.PRESETS)
    assert SCORER_OPTIONS["trained_on"].default == dpam_preprocess.DEFAULT_PRESET
    assert not SCORER_OPTIONS["trained_on"].keyed_at_default  # runs keyed before the option existed resume


def test_model_id_names_the_score_changing_options_set_away_from_their_defaults():
    defaults = {name: option.default for name, option in SCORER_OPTIONS.items()}
    assert [model_id_options(name, defaults) for name in scorer_names()] == ["", "", "", ""]
    dgiqa = {**defaults, "crops": 5, "depth_input_size": 700, "draft_decode": True, "decode": "gpu"}
    assert model_id_options("dgiqa", dgiqa) == "crops=5,depth-input-size=700"  # speed options: not named
    assert model_id_options("dpam", {**defaults, "trained_on": "koniq10k"}) == "trained-on=koniq10k"
    assert model_id_options("dpiqa-student", {**defaults, "exif_transpose": True}) == "exif-transpose=true"
    assert model_id_options("dpiqa", {**defaults, "latent": "mean"}) == "latent=mean"
    # Every option that changes what a scorer reads from the image is named, or is in model_id already.
    assert {name for name, option in SCORER_OPTIONS.items() if not (option.names_model or option.in_model_id)} == {
        "draft_decode", "decode"}


def test_a_spec_with_an_unknown_option_is_refused_when_declared():
    spec = get_scorer("dgiqa")
    with pytest.raises(RuntimeError, match=r"declares unknown options \['crop'\]"):
        dataclasses.replace(spec, options=frozenset({"crop"}))


def test_no_code_outside_the_registry_special_cases_a_scorer_by_name():
    """The registry is the only road: every scorer is built, checked and run through its spec."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "pipeline"
    pattern = re.compile(r"""\bmodel\s*[!=]=\s*["']|["'](dgiqa|dpam|dpiqa-student)["']\s*[!=]=\s*\w*model""")
    found = [f"{path.relative_to(root)}:{n}" for path in sorted(root.rglob("*.py")) if "scorers" not in path.parts
             for n, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert found == []


def test_training_goes_through_the_spec_and_refuses_scorers_that_do_not_train(capsys):
    from pipeline.cli import build_parser
    from pipeline.scorers.registry import trainable_scorers

    assert trainable_scorers() == ("dgiqa", "dpam")
    assert callable(resolve(get_scorer("dgiqa").trainer)) and callable(resolve(get_scorer("dpam").trainer))
    assert not get_scorer("dpiqa-student").trainer
    base = ["train", "labels.csv", "--output", "out", "--init", "random", "--depth-weights", "d"]
    assert build_parser().parse_args(base).model == "dgiqa"
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args([*base, "--model", "dpiqa-student"])
    assert exited.value.code == 2
    assert "argument --model: invalid choice: 'dpiqa-student' (choose from 'dgiqa', 'dpam')" in capsys.readouterr().err
