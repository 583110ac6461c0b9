"""Manifests: which images a run scores, read from any fsspec URI.

Accepted forms:

* a CSV, Parquet or JSON Lines file with a ``uri`` column (optional ``etag``, ``size``/``size_bytes``, ``id``
  and any other columns, which are carried through to the output);
* a folder (or prefix) holding such files;
* an S3 Inventory report: its ``manifest.json``, pointing at CSV or Parquet files of bucket/key/size/ETag;
* a plain folder or prefix of images (``s3://bucket/photos/``), listed and filtered to image extensions.

Relative keys resolve against the manifest's bucket (S3) or folder (local). The manifest's own bucket or
folder is the default allowed prefix of the run (``pipeline.allowlist``).
"""

from __future__ import annotations

import io
import json
import posixpath
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import unquote_plus

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".heic", ".heif", ".avif")
TABLE_EXTENSIONS = (".csv", ".csv.gz", ".parquet", ".jsonl", ".ndjson", ".json", ".jsonl.gz")
# In a folder, plain ``.json`` files are sidecars of images (photo exports have them), not manifests.
FOLDER_TABLE_EXTENSIONS = tuple(e for e in TABLE_EXTENSIONS if e != ".json")
# Identifiers that must stay text even when every value looks like a number (an ETag of digits keeps its zeros).
TEXT_COLUMNS = ("uri", "etag", "id")
ROW_ERROR = "__row_error__"  # internal column: why a row itself is unusable
MANIFEST_COLUMNS = ("uri", "etag", "size_bytes")


class ManifestError(ValueError):
    """The manifest as a whole cannot be used (unreadable, no ``uri`` column, ...)."""


