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
runs only for the rows that need it (invalid UTF-8, URL-encoded inventory keys). ``read_manifest`` gathers the
batches into one table, for the small manifests of the other commands and the tests.

CSV has no types: its columns are read as text (an ETag or an ID of digits keeps its zeros, and a column that
looks numeric for the first million rows cannot break the night on row 1,000,001), except ``size`` /
``size_bytes``, which are integers.
"""

from __future__ import annotations

import json
import os
import posixpath
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from urllib.parse import unquote_plus, urlsplit

import fsspec
import fsspec.asyn
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from pipeline.batch.allowlist import redact_text, redact_uri
from pipeline.batch.output import protocol

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".heic", ".heif", ".avif")
TABLE_EXTENSIONS = (".csv", ".csv.gz", ".parquet", ".jsonl", ".ndjson", ".json", ".jsonl.gz")
# In a folder, plain ``.json`` files are sidecars of images (photo exports have them), not manifests.
FOLDER_TABLE_EXTENSIONS = tuple(e for e in TABLE_EXTENSIONS if e != ".json")
ROW_ERROR = "__row_error__"  # column of every normalised batch: why a row itself is unusable, or null
MANIFEST_COLUMNS = ("uri", "etag", "size_bytes")
SIZE_COLUMNS = ("size_bytes", "size")
BATCH_ROWS = 65_536  # rows per record batch: large enough for vectorised work, small beside any memory limit
CSV_BLOCK_BYTES = 4 << 20


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
        """One iterator of normalised batches per manifest file, in manifest order.

        Every batch has ``uri``, ``etag``, ``size_bytes``, the file's other columns and ``ROW_ERROR``.

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
                yield _guarded(self.source, _table_file_batches(self.fs, path, self.home))


