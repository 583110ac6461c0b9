"""Why rows failed: ``error`` and ``rejected`` messages grouped by cause, so one cause is one line on the page."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from pipeline.batch.allowlist import redact_text, redact_uri
from pipeline.batch.error_reasons import error_reason


@dataclass(frozen=True)
class ErrorGroup:
    """One failure cause: rows whose messages read the same once normalised.

    Attributes:
        status: ``error`` or ``rejected``.
        reason: The normalised message.
        count: Rows with this cause.
        example_uri: One such row's URI (the smallest, so reruns show the same one).
        example_message: That row's message as written.
    """

    status: str
    reason: str
    count: int
    example_uri: str
    example_message: str


def error_groups(dataset: pads.Dataset, failed: pc.Expression) -> list[ErrorGroup]:
    """Group the rows matching ``failed`` by status and normalised message, most frequent first.

    Batch by batch, so memory follows the number of causes, not of failed rows: each batch's distinct
    messages are normalised and merged into the groups.
    """
    groups: dict[tuple[str, str], list] = {}
    for batch in dataset.to_batches(columns=["status", "error", "uri"], filter=failed):
        if not batch.num_rows:
            continue
        table = pa.table({"status": batch.column("status"), "error": pc.fill_null(batch.column("error"), ""),
                          "uri": batch.column("uri")})
        distinct = table.group_by(["status", "error"]).aggregate([("uri", "min"), ("uri", "count")])
        for status, message, uri, count in zip(*(distinct.column(c).to_pylist() for c in
                                                 ("status", "error", "uri_min", "uri_count")), strict=True):
            message, uri = redact_text(message), redact_uri(uri)
            group = groups.setdefault((status, error_reason(message)), [0, uri, message])
            group[0] += count
            if uri < group[1]:
                group[1], group[2] = uri, message
    return sorted((ErrorGroup(status, reason, n, uri, message) for (status, reason), (n, uri, message)
                   in groups.items()), key=lambda g: (-g.count, g.status, g.reason))
