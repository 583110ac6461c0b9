"""The attention switch: every attention layer follows it, each mode runs its own kernel, and they agree."""

import pytest
import torch
import torch.nn.functional as F
from timm.models.swin_transformer import WindowAttention
from timm.models.vision_transformer import Attention

from pipeline.models.attention import ATTENTION_MODES, set_attention
from pipeline.models.depth_anything import build_depth_anything
from pipeline.models.dgiqa import SpatialAttentionBlock, build_dgiqa

ATTENTION_TYPES = (WindowAttention, Attention, SpatialAttentionBlock)

# Fused and explicit attention compute the same function and differ in float32 rounding only; scores in [0, 1]
# moved by at most a few 1e-7 on random weights, features and depth by a few 1e-6 of their scale.
SCORE_ATOL = 1e-5
FEATURE_RTOL = 1e-4


@pytest.fixture(scope="module")
def dgiqa():
    torch.manual_seed(0)
    return build_dgiqa()


@pytest.fixture(scope="module")
def depth():
    torch.manual_seed(0)
    return build_depth_anything("vits")


@pytest.fixture
def sdpa_calls(monkeypatch):
    """Counts calls of the real ``scaled_dot_product_attention`` (timm and ``nn.MultiheadAttention`` look the
    function up on ``torch.nn.functional`` at call time)."""
    calls = []
    real = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    return calls


def _run(model, mode, *inputs, watch=None):
    """``model(*inputs)`` in ``mode``; with ``watch``, also that submodule's output."""
    seen = []
    handle = watch.register_forward_hook(lambda _m, _i, out: seen.append(out.clone())) if watch else None
    set_attention(model, mode)
    try:
        with torch.inference_mode():
            out = model(*inputs)
    finally:
        set_attention(model, "sdpa")
        if handle:
            handle.remove()
    return (out, seen[0]) if watch else out


def test_builders_use_the_fused_kernel_and_the_switch_reaches_every_attention_layer(dgiqa, depth):
    for model, expected in ((dgiqa, 2 * 12 + 2), (depth, 12)):  # 2 Swin-T of 12 blocks + 2 DGIQA blocks; ViT-S
        layers = [m for m in model.modules() if isinstance(m, ATTENTION_TYPES)]
        assert len(layers) == expected
        assert all(m.fused_attn for m in layers)
        assert set_attention(model, "math") == expected
        assert not any(m.fused_attn for m in layers)
        set_attention(model, "sdpa")
        assert all(m.fused_attn for m in layers)


def test_unknown_mode_is_refused(dgiqa):
    with pytest.raises(ValueError, match="attention must be one of sdpa, math, got 'flash'"):
        set_attention(dgiqa, "flash")
    assert ATTENTION_MODES == ("sdpa", "math")


@pytest.mark.slow
def test_dgiqa_modes_run_their_own_kernels_and_agree_on_full_size_crops(dgiqa, sdpa_calls):
    torch.manual_seed(1)
    rgb, depth_crops = torch.randn(2, 3, 224, 224), torch.randn(2, 3, 224, 224)
    math, math_features = _run(dgiqa, "math", rgb, depth_crops, watch=dgiqa.refinement_attention)
    assert sdpa_calls == []  # the published explicit products, nothing fused
    fused, fused_features = _run(dgiqa, "sdpa", rgb, depth_crops, watch=dgiqa.refinement_attention)
    assert len(sdpa_calls) == 26  # every Swin block and both DGIQA blocks
    # Random heads flatten differences, so the features after all attention are compared too.
    torch.testing.assert_close(fused_features, math_features, rtol=FEATURE_RTOL,
                               atol=FEATURE_RTOL * math_features.abs().max().item())
    delta = (fused - math).abs().max().item()
    assert delta <= SCORE_ATOL
    print(f"\nDGIQA sdpa vs math: max |delta score| = {delta:.1e}")


def test_depth_anything_modes_run_their_own_kernels_and_agree(depth, sdpa_calls):
    torch.manual_seed(2)
    x = torch.randn(1, 3, 14 * 9, 14 * 12)
    math = _run(depth, "math", x)
    assert sdpa_calls == []
    fused = _run(depth, "sdpa", x)
    assert len(sdpa_calls) == 12
    torch.testing.assert_close(fused, math, rtol=FEATURE_RTOL, atol=FEATURE_RTOL * math.abs().max().item())


@pytest.mark.slow
def test_training_gradients_agree_between_modes():
    """Fine-tuning runs on the fused kernel too (the builders choose it): its gradients, the relative position
    biases the Swin kernel takes as a mask included, are those of the explicit products."""
    torch.manual_seed(3)
    model = build_dgiqa().train()
    for module in model.modules():  # no randomness, so the two passes see the same network
        if isinstance(module, (torch.nn.Dropout, torch.nn.Dropout2d)):
            module.p = 0.0
        if isinstance(module, torch.nn.MultiheadAttention):
            module.dropout = 0.0
        if hasattr(module, "drop_prob"):
            module.drop_prob = 0.0
    rgb, depth_crops = torch.randn(2, 3, 224, 224), torch.randn(2, 3, 224, 224)
    grads = {}
    for mode in ATTENTION_MODES:
        set_attention(model, mode)
        model.zero_grad()
        model(rgb, depth_crops).sum().backward()
        grads[mode] = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    assert grads["sdpa"].keys() == grads["math"].keys()
    assert any("relative_position_bias_table" in name for name in grads["sdpa"])
    # Biases followed by BatchNorm get gradients of about 1e-9, rounding noise in either mode: left out.
    compared = {name: (g, grads["sdpa"][name]) for name, g in grads["math"].items() if g.norm() > 1e-6}
    assert len(compared) > 300
    worst = max(((s - m).norm() / m.norm()).item() for m, s in compared.values())
    assert worst <= 1e-3
    print(f"\ntraining gradients, sdpa vs math: worst relative difference {worst:.1e}")
