"""The ``dgiqa`` command.

``dgiqa score`` scores images named by path or URI with both models loaded once; one bad image gives its own
error line and the others go on. ``dgiqa make-sample`` writes generated photos and random weights to try it
with. Bad arguments and unusable weights end the command with one line naming the problem, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import posixpath
import sys
from collections.abc import Sequence
from pathlib import Path

from pipeline import evaluate, report, train
from pipeline.allowlist import Allowlist, RejectedURI, normalize_prefix, redact_text, redact_uri
from pipeline.argtypes import comma_list, float_pair, json_object
from pipeline.models.registry import SCORER_OPTIONS, resolve_options
from pipeline.preprocess import ImageError, PreprocessConfig
from pipeline.scorer import DEVICE_CHOICES, ScorerConfig, make_scorer
from pipeline.scorer_args import add_scorer_arguments
from pipeline.stages import read_image_bytes

EXIT_IMAGE_FAILED = 1
EXIT_USAGE = 2


def _score_command(args: argparse.Namespace) -> int:
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
            row.update(score=result.score, score_std=result.score_std, num_crops=result.num_crops,
                       width=result.width, height=result.height)
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
    folders = []
    for uri in uris:
        try:
            folders.append(posixpath.dirname(normalize_prefix(_absolute(uri)).rstrip("/")) + "/")
        except RejectedURI:
            continue
    return folders or ["/nonexistent-allowlist/"]


def _make_sample_command(args: argparse.Namespace) -> int:
    from pipeline.sample import write_sample

    paths = write_sample(Path(args.folder), encoder=args.encoder)
    images = " ".join(str(p) for p in paths["images"])
    print(f"wrote {len(paths['images'])} images and random weights (scores mean nothing with random weights)")
    print(f"dgiqa score {images} --weights {paths['weights']} --depth-weights {paths['depth_weights']}")
    return 0


FILTER_FORMATS = ("parquet", "csv", "jsonl")


def _filter_command(args: argparse.Namespace) -> int:
    """Select rows of the scores; where they go (format, a writable ``--out``) is settled before any is read."""
    from pipeline import query
    from pipeline.output import check_writable

    flt = query.ScoreFilter(
        min_score=args.min_score, max_score=args.max_score, top=args.top, bottom=args.bottom,
        quantiles=args.quantiles, date_from=args.date_from, date_to=args.date_to, model_id=args.model_id,
        statuses=tuple(args.status) if args.status else None, latest=args.latest)
    if args.out:
        fmt = query.selection_format(args.out, args.format)
        check_writable(args.out, args.storage_options, flag="--out", folder=False)
    else:
        fmt = args.format or "csv"
        if fmt == "parquet" and sys.stdout.isatty():  # binary on a terminal is never what was meant
            raise ValueError("--format parquet writes binary data: use --out FILE.parquet or redirect standard "
                             "output")
    dataset = query.open_scores(args.output, args.storage_options)
    columns = query.selection_columns(dataset, args.columns)
    table, stats = query.select(dataset, flt, columns=columns)
    if args.out:
        fmt = query.write_selection(table, args.out, fmt, args.storage_options)
        print(f"{stats.describe()}; wrote {fmt} to {redact_uri(args.out)}", file=sys.stderr)
    else:
        sys.stdout.flush()
        query.write_stream(table, sys.stdout.buffer, fmt)
        sys.stdout.buffer.flush()
        print(stats.describe(), file=sys.stderr)
    return 0


def _add_filter_parser(commands) -> None:
    flt = commands.add_parser(
        "filter", help="select images from the scores (latest per image) and write them as a manifest",
        description="Select rows of a scores output by score, date, model and status; by default the latest "
                    "row per image and model. Writes uri, score and the manifest's columns as a manifest.")
    flt.add_argument("output", metavar="OUTPUT_URI", help="the job's --output (folder or s3:// prefix)")
    flt.add_argument("--out", metavar="URI", help="write the selection here (.parquet/.csv/.jsonl); default: "
                     "standard output")
    flt.add_argument("--format", choices=FILTER_FORMATS,
                     help="output format: with --out, when the extension does not say; on standard output csv "
                          "(default), jsonl, or parquet when standard output is redirected (not to a terminal)")
    flt.add_argument("--min-score", type=float, help="keep scores >= this")
    flt.add_argument("--max-score", type=float, help="keep scores <= this")
    ranked = flt.add_mutually_exclusive_group()
    ranked.add_argument("--top", type=float, metavar="FRACTION", help="keep the highest-scoring fraction")
    ranked.add_argument("--bottom", type=float, metavar="FRACTION", help="keep the lowest-scoring fraction")
    ranked.add_argument("--quantiles", type=float_pair, metavar="LO,HI",
                        help="keep scores between these quantiles, e.g. 0.1,0.2")
    flt.add_argument("--from", dest="date_from", metavar="YYYY-MM-DD", help="first run date (inclusive)")
    flt.add_argument("--until", dest="date_to", metavar="YYYY-MM-DD", help="last run date (inclusive)")
    flt.add_argument("--model-id", help="only this model's rows (the model_id column)")
    flt.add_argument("--status", action="append", choices=("ok", "error", "rejected"),
                     help="only rows with this status (repeatable; default all, or ok with a score condition)")
    flt.add_argument("--all-runs", dest="latest", action="store_false",
                     help="consider every night's row, not only the latest per image and model")
    flt.add_argument("--columns", type=comma_list, help="columns to write (default: uri, score, score_std, "
                     "model_id, run_date, etag, size_bytes, width, height and the manifest's own columns)")
    flt.add_argument("--storage-options", type=json_object, default={},
                     help="fsspec options as JSON, e.g. an S3 endpoint; credentials come from the environment")
    flt.set_defaults(run=_filter_command)


def build_parser() -> argparse.ArgumentParser:
    """The ``dgiqa`` argument parser."""
    parser = argparse.ArgumentParser(prog="dgiqa", description="DGIQA image-quality scores for photo libraries.")
    commands = parser.add_subparsers(dest="command", required=True)

    score = commands.add_parser("score", help="score images named by local path or fsspec URI")
    score.add_argument("images", nargs="+", metavar="IMAGE_OR_URI")
    score.add_argument("--weights", required=True,
                       help="URI of the scorer's checkpoint (.pth/.pt/.safetensors/folder; DGIQA by default)")
    add_scorer_arguments(score, allow_prefix_default="the folder of each image named", depth_input_size=False)
    score.add_argument("--device", default="auto", choices=DEVICE_CHOICES, help="auto, cpu or cuda (auto)")
    score.add_argument("--json", action="store_true", help="one JSON object per line instead of uri<TAB>score")
    score.set_defaults(run=_score_command)

    _add_filter_parser(commands)
    report.register(commands)
    evaluate.register(commands)
    train.register(commands)

    sample = commands.add_parser("make-sample", help="write generated photos and random weights to try dgiqa with")
    sample.add_argument("folder")
    sample.add_argument("--encoder", default="vits", choices=("vits", "vitb", "vitl"))
    sample.set_defaults(run=_make_sample_command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``dgiqa``; returns the exit code (0 ok, 1 some image failed, 2 unusable arguments or weights)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, OSError) as exc:
        # WeightsError, OutputError and config errors are ValueErrors: one line naming the problem, no traceback.
        print(f"dgiqa: error: {error_line(exc)}", file=sys.stderr)
        return EXIT_USAGE


def error_line(exc: BaseException) -> str:
    """A user's error as one redacted line; an ``OSError`` as the path and what went wrong, without ``[Errno N]``.

    Our own errors (``ValueError``) already name the flag, the URI and the fix; an ``OSError`` that escapes them
    (a disk filling up mid-write, a file removed under the command) carries errno decoration users need not read.
    """
    if isinstance(exc, OSError) and exc.strerror:
        where = f"{redact_uri(str(exc.filename))}: " if exc.filename else ""
        text = f"{where}{exc.strerror.lower()}"
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(redact_text(text).split())


if __name__ == "__main__":
    sys.exit(main())
