import pytest
import torch
import torch.nn.functional as F

from pipeline.models.depth_anything import (
    ENCODERS,
    PRETRAIN_GRID,
    build_depth_anything,
    checkpoint_filter_fn,
    encoder_of,
)
from tests.conftest import read_layout


@pytest.mark.parametrize("encoder", ["vits", "vitb", "vitl"])
def test_state_dict_equals_published_v1_layout(encoder):
    with torch.device("meta"):  # shapes only: no memory for ViT-L
        model = build_depth_anything(encoder)
    layout = read_layout(f"depth_anything_v1_{encoder}14")
    ours = {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in model.state_dict().items()}
    assert sorted(ours) == sorted(layout)
    assert {k: v for k, v in ours.items() if v != layout[k]} == {}
    assert encoder_of(model.state_dict()) == encoder


def test_encoder_of_rejects_other_checkpoints():
    with pytest.raises(KeyError, match="pretrained.pos_embed"):
        encoder_of({"fc.weight": torch.zeros(1)})


def test_v1_reads_last_four_blocks_v2_fixed_blocks():
    with torch.device("meta"):
        assert build_depth_anything("vitl", "v1").layer_indices == (20, 21, 22, 23)
        assert build_depth_anything("vitl", "v2").layer_indices == ENCODERS["vitl"].v2_layers
        assert build_depth_anything("vits", "v1").layer_indices == (8, 9, 10, 11)
    with pytest.raises(ValueError, match="unknown Depth Anything encoder"):
        build_depth_anything("vitg")


@pytest.fixture(scope="module")
def vits():
    torch.manual_seed(0)
    model = build_depth_anything("vits")
    with torch.no_grad():
        model.depth_head.scratch.output_conv2[2].bias.fill_(0.5)
    return model


@pytest.mark.slow
def test_full_size_forward_vits(vits):
    x = torch.randn(1, 3, 518, 518)
    with torch.inference_mode():
        depth = vits(x)
    assert depth.shape == (1, 518, 518)
    assert (depth >= 0).all() and depth.std() > 0


def test_position_embeddings_resampled_by_scale_factor(vits):
    enc = vits.pretrained
    assert enc.interpolated_pos_embed(PRETRAIN_GRID, PRETRAIN_GRID) is enc.pos_embed
    resampled = enc.interpolated_pos_embed(5, 7)
    assert resampled.shape == (1, 1 + 5 * 7, enc.embed_dim)
    torch.testing.assert_close(resampled[:, 0], enc.pos_embed[:, 0])
    # The published rule resamples by the factor (n + 0.1) / 37; resampling to the target size differs.
    grid = enc.pos_embed[:, 1:].reshape(1, 37, 37, -1).permute(0, 3, 1, 2)
    to_size = F.interpolate(grid, size=(5, 7), mode="bicubic", align_corners=False)
    to_size = to_size.permute(0, 2, 3, 1).reshape(1, 35, -1)
    assert (resampled[:, 1:] - to_size).abs().max() > 1e-4


def test_non_square_inputs_and_bad_sizes(vits):
    with torch.inference_mode():
        depth = vits(torch.randn(2, 3, 70, 98))
        single = vits(torch.randn(1, 3, 70, 98))
    assert depth.shape == (2, 70, 98) and single.shape == (1, 70, 98)
    with pytest.raises(ValueError, match="multiples of 14"):
        vits(torch.randn(1, 3, 70, 100))


def test_chunked_dinov2_block_keys_are_flattened():
    state = {"pretrained.blocks.1.4.norm1.weight": torch.zeros(2), "pretrained.blocks.4.norm1.bias": torch.zeros(2)}
    expected = ["pretrained.blocks.4.norm1.bias", "pretrained.blocks.4.norm1.weight"]
    assert sorted(checkpoint_filter_fn(state)) == expected
