"""DP-IQA's network: the authors' checkpoint layout, Stable Diffusion v1.5's sizes, the strict loader.

Its scores against the authors' code are checked in ``tests/test_dpiqa_parity.py``.
"""

import pytest
import torch

from pipeline.models.dpiqa import build_dpiqa_student
from pipeline.models.dpiqa_diffusion import ARCHITECTURES, architecture_of, build_dpiqa, checkpoint_filter_fn
from pipeline.scoring.weights import WeightsError, check_fits
from tests.conftest import read_layout


@pytest.fixture(scope="module")
def meta_model():
    with torch.device("meta"):
        return build_dpiqa("sd15")


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_state_dict_is_the_recorded_layout_of_the_authors_model(meta_model):
    """The layout in tests/data was written from the authors' DPIQA class (RomGai/DP-IQA), not from this one."""
    mine = {key: (tuple(t.shape), str(t.dtype).removeprefix("torch.")) for key, t in meta_model.state_dict().items()}
    recorded = read_layout("dpiqa")
    assert len(recorded) == 1016 and mine == recorded
    assert list(mine) == list(recorded)  # the same order too: the authors' module tree


def test_the_diffusion_parts_have_stable_diffusion_v15s_published_sizes(meta_model):
    """Counts published for SD v1.5 (U-Net 859.52 M, VAE 83.65 M): the configurations here are that model's."""
    assert _count(meta_model.unet) == 859_520_964
    assert _count(meta_model.vae) == 83_653_863
    assert meta_model.vae.config.scaling_factor == 0.18215


def test_the_loader_takes_the_authors_file_and_refuses_the_students(meta_model):
    state = {key: torch.empty(shape, dtype=getattr(torch, dtype), device="meta")
             for key, (shape, dtype) in read_layout("dpiqa").items()}
    assert set(check_fits(meta_model, state, "DP-IQA", checkpoint_filter_fn)) == set(state)
    wrapped = {f"module.{key}": value for key, value in state.items()}
    assert set(check_fits(meta_model, wrapped, "DP-IQA", checkpoint_filter_fn)) == set(state)
    with torch.device("meta"):
        student = build_dpiqa_student().state_dict()
    with pytest.raises(WeightsError, match=r"DP-IQA checkpoint does not fit the model: 1016 missing keys: QFD") \
            as refused:
        check_fits(meta_model, student, "DP-IQA", checkpoint_filter_fn)
    assert "1206 unexpected keys: base_model.features" in str(refused.value)
    partial = {key: value for key, value in state.items() if key != "gamma"}
    with pytest.raises(WeightsError, match=r"1 missing keys: gamma"):
        check_fits(meta_model, partial, "DP-IQA", checkpoint_filter_fn)


def test_the_architecture_is_read_from_the_checkpoints_shapes(meta_model):
    state = {key: torch.empty(shape, device="meta") for key, (shape, _) in read_layout("dpiqa").items()}
    assert architecture_of(state).name == "sd15"
    with torch.device("meta"):
        tiny = build_dpiqa("tiny").state_dict()
    assert architecture_of(tiny).name == "tiny"
    assert _count(build_dpiqa("tiny")) < _count(meta_model) / 30
    assert architecture_of({}) is ARCHITECTURES["sd15"]  # unknown: the strict load then names what differs


def test_prompt_features_of_another_width_are_refused_in_one_line():
    model = build_dpiqa("tiny")
    with pytest.raises(ValueError, match=r"must be a \(prompts, 32\) float tensor, got \(495, 768\)"):
        model.set_prompts(torch.zeros(495, 768))
    with pytest.raises(RuntimeError, match="no prompt features"):
        model(torch.zeros(1, 3, 64, 64))
