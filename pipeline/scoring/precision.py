"""The arithmetic a scorer runs in: fp32 (the published numbers) or bf16/fp16 autocast."""

from __future__ import annotations

import contextlib

import torch

from pipeline.scorers.registry import PRECISIONS as PRECISION_NAMES

PRECISIONS = dict(zip(PRECISION_NAMES, (None, torch.bfloat16, torch.float16), strict=True))


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The arithmetic of ``precision`` on ``device``: nothing for fp32 (the published numbers), else autocast.

    Every scorer and the GPU check use this one context, so a precision means the same everywhere.
    """
    dtype = PRECISIONS[precision]
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)
