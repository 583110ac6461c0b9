"""``dgiqa score`` and ``dgiqa make-sample``: score images named on the command line, or write some to try.

``dgiqa score`` loads the models once and scores each image; one bad image gives its own error line and the
others go on. The heavy modules (torch, the models, OpenCV) are imported when a command runs, not when the
parser is built, so ``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import json
import os
import posixpath
from collections.abc import Sequence
from pathlib import Path

from pipeline.cli.scorer_args import add_scorer_arguments
from pipeline.scorers.registry import DEVICES

EXIT_IMAGE_FAILED = 1


def _score_command(args: argparse.Namespace) -> int:
    from pipeline.batch.allowlist import Allowlist, RejectedURI
    from pipeline.batch.stages import read_image_bytes
    from pipeline.scorers.registry import SCORER_OPTIONS, resolve_options
    from pipeline.scoring.preprocess import ImageError, PreprocessConfig
    from pipeline.scoring.scorer import ScorerConfig, make_scorer, non_finite

    # Model-specific flags default to None so that one given for a model that does not use it is refused here.
    options = resolve_options(args.model, {name: getattr(args, name, None) for name in SCORER_OPTIONS})
    config = ScorerConfig(
        weights=args.weights,
        depth_weights=options["depth_weights"],
        encoder=options["encoder"],
        depth_version=options["depth_version"],
        device=args.device,
        preprocess=PreprocessConfig(num_crops=options["crops"], max_pixels=args.max_pixels,
                                    draft=options["draft_decode"]),
        storage_options=args.storage_options,
        precision=args.precision,
        attention=args.attention,
        compile=args.compile,
        model=args.model,
        exif_transpose=options["exif_transpose"],
        decode=options["decode"],
        trained_on=options["trained_on"],
        prompt_embeddings=options["prompt_embeddings"],
        clip_text=options["clip_text"],
        latent=options["latent"],
    )
    allowlist = Allowlist(args.allow_prefix or _folders_of(args.images))
    scorer = make_scorer(config)
    failed = 0
    for uri in args.images:
        row = {"uri": uri, "score": None, "score_std": None, "num_crops": None, "width": None, "height": None,
               "status": "ok", "error": None, "model_id": scorer.model_id}
        try:
            data = read_image_bytes(_absolute(uri), args.storage_options, allowlist=allowlist,
                                    max_bytes=args.max_bytes)
            result = scorer.score_bytes(data)
            row.update(width=result.width, height=result.height)
            if reason := non_finite(result):
                row.update(status="error", error=reason)
            else:
                row.update(score=result.score, score_std=result.score_std, num_crops=result.num_crops)
        except RejectedURI as exc:
            row.update(status="rejected", error=str(exc))
        except ImageError as exc:
            row.update(status="error", error=str(exc))
        except Exception as exc:  # noqa: BLE001 - one image's failure must not stop the others
            row.update(status="error", error=f"{type(exc).__name__}: {exc}")
        failed += row["status"] != "ok"
        if args.json:
            print(json.dumps(row), flush=True)
        elif row["status"] == "ok":
            print(f"{uri}\t{row['score']:.6f}", flush=True)
        else:
            print(f"{uri}\terror: {row['error']}", flush=True)
    return EXIT_IMAGE_FAILED if failed else 0


def _absolute(uri: str) -> str:
    """A local path on the command line as the user means it: relative to the current folder, ``..`` resolved.

    The command line is the user's own request, so its ``..`` is taken as the shell would; URIs are kept as
    given and pass the allowlist's rules (no ``..``, no ``::``).
    """
    return uri if "://" in uri else os.path.abspath(os.path.expanduser(uri))


def _folders_of(uris: Sequence[str]) -> list[str]:
    """The default allowlist of ``dgiqa score``: the folder or prefix of each image the user named.

    The command line is the user's own request, not data, so what it names is allowed; a symlink in one of those
    folders that leads elsewhere, ``..`` and ``::`` are still refused.
    """
    from pipeline.batch.allowlist import RejectedURI, normalize_prefix

    folders = []
    for uri in uris:
        try:
            folders.append(posixpath.dirname(normalize_prefix(_absolute(uri)).rstrip("/")) + "/")
        except RejectedURI:
            continue
    return folders or ["/nonexistent-allowlist/"]


def _make_sample_command(args: argparse.Namespace) -> int:
    from pipeline.scoring.sample import write_sample

    paths = write_sample(Path(args.folder), encoder=args.encoder)
    images = " ".join(str(p) for p in paths["images"])
    print(f"wrote {len(paths['images'])} images and random weights (scores mean nothing with random weights)")
    print(f"dgiqa score {images} --weights {paths['weights']} --depth-weights {paths['depth_weights']}")
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``score`` to the ``dgiqa`` subcommands."""
    score = commands.add_parser("score", help="score images named by local path or fsspec URI")
    score.add_argument("images", nargs="+", metavar="IMAGE_OR_URI")
    score.add_argument("--weights", required=True,
                       help="URI of the scorer's checkpoint (.pth/.pt/.safetensors/folder; DGIQA by default)")
    add_scorer_arguments(score, allow_prefix_default="the folder of each image named", depth_input_size=False)
    score.add_argument("--device", default="auto", choices=DEVICES, help="auto, cpu or cuda (auto)")
    score.add_argument("--json", action="store_true", help="one JSON object per line instead of uri<TAB>score")
    score.set_defaults(run=_score_command)


def register_sample(commands: argparse._SubParsersAction) -> None:
    """Add ``make-sample`` to the ``dgiqa`` subcommands."""
    sample = commands.add_parser("make-sample", help="write generated photos and random weights to try dgiqa with")
    sample.add_argument("folder")
    sample.add_argument("--encoder", default="vits", choices=("vits", "vitb", "vitl"))
    sample.set_defaults(run=_make_sample_command)
