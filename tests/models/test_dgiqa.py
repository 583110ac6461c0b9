import re

import pytest
import torch

from pipeline.models.dgiqa import DGIQA, build_dgiqa, checkpoint_filter_fn
from pipeline.scoring.weights import WeightsError, check_fits, load_strict, read_checkpoint
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


def _published_layout_file(path, drop: str | None = None, add: str | None = None):
    """A ``.pth`` of zeros with exactly the recorded published keys, shapes and dtypes (one dropped or added)."""
    layout = read_layout("dgiqa")
    state = {key: torch.zeros(shape, dtype=getattr(torch, dtype)) for key, (shape, dtype) in layout.items()}
    if drop:
        del state[drop]
    if add:
        state[add] = torch.zeros(3)
    torch.save(state, path)
    return path


def test_published_layout_loads_strictly(tmp_path):
    """A checkpoint in the recorded published layout loads through the product's path (read, remap, strict load).

    The layout comes from ``tests/data``, not from this model's own state dict, so a renamed module, a filter
    function that rewrites a published key, or a loader that ignores the file all fail here.
    """
    ckpt = read_checkpoint(str(_published_layout_file(tmp_path / "published.pth")))
    fresh = build_dgiqa()
    load_strict(fresh, ckpt.state_dict, "DGIQA (--weights published.pth)", checkpoint_filter_fn)
    loaded = fresh.state_dict()
    assert sorted(loaded) == sorted(read_layout("dgiqa"))
    assert [key for key, value in loaded.items() if value.count_nonzero()] == []  # the file's zeros, not the init


def _meta_dgiqa() -> DGIQA:
    """The architecture without memory, as a job's driver checks weights before any work (``check_fits``)."""
    with torch.device("meta"):
        return build_dgiqa()


@pytest.mark.parametrize("key", ["backbone.layers_2.blocks.3.attn.relative_position_bias_table",
                                 "tcb2_depth.norm.num_batches_tracked"])
def test_published_layout_less_one_key_is_refused_with_the_key_named(tmp_path, key):
    assert key in read_layout("dgiqa")
    ckpt = read_checkpoint(str(_published_layout_file(tmp_path / "short.pth", drop=key)))
    with pytest.raises(WeightsError, match=f"1 missing keys: {re.escape(key)}$"):
        check_fits(_meta_dgiqa(), ckpt.state_dict, "DGIQA (--weights short.pth)", checkpoint_filter_fn)


def test_published_layout_plus_one_key_is_refused_with_the_key_named(tmp_path):
    ckpt = read_checkpoint(str(_published_layout_file(tmp_path / "long.pth", add="backbone.layers_1.extra.weight")))
    with pytest.raises(WeightsError, match=r"1 unexpected keys: backbone\.layers_1\.extra\.weight$"):
        check_fits(_meta_dgiqa(), ckpt.state_dict, "DGIQA (--weights long.pth)", checkpoint_filter_fn)


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
