"""DGIQA as a scorer: the default model, scored from random 224 px crops with a Depth Anything depth map."""

from __future__ import annotations

from pipeline.scorers.registry import ScorerSpec

SCORER = ScorerSpec(
    name="dgiqa",
    title="DGIQA",
    summary="DGIQA (Ramesh et al.): Swin-T RGB and depth branches, mean of random 224 px crops",
    builder="pipeline.models.dgiqa:build_dgiqa",
    filter_fn="pipeline.models.dgiqa:checkpoint_filter_fn",
    preprocessing="pipeline.scoring.preprocess:prepare_bytes",
    runner="pipeline.scoring.scorer:Scorer",
    options=frozenset({"depth_weights", "encoder", "depth_version", "crops", "depth_input_size", "draft_decode",
                       "decode"}),
    output_scale="[0, 1] from a sigmoid, higher is better (the training set's MOS scaled to [0, 1])",
    needs_depth=True,
    trainer="pipeline.training.train:run_command",
)
