"""The scorer's options as command-line arguments: one declaration for ``dgiqa score`` and the nightly job.

Model-specific options default to None, so that one given for a model that does not use it, even at its default
value, is refused by ``registry.resolve_options`` rather than silently ignored; their defaults are filled in
there. The help of each says which scorers use it, from the registry.
"""

from __future__ import annotations

import argparse

from pipeline.cli.argtypes import add_read_limit_arguments, add_storage_options, positive_int
from pipeline.limits import DEFAULT_MAX_PIXELS
from pipeline.models.attention import ATTENTION_MODES
from pipeline.scorers.registry import PRECISIONS, SCORER_OPTIONS, scorer_names, summaries, used_by


def add_scorer_arguments(parser: argparse.ArgumentParser, *, allow_prefix_default: str,
                         depth_input_size: bool) -> None:
    """Add the scorer's and the reads' options (all but ``--weights``, whose requirement differs).

    Args:
        parser: The command's parser.
        allow_prefix_default: What ``--allow-prefix`` defaults to for this command, for its help.
        depth_input_size: Whether the command offers ``--depth-input-size`` (the job does).
    """
    parser.add_argument("--model", default="dgiqa", choices=scorer_names(),
                        help=f"which scorer (default {scorer_names()[0]}): {summaries()}")
    parser.add_argument("--depth-weights", help="URI of the Depth Anything checkpoint "
                                                f"({used_by('depth_weights')}, required there)")
    parser.add_argument("--encoder", choices=SCORER_OPTIONS["encoder"].choices,
                        help=f"Depth Anything encoder; auto reads it from the checkpoint ({used_by('encoder')}; auto)")
    parser.add_argument("--depth-version", choices=SCORER_OPTIONS["depth_version"].choices,
                        help=f"Depth Anything version ({used_by('depth_version')}; v1)")
    parser.add_argument("--crops", type=positive_int, help=f"random 224x224 crops per image ({used_by('crops')}; 20)")
    if depth_input_size:
        parser.add_argument("--depth-input-size", type=positive_int,
                            help="lower bound of the depth-model input side (518 as published; other values change "
                                 f"the scores; {used_by('depth_input_size')})")
    parser.add_argument("--exif-transpose", action="store_true", default=None,
                        help="rotate images upright by their EXIF orientation before resizing (off as in the "
                             "authors' code, which scores a sideways-stored photo sideways; "
                             f"{used_by('exif_transpose')}: dgiqa always applies it)")
    parser.add_argument("--draft-decode", action="store_true", default=None,
                        help="decode large JPEGs at reduced scale (faster decoding; scores move slightly, see "
                             f"README; {used_by('draft_decode')})")
    parser.add_argument("--decode", choices=SCORER_OPTIONS["decode"].choices,
                        help="where JPEGs are decoded and resized: cpu (OpenCV, the published pixels; default) or "
                             "gpu (torchvision on the scorer's device, for nodes whose CPUs cannot feed the GPU; "
                             f"scores move slightly, see README; {used_by('decode')})")
    parser.add_argument("--trained-on", choices=SCORER_OPTIONS["trained_on"].choices,
                        help="the training set of the checkpoint, which sets the authors' preprocessing for it "
                             "(superpixel settings; whole image or five 224 px crops); livec is the authors' "
                             f"single-image inference ({used_by('trained_on')}; livec)")
    parser.add_argument("--prompt-embeddings",
                        help="URI of the prompt features the checkpoint was trained with: the tensor file the "
                             f"authors' script saves ({used_by('prompt_embeddings')}; this or --clip-text)")
    parser.add_argument("--clip-text",
                        help="URI of a CLIP ViT-L/14 folder (Hugging Face format, with its tokenizer files) to "
                             "compute the 495 quality prompts' features from, cached on local disk "
                             f"({used_by('clip_text')}; this or --prompt-embeddings)")
    parser.add_argument("--latent", choices=SCORER_OPTIONS["latent"].choices,
                        help="the VAE latent: sample (the authors' draw, seeded per image so that a score does "
                             "not change between runs) or mean (the distribution's mean, no noise) "
                             f"({used_by('latent')}; sample)")
    parser.add_argument("--max-pixels", type=positive_int, default=DEFAULT_MAX_PIXELS,
                        help="refuse images with more pixels than this (%(default)s)")
    add_read_limit_arguments(parser, allow_prefix_default)
    parser.add_argument("--precision", default="fp32", choices=PRECISIONS,
                        help="model arithmetic: fp32 (the published numbers) or bf16/fp16 autocast (faster, scores "
                             "move slightly, see README)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile both models (pays off over many images of a few sizes)")
    parser.add_argument("--attention", default="sdpa", choices=ATTENTION_MODES,
                        help="sdpa (fused kernel, default) or math (the published explicit products); rounding only")
    add_storage_options(parser, "every URI")
