"""The DP-IQA student as a scorer: one pass per image at 512x512, no depth model."""

from __future__ import annotations

from pipeline.scorers.registry import ScorerSpec

SCORER = ScorerSpec(
    name="dpiqa-student",
    title="DP-IQA student",
    summary="DP-IQA student (EfficientNet-B7 distilled from a diffusion teacher): one pass per 512x512 image",
    builder="pipeline.models.dpiqa:build_dpiqa_student",
    filter_fn="pipeline.models.dpiqa:checkpoint_filter_fn",
    preprocessing="pipeline.scoring.dpiqa_preprocess:prepare_for_scoring",
    runner="pipeline.scoring.single_pass:SinglePassScorer",
    to_tensor="pipeline.scoring.dpiqa_preprocess:to_tensor",
    options=frozenset({"exif_transpose"}),
    output_scale=("about MOS/100 on the training set's scale (KonIQ-10k student: roughly 0-1); the raw output of "
                  "the last linear layer, no sigmoid, so a score can fall slightly outside that range"),
    backbone="efficientnet_b7",
)
