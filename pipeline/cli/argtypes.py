"""Argument types shared by the ``dgiqa`` command and the job scripts: a bad value is one clear line."""

from __future__ import annotations

import argparse
import json
import math

from pipeline.batch.run_dates import check_run_date
from pipeline.limits import DEFAULT_MAX_BYTES


def _int_at_least(text: str, minimum: int, expected: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
    return value


def positive_int(text: str) -> int:
    """An integer of at least 1."""
    return _int_at_least(text, 1, "a positive integer")


def json_object(text: str) -> dict:
    """A JSON object, such as fsspec storage options."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def int_range(text: str) -> tuple[int, int]:
    """``N`` (a fixed number) or ``MIN,MAX`` with ``1 <= MIN <= MAX``."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or MIN,MAX, got {text!r}") from None
    if len(values) == 1:
        values *= 2
    if len(values) != 2 or not 1 <= values[0] <= values[1]:
        raise argparse.ArgumentTypeError(f"expected N or MIN,MAX with 1 <= MIN <= MAX, got {text!r}")
    return values[0], values[1]


def float_pair(text: str) -> tuple[float, float]:
    """``A,B``: two numbers, such as a quantile range."""
    try:
        a, b = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two numbers A,B, got {text!r}") from None
    return a, b


def comma_list(text: str) -> list[str]:
    """``a,b,c``: a non-empty list of names."""
    names = [v.strip() for v in text.split(",") if v.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of names, got {text!r}")
    return names


def non_negative_int(text: str) -> int:
    """An integer of 0 or more."""
    return _int_at_least(text, 0, "an integer of 0 or more")


def iso_date(text: str) -> str:
    """A calendar date ``YYYY-MM-DD``, kept as text (run dates are text partitions)."""
    try:
        return check_run_date(text, "the value")
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a date YYYY-MM-DD, got {text!r}") from None


_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 2**10, "m": 1000**2, "mb": 1000**2, "mib": 2**20,
          "g": 1000**3, "gb": 1000**3, "gib": 2**30}


def byte_size(text: str) -> int:
    """A positive number of bytes: ``268435456``, ``256MiB``, ``300MB``, ``1GiB``."""
    number = text.strip().rstrip("BbIiKkMmGg")
    unit = text.strip()[len(number):].lower()
    try:
        value = float(number) * _UNITS[unit]
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"expected a size such as 256MiB or 268435456, got {text!r}") from None
    if not math.isfinite(value) or value < 1:  # int(inf) raises OverflowError, which argparse does not catch
        raise argparse.ArgumentTypeError(f"expected a finite size of at least 1 byte, got {text!r}")
    return int(value)


def add_storage_options(parser, applies_to: str) -> None:
    """Add ``--storage-options``, the fsspec options of every URI a command reads or writes.

    Args:
        parser: An ``argparse`` parser or argument group.
        applies_to: Which of the command's URIs the options apply to, for the help.
    """
    parser.add_argument("--storage-options", type=json_object, default={},
                        help=f"fsspec options as JSON for {applies_to} (e.g. an S3 endpoint); credentials come "
                             "from the environment, never from here")


def add_read_limit_arguments(group, default_help: str) -> None:
    """Add ``--allow-prefix`` and ``--max-bytes``, the limits on every image a command reads.

    Args:
        group: An ``argparse`` parser or argument group.
        default_help: Where images may be read from when no ``--allow-prefix`` is given.
    """
    group.add_argument("--allow-prefix", action="append", default=[], metavar="URI",
                       help=f"prefix images may be read from (repeatable; default: {default_help})")
    group.add_argument("--max-bytes", type=byte_size, default=DEFAULT_MAX_BYTES, metavar="SIZE",
                       help="refuse images larger than this, unread where the size is known (256MiB)")