def _guarded(source: str, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """Any failure while streaming a manifest becomes one ``ManifestError`` line naming the manifest."""
    try:
        yield from batches
    except ManifestError:
        raise
    except Exception as exc:  # noqa: BLE001 - one line naming the manifest, whatever the cause
        raise ManifestError(f"cannot read manifest {redact_uri(source)}: {type(exc).__name__}: "
                            f"{redact_text(str(exc))}") from None


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


def _table_file_batches(fs: fsspec.AbstractFileSystem, path: str, home: str) -> Iterator[pa.RecordBatch]:
    name = path.lower().removesuffix(".gz")
    try:
        if not name.endswith((".parquet", ".jsonl", ".ndjson", ".json")):
            yield from _csv_batches(fs, path, home)
            return
        with fs.open(path, "rb", compression="infer") as f:
            if name.endswith(".parquet"):
                parquet = pq.ParquetFile(f, pre_buffer=False)  # pre-buffering reads the whole file
                schema, batches = parquet.schema_arrow, parquet.iter_batches(batch_size=BATCH_ROWS)
            else:
                reader = pajson.open_json(f)
                schema, batches = reader.schema, reader
            yield from _normalized(batches, schema, path, home)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ManifestError(f"cannot read manifest file {path}: {exc}") from None


def _normalized(batches, schema: pa.Schema, path: str, home: str) -> Iterator[pa.RecordBatch]:
    """Normalise each batch; an empty file still yields one empty batch, which says what columns it has."""
    empty = True
    for batch in batches:
        empty = False
        yield normalize_batch(batch, path, home)
    if empty:
        yield normalize_batch(pa.RecordBatch.from_pylist([], schema=schema), path, home)


def _csv_batches(fs: fsspec.AbstractFileSystem, path: str, home: str) -> Iterator[pa.RecordBatch]:
    """A CSV manifest without letting one bad line sink it.

    Text is read unchecked (bad UTF-8 is found per batch later); lines with the wrong number of fields become
    rows of their own with an error, appended after the file's other rows; lines of only whitespace are blank.
    """
    malformed: list[str] = []

    def on_invalid(row) -> str:
        if row.text.strip():
            malformed.append(f"malformed manifest line (expected {row.expected_columns} fields, got "
                             f"{row.actual_columns}): {row.text[:200]!r}")
        return "skip"

    with fs.open(path, "rb", compression="infer") as f:  # the header's names, to make every column text
        names = pacsv.open_csv(f, read_options=pacsv.ReadOptions(block_size=1 << 16),
                               parse_options=pacsv.ParseOptions(invalid_row_handler=lambda row: "skip"),
                               convert_options=pacsv.ConvertOptions(check_utf8=False)).schema.names
    types = {n: pa.int64() if n in SIZE_COLUMNS else pa.string() for n in names}
    with fs.open(path, "rb", compression="infer") as f:
        reader = pacsv.open_csv(f, read_options=pacsv.ReadOptions(block_size=CSV_BLOCK_BYTES),
                                parse_options=pacsv.ParseOptions(invalid_row_handler=on_invalid),
                                convert_options=pacsv.ConvertOptions(column_types=types, check_utf8=False))
        yield from _normalized(reader, reader.schema, path, home)
        if malformed:
            bad = pa.table({name: pa.nulls(len(malformed), reader.schema.field(name).type)
                            for name in reader.schema.names})
            bad = bad.append_column(ROW_ERROR, pa.array(malformed, pa.string()))
            for batch in bad.to_batches(BATCH_ROWS):
                yield normalize_batch(batch, path, home)


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


def normalize_batch(batch: pa.RecordBatch | pa.Table, source: str, home: str) -> pa.RecordBatch:
    """One batch of a manifest file as the job reads it.

    Columns: resolved ``uri``, ``etag``, ``size_bytes``, the file's other columns, and ``ROW_ERROR``.

    Raises:
        ManifestError: The file has no ``uri`` column.
    """
    names = batch.schema.names
    if "uri" not in names:
        raise ManifestError(f"manifest {redact_uri(source)} has no 'uri' column "
                            f"(columns: {', '.join(names) or 'none'})")
    n = batch.num_rows
    errors = batch.column(ROW_ERROR).to_pylist() if ROW_ERROR in names else None
    columns = {}
    for name in names:
        if name == ROW_ERROR:
            continue
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
    out["size_bytes"] = columns[size_name].cast(pa.int64()) if size_name else pa.nulls(n, pa.int64())
    for name, column in columns.items():
        if name not in ("uri", "etag", size_name):
            out[name] = column
    out[ROW_ERROR] = pa.array(errors, pa.string()) if errors is not None else pa.nulls(n, pa.string())
    return pa.RecordBatch.from_pydict(out)


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
                size = batch.column("size")
                if pa.types.is_string(size.type):
                    size = pc.if_else(pc.equal(size, ""), pa.scalar(None, pa.string()), size)
                out["size"] = size.cast(pa.int64())
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
        name = path.lower().removesuffix(".gz")
        kind = ("parquet" if name.endswith(".parquet") else "jsonl"
                if name.endswith((".json", ".jsonl", ".ndjson")) else "csv")
        return ManifestReader(uri, kind, home, fs, path, ((path, _version(info)),))
    except ManifestError:
        raise
    except Exception as exc:  # noqa: BLE001 - storage errors of any backend, reported with the URI
        raise ManifestError(f"cannot read manifest {redact_uri(uri)}: {type(exc).__name__}: "
                            f"{redact_text(str(exc))}") from None


def _concat(tables: list[pa.Table]) -> pa.Table:
    """Concatenate per-file tables; a column whose type differs between files becomes text."""
    if len(tables) == 1:
        return tables[0]
    types: dict[str, set] = {}
    for table in tables:
        for f in table.schema:
            if not pa.types.is_null(f.type):
                types.setdefault(f.name, set()).add(f.type)
    clashing = {name for name, found in types.items() if len(found) > 1}
    if clashing:
        tables = [t.cast(pa.schema([pa.field(f.name, pa.string()) if f.name in clashing else f for f in t.schema]))
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
