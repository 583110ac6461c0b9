"""Why a row failed, as a cause rather than a message: one classifier for the job summary, the report and training.

A message names its image and sizes (``no such file or object: s3://b/x/1.jpg``); with URIs, paths, quoted
values, hashes and numbers replaced by placeholders, one cause reads the same for every image
(``no such file or object: <uri>``) and can be counted. The rules are regular expressions in the syntax that
both Python's ``re`` and RE2 (DuckDB's engine) read alike, so the job counts causes over its staged rows in
DuckDB (``error_reason_sql``), out of core, with exactly the result ``error_reason`` gives one message in Python;
a test holds the two equal.
"""

from __future__ import annotations

import re

MAX_REASON_CHARS = 120

# (pattern, replacement), applied in order. No look-around: RE2 has none, so the character before a path is
# matched and put back (``\1``).
_RULES = (
    (r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s,;()'\"]*", "<uri>"),
    (r"(^|[^\w/.<>])(?:/[^\s/,;()'\"]+)+/?", r"\1<uri>"),
    (r"\bb?'(?:[^'\\]|\\.)*'|\bb?\"(?:[^\"\\]|\\.)*\"", "'…'"),
    (r"\b[0-9a-fA-F]{8,}\b", "<hex>"),
    (r"\d+(?:\.\d+)?", "N"),
    (r"\s+", " "),
)
_COMPILED = tuple((re.compile(pattern), replacement) for pattern, replacement in _RULES)
NO_MESSAGE = "(no message)"


def error_reason(message: str | None) -> str:
    """The cause of one failure: ``message`` with URIs, paths, quoted values, hashes and numbers as placeholders."""
    if not message:
        return NO_MESSAGE
    text = message
    for pattern, replacement in _COMPILED:
        text = pattern.sub(replacement, text)
    return text.strip()[:MAX_REASON_CHARS]


def error_reason_sql(column: str) -> str:
    """A DuckDB expression giving ``error_reason`` of a text column (NULL and empty give ``(no message)``)."""
    expression = column
    for pattern, replacement in _RULES:
        expression = f"regexp_replace({expression}, {_sql_string(pattern)}, {_sql_string(replacement)}, 'g')"
    return (f"CASE WHEN {column} IS NULL OR {column} = '' THEN {_sql_string(NO_MESSAGE)} "
            f"ELSE left(trim({expression}), {MAX_REASON_CHARS}) END")


def _sql_string(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"