@dataclass(frozen=True)
class Manifest:
    """The rows of a run, in manifest order.

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
        return [n for n in self.table.column_names if n not in ("row_index", *MANIFEST_COLUMNS)]


def _protocol(fs: fsspec.AbstractFileSystem) -> str:
    proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return "file" if proto in ("file", "local") else proto


def _full_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    proto = _protocol(fs)
    return f"file://{path}" if proto == "file" else f"{proto}://{path}"


def _home(fs: fsspec.AbstractFileSystem, path: str, is_dir: bool) -> str:
    if _protocol(fs) == "file":
        folder = path if is_dir else posixpath.dirname(path)
        return f"file://{folder.rstrip('/')}/"
    return f"{_protocol(fs)}://{path.split('/', 1)[0]}/"


def _read_table_file(fs: fsspec.AbstractFileSystem, path: str) -> pa.Table:
    with fs.open(path, "rb", compression="infer") as f:
        data = f.read()
    name = path.lower().removesuffix(".gz")
    try:
        if name.endswith(".parquet"):
            return pq.read_table(io.BytesIO(data))
        if name.endswith((".jsonl", ".ndjson", ".json")):
            return pajson.read_json(io.BytesIO(data))
        return _read_csv(data)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ManifestError(f"cannot read manifest file {path}: {exc}") from None


def _read_csv(data: bytes) -> pa.Table:
    """Read a CSV manifest without letting one bad line sink it.

    Text is read unchecked (bad UTF-8 is found per row later); lines with the wrong number of fields become
    rows of their own with an error, appended after the others; lines of only whitespace are blank lines.
    """
    malformed: list[str] = []

    def on_invalid(row) -> str:
        if row.text.strip():
            malformed.append(f"malformed manifest line (expected {row.expected_columns} fields, got "
                             f"{row.actual_columns}): {row.text[:200]!r}")
        return "skip"

    text_types = {name: pa.string() for name in TEXT_COLUMNS}
    table = pacsv.read_csv(io.BytesIO(data), parse_options=pacsv.ParseOptions(invalid_row_handler=on_invalid),
                           convert_options=pacsv.ConvertOptions(column_types=text_types, check_utf8=False))
    if not malformed:
        return table
    bad = pa.table({name: pa.nulls(len(malformed), table.schema.field(name).type) for name in table.column_names})
    bad = bad.append_column(ROW_ERROR, pa.array(malformed, pa.string()))
    if ROW_ERROR not in table.column_names:
        table = table.append_column(ROW_ERROR, pa.nulls(len(table), pa.string()))
    return pa.concat_tables([table, bad])


def _resolve(uri: str, home: str) -> str:
    if "://" in uri:
        return uri
    if uri.startswith("/"):
        return f"file://{uri}" if home.startswith("file://") else home + uri.lstrip("/")
    return home + uri


def _mark_invalid_utf8(table: pa.Table) -> pa.Table:
    """Find text that is not valid UTF-8 (CSV is read unchecked so one bad row cannot sink the manifest).

    Bad values are replaced with their lossy decoding and the row gets a ``ROW_ERROR`` message.
    """
    errors: list[str | None] = (table.column(ROW_ERROR).to_pylist() if ROW_ERROR in table.column_names
                                else [None] * len(table))
    columns = {}
    for name in table.column_names:
        if name == ROW_ERROR:
            continue
        column = table.column(name)
        if not pa.types.is_string(column.type):
            columns[name] = column
            continue
        values = []
        for i, raw in enumerate(column.cast(pa.binary()).to_pylist()):
            if raw is None:
                values.append(None)
                continue
            try:
                values.append(raw.decode("utf-8"))
            except UnicodeDecodeError as exc:
                values.append(raw.decode("utf-8", errors="replace"))
                errors[i] = errors[i] or f"manifest row is not valid UTF-8 (column {name!r}: {exc.reason})"
        columns[name] = pa.array(values, pa.string())
    if any(errors):
        columns[ROW_ERROR] = pa.array(errors, pa.string())
    return pa.table(columns)


def _normalize_columns(table: pa.Table, source: str, home: str) -> pa.Table:
    table = _mark_invalid_utf8(table)
    names = table.column_names
    if "uri" not in names:
        raise ManifestError(f"manifest {source} has no 'uri' column (columns: {', '.join(names) or 'none'})")
    uris = [None if u is None or not str(u).strip() else _resolve(str(u).strip(), home)
            for u in table.column("uri").to_pylist()]
    out = {"uri": pa.array(uris, pa.string())}
    etag = table.column("etag").cast(pa.string()) if "etag" in names else pa.nulls(len(table), pa.string())
    out["etag"] = pc.utf8_trim(etag, '"')
    size_name = "size_bytes" if "size_bytes" in names else "size" if "size" in names else None
    out["size_bytes"] = (table.column(size_name).cast(pa.int64()) if size_name
                         else pa.nulls(len(table), pa.int64()))
    for name in names:
        if name not in ("uri", "etag", size_name):
            out[name] = table.column(name)
    return pa.table(out)


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


def _read_inventory(fs: fsspec.AbstractFileSystem, path: str) -> tuple[pa.Table, str]:
    with fs.open(path, "rb") as f:
        report = json.loads(f.read())
    fmt = str(report.get("fileFormat", "")).upper()
    dest = str(report.get("destinationBucket", "")).removeprefix("arn:aws:s3:::")
    source_bucket = report.get("sourceBucket")
    if fmt not in ("CSV", "PARQUET") or not report.get("files"):
        raise ManifestError(f"S3 Inventory report {path}: only CSV and Parquet reports with files are supported")
    schema = [c.strip().lower().replace("_", "") for c in str(report.get("fileSchema", "")).split(",")]
    tables = []
    for entry in report["files"]:
        file_path = f"{dest}/{entry['key']}" if dest else entry["key"]
        with fs.open(file_path, "rb", compression="gzip" if file_path.endswith(".gz") else None) as f:
            data = f.read()
        if fmt == "CSV":
            opts = pacsv.ReadOptions(column_names=schema)
            schema_set = set(schema)
            types = {c: pa.string() for c in schema}
            part = pacsv.read_csv(io.BytesIO(data), read_options=opts,
                                  convert_options=pacsv.ConvertOptions(column_types=types,
                                                                       include_columns=list(schema_set)))
            keys = [unquote_plus(k) for k in part.column("key").to_pylist()]  # CSV reports URL-encode keys
        else:
            part = pq.read_table(io.BytesIO(data))
            part = part.rename_columns([c.lower().replace("_", "") for c in part.column_names])
            keys = part.column("key").to_pylist()
        part, keys = _latest_versions(part, keys)
        buckets = part.column("bucket").to_pylist() if "bucket" in part.column_names else [source_bucket] * len(keys)
        table = {"uri": [f"s3://{b}/{k}" for b, k in zip(buckets, keys, strict=True)]}
        if "etag" in part.column_names:
            table["etag"] = part.column("etag").cast(pa.string())
        if "size" in part.column_names:
            table["size"] = pc.if_else(pc.equal(pc.cast(part.column("size"), pa.string()), ""), None,
                                       part.column("size")).cast(pa.int64())
        tables.append(pa.table(table))
    bucket = source_bucket or (tables[0].column("uri")[0].as_py().split("/")[2] if len(tables[0]) else dest)
    return _concat(tables), f"s3://{bucket}/"


def _latest_versions(part: pa.Table, keys: list[str]) -> tuple[pa.Table, list[str]]:
    """Keep the current version of each object in an all-versions inventory (no old versions, no deletions)."""
    keep = np.ones(len(part), bool)
    for column, wanted in (("islatest", True), ("isdeletemarker", False)):
        if column in part.column_names:
            values = [str(v).strip().lower() == "true" for v in part.column(column).to_pylist()]
            keep &= np.array(values, bool) == wanted
    if keep.all():
        return part, keys
    return part.filter(pa.array(keep)), [k for k, k_keep in zip(keys, keep, strict=True) if k_keep]


def _list_images(fs: fsspec.AbstractFileSystem, path: str) -> pa.Table:
    found = fs.find(path, detail=True)
    rows = sorted((p, info) for p, info in found.items()
                  if info.get("type") != "directory" and p.lower().endswith(IMAGE_EXTENSIONS))
    return pa.table({
        "uri": pa.array([_full_uri(fs, p) for p, _ in rows], pa.string()),
        "etag": pa.array([(info.get("ETag") or info.get("etag") or None) for _, info in rows], pa.string()),
        "size": pa.array([info.get("size") for _, info in rows], pa.int64()),
    })


def read_manifest(uri: str, storage_options: Mapping | None = None, limit: int | None = None) -> Manifest:
    """Read a manifest into memory, URIs resolved, ``row_index`` numbering the rows in manifest order.

    Args:
        uri: Where the manifest is (see the module docstring for the forms).
        storage_options: fsspec options; credentials come from the environment.
        limit: Keep only the first ``limit`` rows (trial runs).

    Raises:
        ManifestError: It cannot be read, or has no ``uri`` column.
    """
    try:
        fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
        is_dir = fs.isdir(path)
        if not is_dir and not fs.exists(path):
            raise ManifestError(f"no manifest at {uri}")
    except ManifestError:
        raise
    except Exception as exc:  # noqa: BLE001 - storage errors of any backend, reported with the URI
        raise ManifestError(f"cannot read manifest {uri}: {type(exc).__name__}: {exc}") from None
    home = _home(fs, path, is_dir)
    try:
        if is_dir:
            files = sorted(p for p in fs.find(path) if p.lower().endswith(FOLDER_TABLE_EXTENSIONS)
                           and not any(part.startswith(("_", ".")) for part in p[len(path):].split("/")))
            if files:
                kind = "folder"
                table = _concat([_normalize_columns(_read_table_file(fs, p), p, home) for p in files])
            else:
                kind, table = "listing", _normalize_columns(_list_images(fs, path), uri, home)
        elif posixpath.basename(path) == "manifest.json":
            kind = "s3-inventory"
            table, home = _read_inventory(fs, path)
            table = _normalize_columns(table, uri, home)
        else:
            name = path.lower().removesuffix(".gz")
            is_json = name.endswith((".json", ".jsonl", ".ndjson"))
            kind = "parquet" if name.endswith(".parquet") else "jsonl" if is_json else "csv"
            table = _normalize_columns(_read_table_file(fs, path), uri, home)
    except ManifestError:
        raise
    except Exception as exc:  # noqa: BLE001 - one line naming the manifest, whatever the cause
        raise ManifestError(f"cannot read manifest {uri}: {type(exc).__name__}: {exc}") from None
    if limit is not None:
        table = table.slice(0, limit)
    row_errors = None
    if ROW_ERROR in table.column_names:
        row_errors = table.column(ROW_ERROR).to_pylist()
        table = table.drop_columns([ROW_ERROR])
    table = table.add_column(0, "row_index", pa.array(range(len(table)), pa.int64()))
    return Manifest(table=table, source=uri, kind=kind, home=home, row_errors=row_errors)
