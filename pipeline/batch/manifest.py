"""Manifests: which images a run scores, read from any fsspec URI, streamed in Arrow batches.

Accepted forms:

* a CSV, Parquet or JSON Lines file with a ``uri`` column (optional ``etag``, ``size``/``size_bytes``, ``id``
  and any other columns, which are carried through to the output);
* a folder (or prefix) holding such files;
* an S3 Inventory report: its ``manifest.json``, pointing at CSV or Parquet files of bucket/key/size/ETag;
* a plain folder or prefix of images (``s3://bucket/photos/``), listed page by page and filtered to image
  extensions.

Relative keys resolve against the manifest's bucket (S3) or folder (local). The manifest's own bucket or
folder is the default allowed prefix of the run (``pipeline.batch.allowlist``).

A nightly manifest can hold every object of a bucket (100 million rows), so nothing here holds a whole
manifest: ``open_manifest`` gives one stream of normalised record batches per manifest file, which the job's
planner (``pipeline.batch.plan``) loads into DuckDB. Normalisation is Arrow compute over a batch; per-row Python
runs only for the rows that need it (invalid UTF-8, URL-encoded inventory keys, sizes that are not plain digits,
nested JSON values, and the lines of a JSON Lines block Arrow cannot parse). ``read_manifest`` gathers the
batches into one table, for the small manifests of the other commands and the tests.

CSV has no types: its columns are read as text (an ETag or an ID of digits keeps its zeros, and a column that
looks numeric for the first million rows cannot break the night on row 1,000,001). JSON Lines has types, but
nothing fixes them for a whole file, so it is read block by block: a field keeps its JSON type while the file
agrees with itself, integers and floats make floats, any other two types make text (as CSV carries it), objects
and arrays are carried as JSON text; a field that first appears, or changes type, late in the file cannot break
the night either. ``size`` / ``size_bytes`` become integers in every form; a value that is not a whole number of
bytes (``12kb``, ``-5``, ``1.5``) is that row's error, and the other rows are read as usual.

One bad row is one error row (``ROW_ERROR``), never a failed night: a CSV line with the wrong number of fields,
a JSON line that is not a JSON object, text that is not UTF-8, a bad size. A file that cannot be a manifest at
all (no ``uri`` column, not a table, not a single JSON object in its first block) is a ``ManifestError``.

A presigned URL (``https://host/m.parquet?X-Amz-...``) is typed and decompressed by its path, not its query.
"""

from __future__ import annotations

import json
import math
import os
import posixpath
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from urllib.parse import unquote_plus, urlsplit

import fsspec
import fsspec.asyn
import fsspec.utils
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from pipeline.batch.allowlist import redact_text, redact_uri
from pipeline.batch.output import INTERNAL_COLUMNS, protocol

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".heic", ".heif", ".avif")
TABLE_EXTENSIONS = (".csv", ".csv.gz", ".parquet", ".jsonl", ".ndjson", ".json", ".jsonl.gz")
# In a folder, plain ``.json`` files are sidecars of images (photo exports have them), not manifests.
FOLDER_TABLE_EXTENSIONS = tuple(e for e in TABLE_EXTENSIONS if e != ".json")
ROW_ERROR = "__row_error__"  # column of every normalised batch: why a row itself is unusable, or null
MANIFEST_COLUMNS = ("uri", "etag", "size_bytes")
SIZE_COLUMNS = ("size_bytes", "size")
BATCH_ROWS = 65_536  # rows per record batch: large enough for vectorised work, small beside any memory limit
CSV_BLOCK_BYTES = 4 << 20
JSON_BLOCK_BYTES = 4 << 20  # whole lines of a JSON Lines file parsed at a time
# A longer "line" is no manifest row (a JSON document, a binary file): it is skipped unread, as an error row.
MAX_LINE_BYTES = 64 << 20
# Columns the job adds to a manifest's rows (the stages' and ``read_retries``, counted by the fetch stage): a
# manifest column of one of these names, or any ``__name__`` (the reader's and planner's own), is carried under
# ``manifest_<name>`` instead, never dropped and never colliding.
RESERVED_COLUMNS = frozenset(("row_index", "read_retries", *INTERNAL_COLUMNS))


class ManifestError(ValueError):
    """The manifest as a whole cannot be used (unreadable, no ``uri`` column, ...)."""


@dataclass(frozen=True)
class Manifest:
    """The rows of a small manifest, in manifest order (see ``read_manifest``).

    Attributes:
        table: ``row_index`` (int64), ``uri`` (string, resolved), ``etag`` (string), ``size_bytes`` (int64),
            then the manifest's other columns.
        source: The manifest URI as given.
        kind: ``csv``, ``parquet``, ``jsonl``, ``folder``, ``s3-inventory`` or ``listing``.
        home: The manifest's bucket (``s3://bucket/``) or local folder: relative keys resolve against it and it
            is the default allowed prefix.
        row_errors: Per row, why the row itself is unusable (e.g. not valid UTF-8), or None.
    """

    table: pa.Table
    source: str
    kind: str
    home: str
    row_errors: list[str | None] | None = None

    @property
    def extra_columns(self) -> list[str]:
        """Manifest columns carried through to the output as they are."""
        return extra_columns(self.table.column_names)


