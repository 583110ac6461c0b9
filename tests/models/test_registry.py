import pytest

from pipeline.models.registry import get_scorer, resolve, scorer_names
from pipeline.scorer import ScorerConfig


def test_both_scorers_are_registered_dgiqa_first():
    assert scorer_names()[0] == "dgiqa"
    assert set(scorer_names()) == {"dgiqa", "dpiqa-student"}


@pytest.mark.parametrize("name", ["dgiqa", "dpiqa-student"])
def test_every_reference_of_a_spec_resolves_to_a_callable(name):
    spec = get_scorer(name)
    refs = [spec.builder, spec.filter_fn, spec.preprocessing, spec.runner] + ([spec.to_tensor] if spec.to_tensor
                                                                             else [])
    for ref in refs:
        assert callable(resolve(ref)), ref
    assert spec.output_scale and spec.summary


def test_unknown_model_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown model 'brisque'; models are dgiqa, dpiqa-student"):
        get_scorer("brisque")


def test_depth_weights_are_required_only_where_a_depth_model_is_used():
    with pytest.raises(ValueError, match="--depth-weights is required for --model dgiqa"):
        ScorerConfig(weights="w.pth")
    assert ScorerConfig(weights="w.pth", model="dpiqa-student").depth_weights is None
