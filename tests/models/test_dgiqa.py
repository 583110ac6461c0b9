import re

import pytest
import torch

from pipeline.models.dgiqa import DGIQA, build_dgiqa, checkpoint_filter_fn
from pipeline.weights import WeightsError, load_strict
from tests.conftest import read_layout


@pytest.fixture(scope="module")
def model() -> DGIQA:
    torch.manual_seed(0)
    return build_dgiqa()


def test_state_dict_equals_published_layout(model):
    layout = read_layout("dgiqa")
    ours = {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in model.state_dict().items()}
    assert sorted(ours) == sorted(layout)
    assert {k: v for k, v in ours.items() if v != layout[k]} == {}


def test_published_layout_loads_strictly(model):
    fresh = build_dgiqa()
    fresh.load_state_dict(model.state_dict(), strict=True)
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key


@pytest.mark.slow
def test_full_size_forward_two_crops(model):
    torch.manual_seed(1)
    rgb, depth = torch.randn(2, 3, 224, 224), torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        scores = model(rgb, depth)
        alone = torch.cat([model(rgb[i:i + 1], depth[i:i + 1]) for i in range(2)])
    assert scores.shape == (2,)
    assert ((scores > 0) & (scores < 1)).all()
    # A crop's score does not depend on the other crops in its batch (BatchNorm in eval mode).
    torch.testing.assert_close(scores, alone, atol=1e-5, rtol=0)
    # The depth branch matters: other depth crops give other scores.
    with torch.inference_mode():
        other = model(rgb, torch.randn(2, 3, 224, 224))
    assert (other - scores).abs().max() > 1e-6


def _legacy_timm_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same weights as older timm saved them: layers.N, downsample at stage end, extra buffers."""
    out = {}
    for key, value in state.items():
        m = re.match(r"^(backbone|depth_backbone)\.layers_(\d+)\.(.*)$", key)
        if m:
            stage, rest = int(m.group(2)), m.group(3)
            if rest.startswith("downsample."):
                stage -= 1
            key = f"{m.group(1)}.layers.{stage}.{rest}"
            if rest.endswith("attn.relative_position_bias_table"):
                prefix = key.removesuffix("relative_position_bias_table")
                out[prefix + "relative_position_index"] = torch.zeros(49, 49, dtype=torch.long)
                out[key.split(".attn.")[0] + ".attn_mask"] = torch.zeros(4, 49, 49)
        out["module." + key] = value
    return out


def test_older_timm_checkpoints_are_remapped(model):
    state = model.state_dict()
    legacy = _legacy_timm_layout(state)
    assert any(".layers.0.downsample." in k for k in legacy)
    unwrapped = {k.removeprefix("module."): v for k, v in legacy.items()}
    remapped = checkpoint_filter_fn(unwrapped)
    assert sorted(remapped) == sorted(state)
    fresh = build_dgiqa()
    load_strict(fresh, unwrapped, "DGIQA", checkpoint_filter_fn)
    assert all(torch.equal(fresh.state_dict()[k], state[k]) for k in state)


def test_wrong_checkpoint_names_the_keys(model):
    state = dict(model.state_dict())
    del state["fc.bias"]
    state["head.weight"] = torch.zeros(3)
    state["fc.weight"] = torch.zeros(2, 1024)
    with pytest.raises(WeightsError) as info:
        load_strict(build_dgiqa(), state, "DGIQA (--weights x.pth)", checkpoint_filter_fn)
    message = str(info.value)
    assert "x.pth" in message
    assert "missing keys: fc.bias" in message
    assert "unexpected keys: head.weight" in message
    assert "fc.weight (2, 1024) vs (1, 1024)" in message
