"""``dgiqa report``: a self-contained HTML page about a run or a date range of the scores output."""

from __future__ import annotations

import argparse

from pipeline.cli.argtypes import add_read_limit_arguments, add_storage_options, iso_date, non_negative_int
from pipeline.scorers.registry import DEVICES, SCORER_OPTIONS


def _run(args: argparse.Namespace) -> int:
    from pipeline.analysis.report import run_command

    return run_command(args)


def register(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``report`` to the ``dgiqa`` subcommands; returns its parser."""
    report = commands.add_parser("report", help="write a self-contained HTML page about a run or a date range",
                                 description="Counts, failure reasons, score charts and the lowest/highest "
                                             "scoring images of the scores output, as one HTML file that loads "
                                             "nothing.")
    report.add_argument("output", metavar="OUTPUT_URI", help="output root of the scoring job")
    report.add_argument("--html", required=True, metavar="PATH_OR_URI", help="where to write the page")
    report.add_argument("--run-date", type=iso_date, metavar="DATE", help="one run date (YYYY-MM-DD)")
    report.add_argument("--from", dest="date_from", type=iso_date, metavar="DATE",
                        help="first run date of a range (inclusive; default: the oldest when --until is given)")
    report.add_argument("--until", dest="date_to", type=iso_date, metavar="DATE",
                        help="last run date of a range (inclusive; default: the newest). With no date option, "
                             "the newest run date is reported")
    report.add_argument("--model-id", help="only rows of this model id (default: all)")
    report.add_argument("--thumbnails", type=non_negative_int, default=12, metavar="N",
                        help="lowest- and highest-scoring images shown, each (%(default)s; 0 reads no image; "
                             "with fewer than twice as many, all are shown once in one grid)")
    report.add_argument("--depth-weights", metavar="URI",
                        help="Depth Anything checkpoint: show each thumbnail's depth map beside it")
    report.add_argument("--encoder", default="auto", choices=SCORER_OPTIONS["encoder"].choices,
                        help="Depth Anything encoder; auto reads it from the checkpoint (default: auto)")
    report.add_argument("--depth-version", default="v1", choices=SCORER_OPTIONS["depth_version"].choices,
                        help="Depth Anything version (v1)")
    report.add_argument("--device", default="auto", choices=DEVICES,
                        help="where the depth model runs: auto, cpu or cuda (auto)")
    add_storage_options(report, "the output, the images and the page")
    add_read_limit_arguments(report, "the allowed prefixes the shown runs recorded in their summaries; rows of "
                                     "runs without them are not read")
    report.set_defaults(run=_run)
    return report