def extra_columns(names: list[str]) -> list[str]:
    """The manifest columns of a normalised table that are carried through to the output as they are."""
    return [n for n in names if n not in ("row_index", ROW_ERROR, *MANIFEST_COLUMNS)]


@dataclass(frozen=True)
class ManifestReader:
    """An opened manifest: what it is, and its rows as record batches, one stream per manifest file.

    Attributes:
        source: The manifest URI as given.
        kind: See ``Manifest.kind``.
        home: See ``Manifest.home``.
        files: ``(path, version)`` of every file read (the version is the store's ETag, or size and
            modification time): the manifest's identity for resuming, whatever its URI.
    """

    source: str
    kind: str
    home: str
    fs: fsspec.AbstractFileSystem = field(repr=False)
    path: str = field(repr=False)
    files: tuple[tuple[str, str], ...] = ()
    inventory: Mapping | None = field(default=None, repr=False)

    def parts(self) -> Iterator[Iterator[pa.RecordBatch]]:
        """Iterators of normalised batches, one per manifest file, in manifest order; each has one schema.

        Every batch has ``uri``, ``etag``, ``size_bytes``, the file's other columns and ``ROW_ERROR``. A JSON
        Lines file, whose fields are only known as it is read, gives a new part where a field first appears (the
        batches before cannot have that column); consumers unite parts by column name, as they do files. Parts
        share the file they read: read each to its end before asking for the next (one left unfinished is
        continued by the next, no row lost or repeated).

        Raises:
            ManifestError: A file cannot be read, or has no ``uri`` column.
        """
        if self.kind == "listing":
            yield _guarded(self.source, _listing_batches(self.fs, self.path, self.home))
        elif self.kind == "s3-inventory":
            for path in self.inventory["paths"]:
                yield _guarded(self.source, _inventory_batches(self.fs, path, self.inventory, self.home))
        else:
            for path, _ in self.files:
                if _table_kind(_table_name(self.fs, path)) == "jsonl":
                    yield from _JsonLinesFile(self.source, self.fs, path, self.home).parts()
                else:
                    yield _guarded(self.source, _table_file_batches(self.fs, path, self.home))


def _unreadable(source: str, exc: BaseException) -> ManifestError:
    return ManifestError(f"cannot read manifest {redact_uri(source)}: {type(exc).__name__}: "
                         f"{redact_text(str(exc))}")


