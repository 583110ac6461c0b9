"""Run dates: the ``run_date=YYYY-MM-DD`` partition values, checked in one place for every command and the job.

Light (no Arrow, no fsspec), so argument parsers use it too. Strictly ``YYYY-MM-DD``: Python's
``date.fromisoformat`` also takes ``20261122`` and ``2026-W47-7``, which would name partitions no run writes.
"""

from __future__ import annotations

import datetime as dt
import re

_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


def check_run_date(text: str, what: str, error: type[ValueError] = ValueError) -> str:
    """``text`` when it is a calendar date written ``YYYY-MM-DD``.

    Args:
        text: The value given.
        what: What the value is, for the message (a flag such as ``--run-date``).
        error: The ``ValueError`` subclass to raise (the caller's own error type).

    Raises:
        ValueError: (``error``) naming ``what`` and the value.
    """
    try:
        if not isinstance(text, str) or not _DATE.fullmatch(text):
            raise ValueError
        dt.date.fromisoformat(text)
    except ValueError:
        raise error(f"{what} must be a date YYYY-MM-DD, got {text!r}") from None
    return text
