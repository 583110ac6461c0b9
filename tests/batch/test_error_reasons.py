"""One cause per kind of failure, the same in Python (report, training) and in DuckDB (the job's summary)."""

import duckdb
import pytest

from pipeline.batch.error_reasons import MAX_REASON_CHARS, error_reason, error_reason_sql

CASES = [
    ("no such file or object: s3://b/x/1.jpg", "no such file or object: <uri>"),
    ("no such file or object: /data/lib/2024/a b.jpg", "no such file or object: <uri> b.jpg"),
    ("not a recognised image format (1000 bytes, starting b'<html>40')",
     "not a recognised image format (N bytes, starting '…')"),
    ("image is 12x9; its shorter side must be at least 16 px", "image is NxN; its shorter side must be at least N px"),
    ("etag mismatch: 9f86d081884c7d65 vs 2c26b46b68ffc68f", "etag mismatch: <hex> vs <hex>"),
    ("", "(no message)"),
    (None, "(no message)"),
    ("cannot read /a/b and /c/d: x", "cannot read <uri> and <uri> x"),
    ("/abs/path at the start", "<uri> at the start"),
    ("s3://b/k.jpg is outside the allowed prefixes (s3://photos/)", "<uri> is outside the allowed prefixes (<uri>)"),
    ("x" * 500, "x" * MAX_REASON_CHARS),
]


@pytest.mark.parametrize(("message", "reason"), CASES)
def test_error_reason(message, reason):
    assert error_reason(message) == reason


def test_duckdb_gives_every_message_the_same_reason_as_python():
    con = duckdb.connect()
    con.execute("CREATE TABLE t (i INTEGER, error VARCHAR)")
    con.executemany("INSERT INTO t VALUES (?, ?)", [(i, message) for i, (message, _) in enumerate(CASES)])
    in_sql = dict(con.sql(f"SELECT i, {error_reason_sql('error')} FROM t").fetchall())
    assert [in_sql[i] for i in range(len(CASES))] == [reason for _, reason in CASES]