def _guarded(source: str, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """Any failure while streaming a manifest becomes one ``ManifestError`` line naming the manifest."""
    try:
        yield from batches
    except ManifestError:
        raise
    except Exception as exc:  # noqa: BLE001 - one line naming the manifest, whatever the cause
        raise _unreadable(source, exc) from None


def _full_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    proto = protocol(fs)
    return f"file://{path}" if proto == "file" else f"{proto}://{path}"


def _home(fs: fsspec.AbstractFileSystem, path: str, is_dir: bool) -> str:
    if protocol(fs) == "file":
        folder = path if is_dir else posixpath.dirname(path)
        return f"file://{folder.rstrip('/')}/"
    if protocol(fs) in ("http", "https"):  # a (presigned) URL: its folder, without the query
        parts = urlsplit(path)
        folder = parts.path if is_dir else posixpath.dirname(parts.path)
        return f"{parts.scheme}://{parts.netloc}{folder.rstrip('/')}/"
    return f"{protocol(fs)}://{path.split('/', 1)[0]}/"


def _version(info: Mapping) -> str:
    """What changes when an object is replaced: its ETag where the store has one, else size and mtime."""
    etag = info.get("ETag") or info.get("etag")
    if etag:
        return f"etag:{str(etag).strip(chr(34))}"
    mtime = info.get("mtime") or info.get("LastModified") or info.get("last_modified") or info.get("created")
    return f"size:{info.get('size')}:mtime:{mtime}"


def _table_name(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """The lower-cased name a table file is typed by: a URL's path, without its query (a presigned URL's)."""
    if protocol(fs) in ("http", "https"):
        return urlsplit(path).path.lower()
    return path.lower()


def _table_kind(name: str) -> str:
    """``parquet``, ``jsonl`` or ``csv`` (the default), from the name without its compression extension."""
    if fsspec.utils.infer_compression(name):
        name = posixpath.splitext(name)[0]
    if name.endswith(".parquet"):
        return "parquet"
    return "jsonl" if name.endswith((".json", ".jsonl", ".ndjson")) else "csv"


def _table_file_batches(fs: fsspec.AbstractFileSystem, path: str, home: str) -> Iterator[pa.RecordBatch]:
    """A CSV or Parquet manifest file (JSON Lines: ``_JsonLinesFile``)."""
    name = _table_name(fs, path)
    # By the name without a URL's query: fsspec's ``compression="infer"`` would see ``.gz?X-Amz-...``.
    compression = fsspec.utils.infer_compression(name)
    try:
        if _table_kind(name) == "csv":
            yield from _csv_batches(fs, path, home, compression)
            return
        with fs.open(path, "rb", compression=compression) as f:
            parquet = pq.ParquetFile(f, pre_buffer=False)  # pre-buffering reads the whole file
            yield from _normalized(parquet.iter_batches(batch_size=BATCH_ROWS), parquet.schema_arrow, path, home)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ManifestError(f"cannot read manifest file {redact_uri(path)}: {redact_text(str(exc))}") from None


def _normalized(batches, schema: pa.Schema, path: str, home: str) -> Iterator[pa.RecordBatch]:
    """Normalise each batch; an empty file still yields one empty batch, which says what columns it has."""
    empty = True
    for batch in batches:
        empty = False
        yield normalize_batch(batch, path, home)
    if empty:
        yield normalize_batch(pa.RecordBatch.from_pylist([], schema=schema), path, home)


def _csv_batches(fs: fsspec.AbstractFileSystem, path: str, home: str,
                 compression: str | None) -> Iterator[pa.RecordBatch]:
    """A CSV manifest without letting one bad line sink it.

    Every column is read as text, sizes too (``normalize_batch`` makes a bad size that row's error). Text is
    read unchecked (bad UTF-8 is found per batch later); lines with the wrong number of fields become rows of
    their own with an error, appended after the file's other rows; lines of only whitespace are blank.
    """
    malformed: list[str] = []

    def on_invalid(row) -> str:
        if row.text.strip():
            malformed.append(f"malformed manifest line (expected {row.expected_columns} fields, got "
                             f"{row.actual_columns}): {redact_text(row.text[:200])!r}")
        return "skip"

    with fs.open(path, "rb", compression=compression) as f:  # the header's names, to make every column text
        names = pacsv.open_csv(f, read_options=pacsv.ReadOptions(block_size=1 << 16),
                               parse_options=pacsv.ParseOptions(invalid_row_handler=lambda row: "skip"),
                               convert_options=pacsv.ConvertOptions(check_utf8=False)).schema.names
    types = dict.fromkeys(names, pa.string())
    with fs.open(path, "rb", compression=compression) as f:
        reader = pacsv.open_csv(f, read_options=pacsv.ReadOptions(block_size=CSV_BLOCK_BYTES),
                                parse_options=pacsv.ParseOptions(invalid_row_handler=on_invalid),
                                convert_options=pacsv.ConvertOptions(column_types=types, check_utf8=False))
        yield from _normalized(reader, reader.schema, path, home)
        for start in range(0, len(malformed), BATCH_ROWS):
            errors = malformed[start:start + BATCH_ROWS]
            bad = pa.table({name: pa.nulls(len(errors), reader.schema.field(name).type)
                            for name in reader.schema.names})
            yield normalize_batch(bad, path, home, errors)


class _JsonLinesFile:
    """A JSON Lines manifest file, streamed in blocks of whole lines, without letting one line sink it.

    pyarrow's own JSON reader fixes a file's columns and types from its first block, so a field that first
    appears later, or a number that becomes a string, fails the whole file; and one malformed line fails it
    anywhere. Here each block (``JSON_BLOCK_BYTES`` of whole lines) is parsed by Arrow on its own, with Arrow's
    types. A block Arrow cannot parse (a malformed line, a field of two types within the block) is parsed line
    by line in Python instead: a line that is not a JSON object becomes an error row naming its line number, in
    its place.

    A field keeps its JSON type while the file agrees with itself; one seen as integers and as floats is read as
    floats, and one seen with any other two types is read as text from there on (as CSV's are), objects and
    arrays as their JSON text always (as Arrow read them: an object's missing keys as nulls). A part
    (``ManifestReader.parts``) has one schema: a field that first appears, or whose type widens, starts a new
    one, and consumers unite the parts by name as they unite files (integers and floats as floats, other types
    that differ as text).
    """

    def __init__(self, source: str, fs: fsspec.AbstractFileSystem, path: str, home: str):
        self.source, self.path, self.home = source, path, home
        self.blocks = self._blocks(fs, path)
        self.pending: tuple[pa.Table, list | None] | None = None
        self.pending_types: dict[str, pa.DataType] = {}
        self.done = False
        self.types: dict[str, pa.DataType] = {}  # the current part's columns
        self.text: set[str] = set()  # fields seen with two types: text from then on

    def parts(self) -> Iterator[Iterator[pa.RecordBatch]]:
        yield _guarded(self.source, self._part())
        while self._more_guarded():
            yield _guarded(self.source, self._part())

    def _more_guarded(self) -> bool:
        try:
            return self._more()
        except ManifestError:
            raise
        except Exception as exc:  # noqa: BLE001 - as _guarded
            raise _unreadable(self.source, exc) from None

    def _more(self) -> bool:
        """Whether a block is pending, reading the next one (and the part types it needs) if none is."""
        if self.pending is None and not self.done:
            self.pending = next(self.blocks, None)
            self.done = self.pending is None
            if self.pending is not None:
                self.pending_types = self._unified(self.pending[0])
        return self.pending is not None

    def _unified(self, table: pa.Table) -> dict[str, pa.DataType]:
        """The current part's column types widened to hold ``table`` too (fields of two kinds become text)."""
        types = dict(self.types)
        for f in table.schema:
            known = types.get(f.name)
            if f.name in self.text or pa.types.is_nested(f.type):
                types[f.name] = pa.string()
            elif known is None or pa.types.is_null(known):
                types[f.name] = f.type
            elif pa.types.is_null(f.type) or f.type == known:
                pass
            elif _is_number(f.type) and _is_number(known):
                types[f.name] = pa.float64()
            else:
                self.text.add(f.name)
                types[f.name] = pa.string()
        return types

    def _part(self) -> Iterator[pa.RecordBatch]:
        """Blocks while their columns fit the part's; the first part also checks the file is JSON Lines."""
        first = not self.types
        if not self._more():
            if first:
                raise ManifestError(f"cannot read manifest file {redact_uri(self.path)}: no JSON lines in it")
            return
        if first:
            errors = self.pending[1]
            if errors and all(errors):
                raise ManifestError(f"manifest {redact_uri(self.path)} is not JSON Lines: {errors[0]}")
        self.types = self.pending_types
        while self._more() and self.pending_types == self.types:
            (table, errors), self.pending = self.pending, None
            table = pa.table({name: _as_type(table.column(name) if name in table.column_names
                                             else pa.nulls(table.num_rows), kind)
                              for name, kind in self.types.items()})
            for start in range(0, max(table.num_rows, 1), BATCH_ROWS):
                yield normalize_batch(table.slice(start, BATCH_ROWS), self.path, self.home,
                                      errors[start:start + BATCH_ROWS] if errors is not None else None)

    def _blocks(self, fs: fsspec.AbstractFileSystem, path: str) -> Iterator[tuple[pa.Table, list | None]]:
        """Each block of the file as a table, and its rows' errors (or None); blank blocks are skipped."""
        compression = fsspec.utils.infer_compression(_table_name(fs, path))
        try:
            with fs.open(path, "rb", compression=compression) as f:
                for first_line, data, long_line in _line_blocks(f):
                    if long_line:
                        error = (f"manifest line {first_line} is longer than {MAX_LINE_BYTES:,} bytes: "
                                 f"not a manifest row, skipped unread")
                        yield _no_columns(1), [error]
                        continue
                    table = _read_json(data, self.text)
                    block = (table, None) if table is not None else _python_block(data, first_line)
                    if block[0].num_rows or block[1]:
                        yield block
        except OSError as exc:
            raise ManifestError(f"cannot read manifest file {redact_uri(path)}: {redact_text(str(exc))}") from None


def _is_number(kind: pa.DataType) -> bool:
    return pa.types.is_integer(kind) or pa.types.is_floating(kind)


def _as_type(column: pa.Array | pa.ChunkedArray, kind: pa.DataType) -> pa.Array:
    """A block's column as its part's type: nulls and numbers cast, objects and arrays as JSON text."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if column.type == kind:
        return column
    if pa.types.is_nested(column.type):
        return pa.array([None if v is None else _json_text(v) for v in column.to_pylist()], pa.string())
    return column.cast(kind)


def _line_blocks(f) -> Iterator[tuple[int, bytes, bool]]:
    """``(number of the first line, whole lines, False)`` in blocks of about ``JSON_BLOCK_BYTES``.

    A line longer than ``MAX_LINE_BYTES`` is skipped to its end without being held, as ``(its number, b"",
    True)``. A UTF-8 byte order mark at the start of the file is dropped.
    """
    line, pieces, held = 1, [], 0  # pieces: the start of a line whose end is not read yet
    carry = f.read(3).removeprefix(b"\xef\xbb\xbf") or None
    while True:
        chunk, carry = (carry, None) if carry is not None else (f.read(JSON_BLOCK_BYTES), None)
        if not chunk:
            if held:
                yield line, b"".join(pieces), False
            return
        cut = chunk.rfind(b"\n") + 1
        if cut:
            data = b"".join([*pieces, chunk[:cut]])
            pieces, held = [chunk[cut:]], len(chunk) - cut
            yield line, data, False
            line += data.count(b"\n")
            continue
        pieces.append(chunk)
        held += len(chunk)
        if held > MAX_LINE_BYTES:
            yield line, b"", True
            line, pieces, held = line + 1, [], 0
            carry = _skip_line(f)  # what followed the long line, taken as the next chunk read
            if carry is None:
                return
            carry = carry or None


def _skip_line(f) -> bytes | None:
    """Read past the end of the current line; what follows it in the chunk read, or None at the end."""
    while True:
        chunk = f.read(JSON_BLOCK_BYTES)
        if not chunk:
            return None
        end = chunk.find(b"\n")
        if end >= 0:
            return chunk[end + 1:]


def _read_json(data: bytes, text: set[str]) -> pa.Table | None:
    """The block parsed by Arrow, or None where Arrow cannot parse it.

    Fields in ``text`` are read as the strings they are where they hold strings: Arrow would take dates for
    timestamps, whose text it writes in its own way.
    """
    table = _arrow_json(data, text)
    if table is None and text:  # a text field holds numbers, objects... here: as Arrow infers them
        table = _arrow_json(data, set())
        dates = {f.name for f in table.schema if f.name in text and pa.types.is_timestamp(f.type)} if table else ()
        table = (_arrow_json(data, dates) if dates else None) or table
    return table


def _arrow_json(data: bytes, strings: set[str]) -> pa.Table | None:
    schema = pa.schema([(name, pa.string()) for name in sorted(strings)]) if strings else None
    try:
        return pajson.read_json(pa.BufferReader(data), read_options=pajson.ReadOptions(block_size=len(data) + 1),
                                parse_options=pajson.ParseOptions(explicit_schema=schema))
    except pa.ArrowInvalid:
        return None


def _json_text(value) -> str:
    return json.dumps(value, ensure_ascii=False, default=str)


def _python_block(data: bytes, first_line: int) -> tuple[pa.Table, list | None]:
    """A block Arrow could not parse, line by line: each line that is not a JSON object is an error row."""
    rows: list[dict] = []
    errors: list[str | None] = []
    for number, raw in enumerate(data.split(b"\n"), first_line):
        if not raw.strip():
            continue
        error = None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            text = raw.decode("utf-8", errors="replace")
            error = f"manifest line {number} is not valid UTF-8 ({exc.reason})"
        try:
            value = json.loads(text)
        except (ValueError, RecursionError) as exc:
            value, reason = None, getattr(exc, "msg", type(exc).__name__)
            error = error or f"malformed manifest line {number} ({reason}): {redact_text(text.strip()[:200])!r}"
        if value is not None and not isinstance(value, dict):
            value, error = None, error or (f"manifest line {number} is not a JSON object: "
                                           f"{redact_text(text.strip()[:200])!r}")
        rows.append(value or {})
        errors.append(error)
    names = list(dict.fromkeys(k for row in rows for k in row))
    columns = {name: _python_column([row.get(name) for row in rows]) for name in names}
    return (pa.table(columns) if columns else _no_columns(len(rows))), (errors if any(errors) else None)


def _no_columns(rows: int) -> pa.Table:
    """A table of ``rows`` rows and no columns (lines that are error rows only)."""
    return pa.table({"_": pa.nulls(rows)}).drop_columns(["_"])


def _python_column(values: list) -> pa.Array:
    """One field's values from Python's JSON parser: typed as Arrow would type them, or text where mixed."""
    kinds = {type(v) for v in values if v is not None}
    try:
        if kinds <= {str}:
            return pa.array(values, pa.string() if kinds else pa.null())
        if kinds in ({bool}, {int}):
            return pa.array(values, pa.bool_() if bool in kinds else pa.int64())
        if kinds <= {int, float}:
            return pa.array(values, pa.float64())
    except OverflowError:  # an integer beyond int64: its digits, as text
        pass
    texts: list[str | None] = [None] * len(values)
    floats = []
    for i, value in enumerate(values):
        if isinstance(value, str):
            texts[i] = value
        elif isinstance(value, bool):
            texts[i] = "true" if value else "false"
        elif isinstance(value, int):
            texts[i] = str(value)
        elif isinstance(value, float):
            floats.append(i)
        elif value is not None:
            texts[i] = _json_text(value)
    if floats:  # formatted by Arrow, as the numbers of Arrow-parsed blocks are when their field turns to text
        formatted = pa.array([values[i] for i in floats], pa.float64()).cast(pa.string()).to_pylist()
        for i, text in zip(floats, formatted, strict=True):
            texts[i] = text
    return pa.array(texts, pa.string())


def _valid_text(column: pa.Array, name: str, errors: list | None) -> tuple[pa.Array, list | None]:
    """The column with invalid UTF-8 replaced by its lossy decoding, and the rows' errors.

    Valid text (the whole column, checked by Arrow at once) costs no per-row work; a column with a bad value
    is decoded row by row, in this batch only.
    """
    try:
        column.validate(full=True)
        return column, errors
    except pa.ArrowInvalid:
        pass
    values = []
    for i, raw in enumerate(column.cast(pa.binary()).to_pylist()):
        if raw is None:
            values.append(None)
            continue
        try:
            values.append(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            values.append(raw.decode("utf-8", errors="replace"))
            errors = errors if errors is not None else [None] * len(column)
            errors[i] = errors[i] or f"manifest row is not valid UTF-8 (column {name!r}: {exc.reason})"
    return pa.array(values, pa.string()), errors


def _resolve(uris: pa.Array, home: str) -> pa.Array:
    """Relative keys against the manifest's home, vectorised; blank URIs become null."""
    uris = pc.utf8_trim_whitespace(uris.cast(pa.string()))
    uris = pc.if_else(pc.equal(uris, ""), pa.scalar(None, pa.string()), uris)
    absolute = pc.match_substring(uris, "://")
    rooted = pc.starts_with(uris, "/")
    if home.startswith("file://"):
        rooted_uri = pc.binary_join_element_wise("file://", uris, "")
    else:
        rooted_uri = pc.binary_join_element_wise(home, pc.utf8_ltrim(uris, "/"), "")
    relative = pc.binary_join_element_wise(home, uris, "")
    return pc.if_else(absolute, uris, pc.if_else(rooted, rooted_uri, relative))


def normalize_batch(batch: pa.RecordBatch | pa.Table, source: str, home: str,
                    errors: list[str | None] | None = None) -> pa.RecordBatch:
    """One batch of a manifest file as the job reads it.

    Columns: resolved ``uri``, ``etag``, ``size_bytes``, the file's other columns, and ``ROW_ERROR``. A column
    named like one the job adds (``RESERVED_COLUMNS``, or ``__name__``) is carried as ``manifest_<name>``.

    Args:
        batch: The file's rows as read.
        source: The file, for messages.
        home: What relative keys resolve against.
        errors: Per row, why the reader found it unusable (a malformed line), or None.

    Raises:
        ManifestError: The file has no ``uri`` column.
    """
    names = batch.schema.names
    if "uri" not in names:
        raise ManifestError(f"manifest {redact_uri(source)} has no 'uri' column "
                            f"(columns: {', '.join(names) or 'none'})")
    n = batch.num_rows
    errors = list(errors) if errors is not None else None
    columns = {}
    for name in names:
        column = batch.column(name)
        if isinstance(column, pa.ChunkedArray):
            column = column.combine_chunks()
        if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
            column, errors = _valid_text(column, name, errors)
        columns[name] = column
    out = {"uri": _resolve(columns["uri"], home)}
    etag = columns["etag"].cast(pa.string()) if "etag" in columns else pa.nulls(n, pa.string())
    out["etag"] = pc.utf8_trim(etag, '"')
    size_name = next((s for s in SIZE_COLUMNS if s in columns), None)
    if size_name:
        out["size_bytes"], errors = _sizes(columns[size_name], size_name, errors)
    else:
        out["size_bytes"] = pa.nulls(n, pa.int64())
    carried = [name for name in columns if name not in ("uri", "etag", size_name)]
    for name in carried:
        out[_carried_name(name, names, out)] = columns[name]
    out[ROW_ERROR] = pa.array(errors, pa.string()) if errors is not None else pa.nulls(n, pa.string())
    return pa.RecordBatch.from_pydict(out)


def _carried_name(name: str, names: list[str], taken: Mapping) -> str:
    """``name``, or ``manifest_<name>`` (prefixed again while that is taken) where the job has its own column."""
    if name not in RESERVED_COLUMNS and not (name.startswith("__") and name.endswith("__")):
        return name
    renamed = f"manifest_{name}"
    while renamed in names or renamed in taken:
        renamed = f"manifest_{renamed}"
    return renamed


_WHOLE_DIGITS = r"^[0-9]{1,18}$"  # what Arrow casts to int64 exactly; anything else is decided in Python
_NUMBER = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]{1,4})?")
_MAX_SIZE = 2**63


