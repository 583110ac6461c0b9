"""DPAM-IQA's network: the authors' checkpoint layout, the strict loader, and the shortened ViT pass.

Its outputs against the authors' code are checked in ``tests/test_dpam_parity.py``.
"""

import pytest
import torch

from pipeline.models.dgiqa import build_dgiqa
from pipeline.models.dpam import DPAM, GRID, VIT_FEATURE_BLOCKS, build_dpam, checkpoint_filter_fn
from pipeline.scoring.weights import WeightsError, check_fits
from tests.conftest import read_layout


@pytest.fixture(scope="module")
def meta_model() -> DPAM:
    with torch.device("meta"):
        return build_dpam()


def test_state_dict_is_the_recorded_layout_of_the_authors_model(meta_model):
    """The layout in tests/data was written from the authors' MANIQA class (Roc-3/DPAM_IQA), not from this one."""
    mine = {key: (tuple(t.shape), str(t.dtype).removeprefix("torch.")) for key, t in meta_model.state_dict().items()}
    recorded = read_layout("dpam")
    assert len(recorded) == 325 and mine == recorded
    assert sum(p.numel() for p in meta_model.parameters()) == 172_537_214  # the authors' count


def test_the_loader_takes_the_authors_file_and_a_data_parallel_one_and_refuses_another_models(meta_model):
    state = {key: torch.empty(shape, dtype=getattr(torch, dtype), device="meta")
             for key, (shape, dtype) in read_layout("dpam").items()}
    assert set(check_fits(meta_model, state, "DPAM-IQA", checkpoint_filter_fn)) == set(state)
    wrapped = {f"module.{key}": value for key, value in state.items()}
    assert set(check_fits(meta_model, wrapped, "DPAM-IQA", checkpoint_filter_fn)) == set(state)

    with torch.device("meta"):
        dgiqa = build_dgiqa().state_dict()
    refused_as = r"DPAM-IQA checkpoint does not fit the model: 325 missing keys: block1\.attn"
    with pytest.raises(WeightsError, match=refused_as) as refused:
        check_fits(meta_model, dgiqa, "DPAM-IQA", checkpoint_filter_fn)
    assert "482 unexpected keys: backbone.layers_0" in str(refused.value)  # the unexpected keys are named too
    partial = {key: value for key, value in state.items() if not key.startswith("fc_weight.")}
    with pytest.raises(WeightsError, match=r"fc_weight\.0\.weight"):
        check_fits(meta_model, partial, "DPAM-IQA", checkpoint_filter_fn)


def test_the_features_are_blocks_6_to_9_of_the_whole_vit_pass():
    """``vit_features`` stops after block 9; the authors run the whole ViT and take four blocks' outputs by hooks.

    The hooks here are on today's timm model itself, so a wrong block index, a kept class token or a missed
    positional embedding would show.
    """
    torch.manual_seed(0)
    model = build_dpam()
    outputs = []
    handles = [block.register_forward_hook(lambda m, i, o: outputs.append(o)) for block in model.vit.blocks]
    rgb = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        model.vit(rgb)
        hooked = torch.cat([outputs[i][:, 1:] for i in VIT_FEATURE_BLOCKS], dim=2).transpose(1, 2)
        outputs.clear()
        features = model.vit_features(rgb)
    for handle in handles:
        handle.remove()
    assert features.shape == (1, 3072, GRID * GRID)
    assert torch.equal(features, hooked)
    assert len(outputs) == VIT_FEATURE_BLOCKS[-1] + 1  # blocks 10 and 11 were not run
