"""The runner for scorers that score a whole image in one forward pass (the DP-IQA student, for one).

Everything model-specific comes from the scorer's registry entry (``pipeline.scorers.registry``): the
builder, the checkpoint remapping, the preprocessing (done in CPU tasks, to a fixed-size uint8 array) and the
conversion of a batch of those arrays to the network's input. So a new single-pass scorer needs no code here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.models.attention import set_attention
from pipeline.scorers.registry import ScorerSpec, get_scorer, resolve
from pipeline.scoring.precision import autocast
from pipeline.scoring.scorer import ImageScore, ModelInfo, ScorerConfig, prepare_item, resolve_device
from pipeline.scoring.weights import check_fits, load_strict, read_checkpoint


@dataclass(frozen=True)
class PreparedPixels:
    """One image, preprocessed to the network's input size, still uint8 (a quarter of float32's bytes).

    Attributes:
        pixels: ``(h, w, 3)`` uint8 at the network's input size.
        height: Height of the decoded image.
        width: Width of the decoded image.
    """

    pixels: np.ndarray
    height: int
    width: int

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The arrays to ship between Ray stages."""
        return {"pixels": self.pixels}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], height: int, width: int) -> PreparedPixels:
        """Rebuild from ``to_arrays`` output."""
        return cls(pixels=arrays["pixels"], height=height, width=width)


def _info(spec: ScorerSpec, sha256: str) -> ModelInfo:
    return ModelInfo(model_id=f"{spec.name}@{sha256}", scorer=spec.name, encoder=spec.backbone, weights_sha256=sha256,
                     output_scale=spec.output_scale)


class SinglePassScorer:
    """Loads one single-pass scorer once; scores batches of prepared images.

    Args:
        config: ``config.model`` names the scorer; ``weights`` its checkpoint. Depth and crop settings are
            refused by ``ScorerConfig`` (this runner uses none).

    Raises:
        WeightsError: The checkpoint cannot be read or does not fit the architecture.
    """

    prepared_type = PreparedPixels
    # Depth, crops and the DGIQA decode settings mean nothing to a whole-image pass; options of the scorer's own
    # preprocessing are declared by that function.
    uses_options = frozenset()

    def __init__(self, config: ScorerConfig):
        self.config = config
        self.spec = get_scorer(config.model)
        self.device = resolve_device(config.device)
        ckpt = read_checkpoint(config.weights, config.storage_options)
        self.model = self.build(self.spec, ckpt.state_dict)
        load_strict(self.model, ckpt.state_dict, f"{self.spec.title} (--weights {ckpt.path})",
                    resolve(self.spec.filter_fn), assign=next(self.model.parameters()).is_meta)
        self.model.eval().to(self.device)
        set_attention(self.model, config.attention)  # a no-op for the EfficientNet student; kept for later models
        self.info = _info(self.spec, ckpt.sha256)
        self.model_id = self.info.model_id
        self.encoder = self.info.encoder
        self._to_tensor = resolve(self.spec.to_tensor)
        self.forward_batch = config.forward_batch or (64 if self.device.type == "cuda" else 4)
        if config.compile:
            self.model = torch.compile(self.model)

    @staticmethod
    def build(spec: ScorerSpec, state_dict: Mapping[str, torch.Tensor]) -> torch.nn.Module:
        """The network with random weights, for ``state_dict`` to be loaded into (the registry's builder).

        A runner may build it on the meta device instead: the checkpoint's tensors then become the network's
        (``load_strict(assign=True)``).
        """
        return resolve(spec.builder)()

    @classmethod
    def check(cls, config: ScorerConfig) -> ModelInfo:
        """Read and hash the checkpoint and check it against the architecture built on the meta device."""
        spec = get_scorer(config.model)
        ckpt = read_checkpoint(config.weights, config.storage_options)
        with torch.device("meta"):
            model = cls.build(spec, ckpt.state_dict)
        check_fits(model, ckpt.state_dict, f"{spec.title} (--weights {ckpt.path})", resolve(spec.filter_fn))
        return _info(spec, ckpt.sha256)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The network's raw output for a batch of inputs on the device."""
        return self.model(images)

    @torch.inference_mode()
    def score_prepared(self, prepared: Sequence[PreparedPixels]) -> list[ImageScore]:
        """One forward pass per batch of images; the raw network output is the score."""
        scores: list[float] = []
        for start in range(0, len(prepared), self.forward_batch):
            chunk = np.stack([item.pixels for item in prepared[start:start + self.forward_batch]])
            x = self._to_tensor(chunk)
            if self.device.type == "cuda":
                x = x.pin_memory()
            with autocast(self.device, self.config.precision):
                out = self.forward(x.to(self.device, non_blocking=True)).float().reshape(-1).cpu()
            scores += out.tolist()
        return [ImageScore(score=s, score_std=None, num_crops=1, width=item.width, height=item.height)
                for s, item in zip(scores, prepared, strict=True)]

    def score_bytes(self, data: bytes) -> ImageScore:
        """Preprocess and score one encoded image.

        Raises:
            ImageError: The bytes are not a scorable image.
        """
        return self.score_prepared([prepare_item(data, self.config)])[0]