def _sizes(column: pa.Array, name: str, errors: list | None) -> tuple[pa.Array, list | None]:
    """A size column as int64 bytes, and the rows' errors: a value that is no whole number of bytes is an error.

    Blank and null are unknown sizes (null). Whole numbers of any type count (``"12"``, ``12``, ``12.0``,
    ``"1e3"``); ``"12kb"``, ``"-5"``, ``1.5``, ``true`` make their row an error. Plain digits and whole
    non-negative numbers are converted by Arrow for the whole batch; only the other values are looked at in
    Python, one by one (``_size_value``).
    """
    n, kind = len(column), column.type
    values = column
    if pa.types.is_null(kind):
        return pa.nulls(n, pa.int64()), errors
    if pa.types.is_integer(kind):
        odd = (pc.less(column, 0) if pa.types.is_signed_integer(kind)
               else pc.greater_equal(column, pa.scalar(_MAX_SIZE, pa.uint64())))
    elif pa.types.is_floating(kind):
        whole = pc.and_(pc.is_finite(column), pc.equal(pc.floor(column), column))
        odd = pc.invert(pc.and_(whole, pc.and_(pc.greater_equal(column, 0), pc.less(column, float(_MAX_SIZE)))))
    elif pa.types.is_string(kind) or pa.types.is_large_string(kind):
        values = pc.utf8_trim_whitespace(column)
        values = pc.if_else(pc.equal(values, ""), pa.scalar(None, values.type), values)
        odd = pc.invert(pc.match_substring_regex(values, _WHOLE_DIGITS))
    else:
        odd, values = pc.is_valid(column), pa.nulls(n, pa.int64())
    odd = pc.fill_null(odd, False)
    sizes = pc.if_else(odd, pa.scalar(None, values.type), values).cast(pa.int64())
    if not pc.any(odd).as_py():
        return sizes, errors
    fixed = sizes.to_pylist()
    where = pc.indices_nonzero(odd)
    for i, value in zip(where.to_pylist(), column.take(where).to_pylist(), strict=True):
        fixed[i], error = _size_value(name, value)
        if error:
            errors = errors if errors is not None else [None] * n
            errors[i] = errors[i] or error
    return pa.array(fixed, pa.int64()), errors


