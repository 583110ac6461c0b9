"""DPAM-IQA as a scorer: a ViT-B/8 with texture and superpixel inputs, one pass per image (or per crop)."""

from __future__ import annotations

from pipeline.scorers.registry import ScorerSpec

SCORER = ScorerSpec(
    name="dpam",
    title="DPAM-IQA",
    summary="DPAM-IQA (Roc-3/DPAM_IQA): ViT-B/8 with texture and SLIC superpixel inputs, the authors' loader's "
            "preprocessing per --trained-on",
    builder="pipeline.models.dpam:build_dpam",
    filter_fn="pipeline.models.dpam:checkpoint_filter_fn",
    preprocessing="pipeline.scoring.dpam_preprocess:prepare_for_scoring",
    runner="pipeline.scoring.multi_input:MultiInputScorer",
    to_tensor="pipeline.scoring.dpam_preprocess:to_tensors",
    options=frozenset({"trained_on"}),
    output_scale=("the training set's MOS min-max scaled to [0, 1] (the authors' labels), higher is better; a "
                  "weighted mean of ReLU outputs, so never below 0 and not bounded above"),
    backbone="vit_base_patch8_224",
    trainer="pipeline.training.dpam_train:run_command",
)
