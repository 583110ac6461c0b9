"""DP-IQA itself as a scorer: Stable Diffusion v1.5's VAE and U-Net read once at timestep 1, one pass per image."""

from __future__ import annotations

from pipeline.scorers.registry import ScorerSpec

SCORER = ScorerSpec(
    name="dpiqa",
    title="DP-IQA",
    summary="DP-IQA (RomGai/DP-IQA): Stable Diffusion v1.5 features of a 512x512 image with quality prompts and "
            "a T2I adapter; about 1.06 B parameters, the student's teacher",
    builder="pipeline.models.dpiqa_diffusion:build_dpiqa",
    filter_fn="pipeline.models.dpiqa_diffusion:checkpoint_filter_fn",
    preprocessing="pipeline.scoring.dpiqa_preprocess:prepare_for_scoring",
    runner="pipeline.scoring.diffusion_prior:DiffusionPriorScorer",
    to_tensor="pipeline.scoring.dpiqa_preprocess:to_tensor",
    options=frozenset({"exif_transpose", "prompt_embeddings", "clip_text", "latent"}),
    output_scale=("about MOS/100 on the training set's scale (the authors divide KonIQ-10k, LIVE Challenge, LIVE FB "
                  "and SPAQ scores by 100); the raw output of the last linear layer, no sigmoid"),
    backbone="stable-diffusion-v1-5",
    needs_one_of=("prompt_embeddings", "clip_text"),
    requires=("diffusers", "transformers"),
    extra="dpiqa",
)