def _size_value(name: str, value) -> tuple[int | None, str | None]:
    """One size value as bytes, or why it is not a number of bytes."""
    number = None
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return None, None
        if _NUMBER.fullmatch(text):
            number = Decimal(text)
    elif isinstance(value, (int, Decimal)) and not isinstance(value, bool):
        number = Decimal(value)
    elif isinstance(value, float) and math.isfinite(value):
        number = Decimal(value)
    elif value is None:
        return None, None
    shown = repr(value[:60]) if isinstance(value, str) else str(value)[:60]
    try:
        whole = number is not None and number.is_finite() and number == number.to_integral_value()
    except InvalidOperation:
        whole = False
    if not whole:
        return None, f"{name} {shown} is not a whole number of bytes"
    if number < 0:
        return None, f"{name} {shown} is negative"
    if number >= _MAX_SIZE:
        return None, f"{name} {shown} is too large for a number of bytes"
    return int(number), None


def _read_report(fs: fsspec.AbstractFileSystem, path: str) -> tuple[dict, str]:
    """An S3 Inventory ``manifest.json``: its data files and schema, and the inventoried bucket."""
    with fs.open(path, "rb") as f:
        report = json.loads(f.read())
    fmt = str(report.get("fileFormat", "")).upper()
    dest = str(report.get("destinationBucket", "")).removeprefix("arn:aws:s3:::")
    if fmt not in ("CSV", "PARQUET") or not report.get("files"):
        raise ManifestError(f"S3 Inventory report {path}: only CSV and Parquet reports with files are supported")
    schema = [c.strip().lower().replace("_", "") for c in str(report.get("fileSchema", "")).split(",")]
    paths = [f"{dest}/{entry['key']}" if dest else entry["key"] for entry in report["files"]]
    bucket = report.get("sourceBucket") or dest
    return {"format": fmt, "schema": schema, "paths": paths, "bucket": report.get("sourceBucket")}, f"s3://{bucket}/"


