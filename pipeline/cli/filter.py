"""``dgiqa filter``: select rows of a scores output and write them as a manifest."""

from __future__ import annotations

import argparse
import os
import sys

from pipeline.analysis.formats import FORMATS
from pipeline.cli.argtypes import add_storage_options, comma_list, float_pair, positive_int
from pipeline.limits import DEFAULT_PLAN_MEMORY_MB


def _filter_command(args: argparse.Namespace) -> int:
    """Select rows of the scores; where they go (format, a writable ``--out``) is settled before any is read."""
    from pipeline.analysis import query
    from pipeline.batch.allowlist import redact_uri
    from pipeline.batch.output import check_writable

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
    if args.spill_dir is not None and not os.path.isdir(args.spill_dir):
        raise ValueError(f"--spill-dir {args.spill_dir} is not a folder on this machine")
    with query.selection(dataset, flt, columns, args.memory_mb, args.spill_dir) as (rows, stats):
        if args.out:
            fmt = query.write_selection(rows, args.out, fmt, args.storage_options)
            print(f"{stats.describe()}; wrote {fmt} to {redact_uri(args.out)}", file=sys.stderr)
        else:
            sys.stdout.flush()
            query.write_stream(rows, sys.stdout.buffer, fmt)
            sys.stdout.buffer.flush()
            print(stats.describe(), file=sys.stderr)
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``filter`` to the ``dgiqa`` subcommands."""
    flt = commands.add_parser(
        "filter", help="select images from the scores (latest per image) and write them as a manifest",
        description="Select rows of a scores output by score, date, model and status; by default the latest "
                    "row per image and model. Writes uri, score and the manifest's columns as a manifest.")
    flt.add_argument("output", metavar="OUTPUT_URI", help="the job's --output (folder or s3:// prefix)")
    flt.add_argument("--out", metavar="URI", help="write the selection here (.parquet/.csv/.jsonl); default: "
                     "standard output")
    flt.add_argument("--format", choices=FORMATS,
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
    flt.add_argument("--memory-mb", type=positive_int, default=DEFAULT_PLAN_MEMORY_MB,
                     help="memory the selection (DuckDB) may use before spilling to disk (%(default)s)")
    flt.add_argument("--spill-dir", help="local folder for the selection's spill files (default: the system's "
                                         "temporary folder)")
    add_storage_options(flt, "the scores and --out")
    flt.set_defaults(run=_filter_command)
