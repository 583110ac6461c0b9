"""The runner for DP-IQA (the diffusion-prior model): deterministic latents, prompt features, batches that fit.

Three things set it apart from the other one-pass scorers (``single_pass``), whose preprocessing (the authors'
512x512 Pillow resize, ``pipeline.scoring.dpiqa_preprocess``) it shares:

* **Deterministic latents.** The authors sample the VAE's latent with an unseeded draw, so their score for an
  image changes from call to call. Here every image's draw comes from its own generator seeded with
  ``LATENT_SEED``: the same noise as the authors' code gives after ``torch.manual_seed(LATENT_SEED)`` for a batch
  of one, and a score that does not depend on the batch, the order or the worker (as DGIQA's crop positions do
  not). The noise is drawn on the CPU, so a GPU gives the same draw. ``--latent mean`` uses the distribution's
  mean instead (no noise at all).
* **Prompt features** from ``--prompt-embeddings`` or ``--clip-text`` (``pipeline.scoring.prompt_embeddings``);
  their source is part of ``model_id``.
* **Batches that fit.** The model is about 1.06 billion parameters (U-Net 860 M), and a 512x512 image's
  activations take far more memory than a DGIQA crop's. On a GPU the images per forward pass are measured when
  the scorer starts: one probe pass gives the peak memory of an image, and the batch is what fits in 80 % of
  the free memory (at most 32). On a CPU one image per pass (larger batches are no faster there). A pass that
  still runs out of memory, on a GPU or under a CPU memory cap, is retried at half the size, and the smaller
  size kept.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import replace

import torch

from pipeline.models.dpiqa_diffusion import INPUT_SIZE, architecture_of, build_dpiqa
from pipeline.scorers.registry import ScorerSpec
from pipeline.scoring.precision import autocast
from pipeline.scoring.prompt_embeddings import PromptFeatures, prompt_features
from pipeline.scoring.scorer import ImageScore, ModelInfo, ScorerConfig
from pipeline.scoring.single_pass import SinglePassScorer
from pipeline.scoring.weights import WeightsError

logger = logging.getLogger(__name__)

LATENT_SEED = 0
MAX_GPU_BATCH = 32
GPU_MEMORY_SHARE = 0.8


def latent_noise(shape: Sequence[int], seed: int = LATENT_SEED) -> torch.Tensor:
    """One image's standard normal draw, ``(1, *shape)``.

    ``torch.randn`` from a generator seeded with ``seed``, on the CPU.
    """
    return torch.randn((1, *shape), generator=torch.Generator().manual_seed(seed))


def _with_prompts(info: ModelInfo, prompts: PromptFeatures) -> ModelInfo:
    return replace(info, model_id=f"{info.model_id}+{prompts.label}", aux_model=prompts.label)


class DiffusionPriorScorer(SinglePassScorer):
    """Loads DP-IQA once; scores batches of prepared images (see the module).

    Raises:
        WeightsError: The checkpoint, the prompt features or the CLIP model cannot be read, or do not fit.
    """

    uses_options = frozenset({"prompt_embeddings", "clip_text", "latent"})

    def __init__(self, config: ScorerConfig):
        super().__init__(config)
        prompts = prompt_features(config.prompt_embeddings, config.clip_text, config.storage_options)
        try:
            self.model.set_prompts(prompts.features)
        except ValueError as exc:
            raise WeightsError(f"the prompt features do not fit these DP-IQA weights: {exc}") from None
        self.info = _with_prompts(self.info, prompts)
        self.model_id = self.info.model_id
        arch = self.model.architecture
        factor = 2 ** (len(arch.vae["block_out_channels"]) - 1)
        shape = (self.model.vae.config.latent_channels, INPUT_SIZE // factor, INPUT_SIZE // factor)
        self.noise = None if config.latent == "mean" else latent_noise(shape).to(self.device)
        if config.forward_batch is None:
            self.forward_batch = self._fitting_batch() if self.device.type == "cuda" else 1

    @staticmethod
    def build(spec: ScorerSpec, state_dict: Mapping[str, torch.Tensor]) -> torch.nn.Module:
        """The architecture the checkpoint's shapes name (``sd15`` for the published ones), on the meta device.

        Its 1.06 billion random values would take about 20 s to draw on a CPU and as much memory again as the
        checkpoint, only to be overwritten: the checkpoint's tensors become the network's instead.
        """
        with torch.device("meta"):
            return build_dpiqa(architecture_of(state_dict))

    @classmethod
    def check(cls, config: ScorerConfig) -> ModelInfo:
        """As ``SinglePassScorer.check``, and the prompt features read (or computed) and identified."""
        info = super().check(config)
        return _with_prompts(info, prompt_features(config.prompt_embeddings, config.clip_text,
                                                   config.storage_options))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The network on a batch, every image's latent drawn with the same seeded noise (or none)."""
        noise = None if self.noise is None else self.noise.expand(len(images), -1, -1, -1)
        return self.model(images, noise)

    def _fitting_batch(self) -> int:
        """Images per pass that fit in ``GPU_MEMORY_SHARE`` of the free GPU memory, from one probe pass."""
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        probe = torch.zeros(1, 3, INPUT_SIZE, INPUT_SIZE, device=self.device)
        with torch.inference_mode(), autocast(self.device, self.config.precision):
            self.forward(probe)
        per_image = max(1, torch.cuda.max_memory_allocated(self.device) - before)
        free, _ = torch.cuda.mem_get_info(self.device)
        return max(1, min(MAX_GPU_BATCH, int(GPU_MEMORY_SHARE * free / per_image)))

    def score_prepared(self, prepared: Sequence) -> list[ImageScore]:
        """As ``SinglePassScorer``, halving the pass size (and keeping it) when an allocation fails."""
        while True:
            try:
                return super().score_prepared(prepared)
            except RuntimeError as exc:
                if not out_of_memory(exc) or self.forward_batch == 1:
                    raise
                self.forward_batch //= 2
                logger.warning("%s ran out of memory on %s: %d images per pass from now on", self.spec.title,
                               self.device.type, self.forward_batch)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()


def out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is a failed allocation.

    CUDA's ``OutOfMemoryError``, or the CPU allocator's: a ``RuntimeError`` that says it cannot allocate memory,
    as under a container's or a ulimit's cap.
    """
    return isinstance(exc, torch.cuda.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc))