def _decode_keys(keys: pa.Array) -> pa.Array:
    """CSV inventory reports URL-encode their keys; only the keys with ``%`` or ``+`` need decoding."""
    encoded = pc.fill_null(pc.match_substring_regex(keys, r"[%+]"), False)
    if not pc.any(encoded).as_py():
        return keys
    decoded = [unquote_plus(k) if e else k for k, e in zip(keys.to_pylist(), encoded.to_pylist(), strict=True)]
    return pa.array(decoded, pa.string())


def _inventory_batches(fs: fsspec.AbstractFileSystem, path: str, report: Mapping,
                       home: str) -> Iterator[pa.RecordBatch]:
    compression = "gzip" if path.endswith(".gz") else None
    with fs.open(path, "rb", compression=compression) as f:
        if report["format"] == "CSV":
            schema = report["schema"]
            reader = pacsv.open_csv(f, read_options=pacsv.ReadOptions(column_names=schema,
                                                                      block_size=CSV_BLOCK_BYTES),
                                    convert_options=pacsv.ConvertOptions(
                                        column_types={c: pa.string() for c in schema},
                                        include_columns=list(dict.fromkeys(schema))))
            batches = reader
        else:
            batches = pq.ParquetFile(f, pre_buffer=False).iter_batches(batch_size=BATCH_ROWS)
        for batch in batches:
            batch = batch.rename_columns([c.lower().replace("_", "") for c in batch.schema.names])
            keys = batch.column("key").cast(pa.string())
            if report["format"] == "CSV":
                keys = _decode_keys(keys)
            keep = _latest_versions(batch)
            n = batch.num_rows
            buckets = (batch.column("bucket").cast(pa.string()) if "bucket" in batch.schema.names
                       else pa.array([report["bucket"]] * n, pa.string()) if n else pa.array([], pa.string()))
            uris = pc.binary_join_element_wise("s3://", buckets, "/", keys, "")
            out = {"uri": uris}
            if "etag" in batch.schema.names:
                out["etag"] = batch.column("etag").cast(pa.string())
            if "size" in batch.schema.names:
                out["size"] = batch.column("size")  # text in a CSV report: ``normalize_batch`` reads it
            part = pa.RecordBatch.from_pydict(out)
            if keep is not None:
                part = part.filter(keep)
            yield normalize_batch(part, path, home)


