"""How the models compute attention: one fused kernel, or the explicit matrix products of the published code.

Every attention layer of the published inference writes ``softmax(Q K^T / sqrt(d)) V`` out as matrix products
with the full weight matrix in memory: DINOv2 inside Depth Anything (without xFormers, which its requirements
do not install), timm's Swin window attention (its fused path is marked experimental and is off by default),
and DGIQA's ``nn.MultiheadAttention`` (called for its attention weights). ``torch.nn.functional.
scaled_dot_product_attention`` computes the same function in one kernel (flash attention on CPUs and GPUs)
without that matrix, so the two differ only in rounding. On two CPU cores it ran Depth Anything ViT-S at
518x686 px 1.7x faster; the benchmark's ``+math`` variant measures the whole scorer.

Each attention module carries a ``fused_attn`` flag (timm's own name, which our ``SpatialAttentionBlock`` shares),
so one walk over the modules sets the mode of a whole model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # argument parsers import ATTENTION_MODES: no torch before a flag is parsed
    from torch import nn

ATTENTION_MODES = ("sdpa", "math")


def set_attention(model: nn.Module, mode: str) -> int:
    """Make every attention layer of ``model`` use ``mode``; returns how many layers were set.

    Args:
        model: Any model; modules without attention are left alone.
        mode: ``sdpa`` (fused ``scaled_dot_product_attention``) or ``math`` (the published explicit products).

    Raises:
        ValueError: ``mode`` is not one of ``ATTENTION_MODES``.
    """
    if mode not in ATTENTION_MODES:
        raise ValueError(f"attention must be one of {', '.join(ATTENTION_MODES)}, got {mode!r}")
    layers = [m for m in model.modules() if hasattr(m, "fused_attn")]
    for layer in layers:
        layer.fused_attn = mode == "sdpa"
    return len(layers)