def _latest_versions(batch: pa.RecordBatch) -> pa.Array | None:
    """Mask of the current versions in an all-versions inventory (no old versions, no deletions), or None."""
    keep = None
    for column, wanted in (("islatest", "true"), ("isdeletemarker", "false")):
        if column in batch.schema.names:
            values = pc.utf8_lower(pc.utf8_trim_whitespace(batch.column(column).cast(pa.string())))
            mask = pc.fill_null(pc.equal(values, wanted), False)
            keep = mask if keep is None else pc.and_(keep, mask)
    return keep


def _listing_pages(fs: fsspec.AbstractFileSystem, path: str) -> Iterator[list[dict]]:
    """Pages of a listing under ``path``, in key order, without holding the whole listing.

    S3 lists page by page (1,000 keys a request); a local folder is walked in path order; other stores are
    listed with ``find`` at once.
    """
    if protocol(fs) == "s3" and hasattr(fs, "_list_pages"):
        bucket, _, prefix = path.partition("/")
        prefix = prefix.rstrip("/") + "/" if prefix else ""
        pages = fs._list_pages("list_objects_v2", Bucket=bucket, Prefix=prefix, **getattr(fs, "req_kw", {}))
        while True:
            try:
                page = fsspec.asyn.sync(fs.loop, pages.__anext__)
            except StopAsyncIteration:
                return
            yield [{"name": f"{bucket}/{c['Key']}", "size": c.get("Size"), "ETag": c.get("ETag")}
                   for c in page.get("Contents", [])]
    elif protocol(fs) == "file":
        page = []
        for entry in _walk_sorted(path):
            page.append(entry)
            if len(page) == 1000:
                yield page
                page = []
        yield page
    else:
        found = fs.find(path, detail=True)
        yield [{"name": p, **info} for p, info in sorted(found.items()) if info.get("type") != "directory"]


def _walk_sorted(folder: str) -> Iterator[dict]:
    """Files below a local folder in the order of their full paths (a folder sorts as its name plus ``/``)."""
    with os.scandir(folder) as scan:
        entries = sorted(scan, key=lambda e: e.name + ("/" if e.is_dir(follow_symlinks=False) else ""))
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            yield from _walk_sorted(entry.path)
        elif entry.is_file():
            yield {"name": entry.path, "size": entry.stat().st_size}


def _listing_batches(fs: fsspec.AbstractFileSystem, path: str, home: str) -> Iterator[pa.RecordBatch]:
    empty = True
    for page in _listing_pages(fs, path):
        rows = [info for info in page if info["name"].lower().endswith(IMAGE_EXTENSIONS)]
        if not rows and not empty:
            continue
        empty = False
        batch = pa.record_batch({
            "uri": pa.array([_full_uri(fs, info["name"]) for info in rows], pa.string()),
            "etag": pa.array([(info.get("ETag") or info.get("etag") or None) for info in rows], pa.string()),
            "size": pa.array([info.get("size") for info in rows], pa.int64()),
        })
        yield normalize_batch(batch, path, home)
    if empty:
        yield normalize_batch(pa.record_batch({"uri": pa.array([], pa.string()), "etag": pa.array([], pa.string()),
                                               "size": pa.array([], pa.int64())}), path, home)


def open_manifest(uri: str, storage_options: Mapping | None = None) -> ManifestReader:
    """Open a manifest: find what it is and which files it has, reading no rows yet.

    Args:
        uri: Where the manifest is (see the module docstring for the forms).
        storage_options: fsspec options; credentials come from the environment.

    Raises:
        ManifestError: It does not exist or cannot be reached.
    """
    try:
        fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
        is_dir = fs.isdir(path)
        if not is_dir and not fs.exists(path):
            raise ManifestError(f"no manifest at {redact_uri(uri)}")
        home = _home(fs, path, is_dir)
        if is_dir:
            root = path.rstrip("/")
            # A folder of table files, or a prefix of images: the listing is read page by page and only table
            # files are kept, so a prefix of 10^8 images is not held (it is listed again to be read).
            files = sorted((e["name"], e) for page in _listing_pages(fs, root) for e in page
                           if e["name"].lower().endswith(FOLDER_TABLE_EXTENSIONS)
                           and not any(part.startswith(("_", ".")) for part in e["name"][len(root):].split("/")))
            if files:
                return ManifestReader(uri, "folder", home, fs, path, tuple(
                    (p, _version(fs.info(p) if protocol(fs) == "file" else info)) for p, info in files))
            return ManifestReader(uri, "listing", home, fs, path)
        info = fs.info(path)
        if posixpath.basename(path) == "manifest.json":
            report, home = _read_report(fs, path)
            versions = ((path, _version(info)), *((p, _version(fs.info(p))) for p in report["paths"]))
            return ManifestReader(uri, "s3-inventory", home, fs, path, versions, report)
        kind = _table_kind(_table_name(fs, path))
        return ManifestReader(uri, kind, home, fs, path, ((path, _version(info)),))
    except ManifestError:
        raise
    except Exception as exc:  # noqa: BLE001 - storage errors of any backend, reported with the URI
        raise ManifestError(f"cannot read manifest {redact_uri(uri)}: {type(exc).__name__}: "
                            f"{redact_text(str(exc))}") from None


def _concat(tables: list[pa.Table]) -> pa.Table:
    """Concatenate per-part tables as the planner unites them.

    A column of two number types becomes float64, one of other different types text.
    """
    if len(tables) == 1:
        return tables[0]
    types: dict[str, set] = {}
    for table in tables:
        for f in table.schema:
            if not pa.types.is_null(f.type):
                types.setdefault(f.name, set()).add(f.type)
    wanted = {name: pa.float64() if all(_is_number(t) for t in found) else pa.string()
              for name, found in types.items() if len(found) > 1}
    if wanted:
        tables = [t.cast(pa.schema([pa.field(f.name, wanted.get(f.name, f.type)) for f in t.schema]))
                  for t in tables]
    return pa.concat_tables(tables, promote_options="permissive")


def read_manifest(uri: str, storage_options: Mapping | None = None, limit: int | None = None) -> Manifest:
    """Read a whole manifest into memory, ``row_index`` numbering the rows in manifest order.

    For the small manifests of ``dgiqa evaluate`` and the tests; the nightly job streams (``open_manifest``).

    Args:
        uri: Where the manifest is (see the module docstring for the forms).
        storage_options: fsspec options; credentials come from the environment.
        limit: Keep only the first ``limit`` rows (trial runs).

    Raises:
        ManifestError: It cannot be read, or has no ``uri`` column.
    """
    reader = open_manifest(uri, storage_options)
    tables = [pa.Table.from_batches(list(part)) for part in reader.parts()]
    table = _concat(tables)
    if limit is not None:
        table = table.slice(0, limit)
    row_errors = table.column(ROW_ERROR).to_pylist()
    table = table.drop_columns([ROW_ERROR])
    table = table.add_column(0, "row_index", pa.array(range(len(table)), pa.int64()))
    return Manifest(table=table, source=uri, kind=reader.kind, home=reader.home,
                    row_errors=row_errors if any(row_errors) else None)
