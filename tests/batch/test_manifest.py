import gzip
import hashlib
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.batch import manifest as manifest_module
from pipeline.batch.manifest import ManifestError, open_manifest, read_manifest

HEAD = ["row_index", "uri", "etag", "size_bytes"]
ROWS = [
    {"uri": "images/a.jpg", "etag": "e1", "size": 10, "label": "cat"},
    {"uri": "images/b.png", "etag": "e2", "size": 20, "label": "dog"},
    {"uri": "c.jpg", "etag": "e3", "size": 30, "label": "owl"},
]


def _csv(rows, columns=("uri", "etag", "size", "label")) -> str:
    lines = [",".join(columns)] + [",".join(str(r[c]) for c in columns) for r in rows]
    return "\n".join(lines) + "\n"


def _expected(folder, rows=ROWS):
    return [{"row_index": i, "uri": f"file://{folder}/{r['uri']}", "etag": r["etag"], "size_bytes": r["size"],
             "label": r["label"]} for i, r in enumerate(rows)]


def _check_table(manifest, folder):
    table = manifest.table
    assert table.column_names == [*HEAD, "label"]
    assert table.schema.field("row_index").type == pa.int64()
    assert table.schema.field("uri").type == pa.string()
    assert table.schema.field("etag").type == pa.string()
    assert table.schema.field("size_bytes").type == pa.int64()
    assert manifest.extra_columns == ["label"]
    assert manifest.home == f"file://{folder}/"
    assert table.to_pylist() == _expected(folder)


def test_csv_manifest(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text(_csv(ROWS))
    manifest = read_manifest(str(path))
    assert manifest.kind == "csv"
    assert manifest.source == str(path)
    _check_table(manifest, tmp_path)
    assert manifest.table.column("uri")[0].as_py() == f"file://{tmp_path}/images/a.jpg"


def test_csv_manifest_given_as_file_uri(tmp_path):
    (tmp_path / "m.csv").write_text(_csv(ROWS))
    manifest = read_manifest(f"file://{tmp_path}/m.csv")
    assert manifest.kind == "csv"
    _check_table(manifest, tmp_path)


def test_gzipped_csv_manifest(tmp_path):
    (tmp_path / "m.csv.gz").write_bytes(gzip.compress(_csv(ROWS).encode()))
    manifest = read_manifest(str(tmp_path / "m.csv.gz"))
    assert manifest.kind == "csv"
    _check_table(manifest, tmp_path)


def test_parquet_manifest(tmp_path):
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "m.parquet")
    manifest = read_manifest(str(tmp_path / "m.parquet"))
    assert manifest.kind == "parquet"
    _check_table(manifest, tmp_path)


@pytest.mark.parametrize("name", ["m.jsonl", "m.ndjson", "m.json"])
def test_jsonl_manifest(tmp_path, name):
    (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    manifest = read_manifest(str(tmp_path / name))
    assert manifest.kind == "jsonl"
    _check_table(manifest, tmp_path)


def test_size_bytes_column_name_and_missing_optional_columns(tmp_path):
    (tmp_path / "a.csv").write_text("uri,size_bytes\nx.jpg,5\n")
    (tmp_path / "b.csv").write_text("uri\nx.jpg\n")
    a = read_manifest(str(tmp_path / "a.csv")).table
    assert a.column_names == HEAD
    assert a.to_pylist() == [{"row_index": 0, "uri": f"file://{tmp_path}/x.jpg", "etag": None, "size_bytes": 5}]
    b = read_manifest(str(tmp_path / "b.csv")).table
    assert b.column_names == HEAD
    assert b.schema.field("etag").type == pa.string()
    assert b.schema.field("size_bytes").type == pa.int64()
    assert b.to_pylist() == [{"row_index": 0, "uri": f"file://{tmp_path}/x.jpg", "etag": None, "size_bytes": None}]


def test_absolute_paths_and_full_uris_are_kept(tmp_path):
    (tmp_path / "m.csv").write_text(
        "uri\n/abs/dir/a.jpg\nfile:///other/b.jpg\ns3://bucket/c.jpg\n  sub/d.jpg  \n")
    manifest = read_manifest(str(tmp_path / "m.csv"))
    assert manifest.table.column("uri").to_pylist() == [
        "file:///abs/dir/a.jpg", "file:///other/b.jpg", "s3://bucket/c.jpg", f"file://{tmp_path}/sub/d.jpg"]


def test_etag_surrounding_quotes_stripped(tmp_path):
    (tmp_path / "m.csv").write_text('uri,etag\na.jpg,"""abc"""\nb.jpg,def\nc.jpg,"""9f-2"""\n')
    assert read_manifest(str(tmp_path / "m.csv")).table.column("etag").to_pylist() == ["abc", "def", "9f-2"]
    (tmp_path / "m.jsonl").write_text('{"uri": "a.jpg", "etag": "\\"abc\\""}\n')
    assert read_manifest(str(tmp_path / "m.jsonl")).table.column("etag").to_pylist() == ["abc"]


def test_etag_of_digits_is_kept_as_text(tmp_path):
    # An MD5 ETag can be all decimal digits; CSV type inference must not turn it into a number.
    (tmp_path / "m.csv").write_text("uri,etag\na.jpg,0123456789\n")
    assert read_manifest(str(tmp_path / "m.csv")).table.column("etag").to_pylist() == ["0123456789"]


@pytest.mark.parametrize(("limit", "count"), [(None, 3), (0, 0), (1, 1), (2, 2), (10, 3)])
def test_limit(tmp_path, limit, count):
    (tmp_path / "m.csv").write_text(_csv(ROWS))
    table = read_manifest(str(tmp_path / "m.csv"), limit=limit).table
    assert table.to_pylist() == _expected(tmp_path)[:count]


def test_blank_lines_in_csv_ignored(tmp_path):
    text = _csv(ROWS).replace("\n", "\n\n", 2) + "\n\n"
    assert "\n\n" in text
    (tmp_path / "m.csv").write_text(text)
    manifest = read_manifest(str(tmp_path / "m.csv"))
    assert manifest.table.to_pylist() == _expected(tmp_path)


def test_missing_uri_column(tmp_path):
    (tmp_path / "m.csv").write_text("path,etag,size\na.jpg,e,1\n")
    with pytest.raises(ManifestError, match="no 'uri' column") as info:
        read_manifest(str(tmp_path / "m.csv"))
    assert "path, etag, size" in str(info.value)
    assert str(tmp_path / "m.csv") in str(info.value)


def test_folder_of_csv_manifests(tmp_path):
    folder = tmp_path / "manifests"
    folder.mkdir()
    # Written out of order: rows follow the sorted file names.
    (folder / "part-2.csv").write_text(_csv(ROWS[2:]))
    (folder / "part-1.csv").write_text(_csv(ROWS[:2]))
    (folder / "_ignored.csv").write_text(_csv([{"uri": "z.jpg", "etag": "z", "size": 1, "label": "no"}]))
    (folder / ".hidden.csv").write_text(_csv([{"uri": "y.jpg", "etag": "y", "size": 1, "label": "no"}]))
    (folder / "notes.txt").write_text("not a manifest\n")
    (folder / "x.jpg").write_bytes(b"not listed: the folder holds manifests")
    manifest = read_manifest(str(folder))
    assert manifest.kind == "folder"
    assert manifest.home == f"file://{folder}/"
    assert manifest.extra_columns == ["label"]
    assert manifest.table.to_pylist() == _expected(folder)


def test_folder_of_manifests_whose_columns_infer_differently(tmp_path):
    # Each CSV's types are inferred on their own: here etag and label look numeric in one file only.
    (tmp_path / "a.csv").write_text("uri,etag,label\na.jpg,abc,cat\n")
    (tmp_path / "b.csv").write_text("uri,etag,label\nb.jpg,123,7\n")
    table = read_manifest(str(tmp_path)).table
    assert table.column("uri").to_pylist() == [f"file://{tmp_path}/a.jpg", f"file://{tmp_path}/b.jpg"]
    assert table.column("etag").to_pylist() == ["abc", "123"]
    assert [str(v) for v in table.column("label").to_pylist()] == ["cat", "7"]


def test_folder_of_images_is_listed(tmp_path):
    files = {"a.jpg": b"a" * 3, "b.PNG": b"b" * 5, "sub/c.webp": b"c" * 7, "sub/deeper/d.jpeg": b"d" * 11,
             "e.tiff": b"e" * 2, "readme.txt": b"no", "f.jpg.bak": b"no", "raw.cr2": b"no"}
    for name, data in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    manifest = read_manifest(str(tmp_path))
    assert manifest.kind == "listing"
    assert manifest.home == f"file://{tmp_path}/"
    assert manifest.extra_columns == []
    table = manifest.table
    assert table.column_names == HEAD
    images = sorted(n for n in files if n.lower().endswith((".jpg", ".png", ".webp", ".jpeg", ".tiff")))
    assert table.column("uri").to_pylist() == [f"file://{tmp_path}/{n}" for n in images]
    assert table.column("size_bytes").to_pylist() == [len(files[n]) for n in images]
    assert table.column("row_index").to_pylist() == list(range(len(images)))


def test_empty_folder_gives_an_empty_listing(tmp_path):
    manifest = read_manifest(str(tmp_path))
    assert manifest.kind == "listing"
    assert manifest.table.num_rows == 0
    assert manifest.table.column_names == HEAD


@pytest.mark.parametrize("name", ["missing.csv", "missing/", "missing.parquet"])
def test_nonexistent_manifest(tmp_path, name):
    with pytest.raises(ManifestError, match="no manifest at"):
        read_manifest(str(tmp_path / name))


def test_unreadable_parquet_manifest(tmp_path):
    (tmp_path / "m.parquet").write_bytes(b"this is not parquet")
    with pytest.raises(ManifestError, match="cannot read manifest file"):
        read_manifest(str(tmp_path / "m.parquet"))


# S3, on the local moto server of conftest.py.


def test_s3_csv_manifest(s3):
    fs, options = s3
    fs.mkdir("bucket")
    fs.pipe("bucket/manifests/m.csv", _csv(ROWS).encode())
    manifest = read_manifest("s3://bucket/manifests/m.csv", storage_options=options)
    assert manifest.kind == "csv"
    assert manifest.home == "s3://bucket/"
    assert manifest.table.column("uri").to_pylist() == [
        "s3://bucket/images/a.jpg", "s3://bucket/images/b.png", "s3://bucket/c.jpg"]
    assert manifest.table.column("etag").to_pylist() == ["e1", "e2", "e3"]
    assert manifest.table.column("size_bytes").to_pylist() == [10, 20, 30]
    assert manifest.table.column("label").to_pylist() == ["cat", "dog", "owl"]


def test_s3_missing_manifest(s3):
    fs, options = s3
    fs.mkdir("bucket")
    with pytest.raises(ManifestError, match="no manifest at"):
        read_manifest("s3://bucket/manifests/none.csv", storage_options=options)


def test_s3_prefix_listing(s3):
    fs, options = s3
    fs.mkdir("bucket")
    files = {"photos/a.jpg": b"a" * 3, "photos/sub/b.png": b"bb" * 4, "photos/c.JPEG": b"c",
             "photos/notes.txt": b"text", "photos/d.jpg.xmp": b"<x/>", "other/e.jpg": b"outside"}
    for key, data in files.items():
        fs.pipe(f"bucket/{key}", data)
    manifest = read_manifest("s3://bucket/photos/", storage_options=options)
    assert manifest.kind == "listing"
    assert manifest.home == "s3://bucket/"
    keys = ["photos/a.jpg", "photos/c.JPEG", "photos/sub/b.png"]
    table = manifest.table
    assert table.column_names == HEAD
    assert table.column("uri").to_pylist() == [f"s3://bucket/{k}" for k in keys]
    assert table.column("size_bytes").to_pylist() == [len(files[k]) for k in keys]
    # A single-part upload's ETag is the MD5 of its bytes, listed in quotes; the quotes are stripped.
    assert table.column("etag").to_pylist() == [hashlib.md5(files[k]).hexdigest() for k in keys]


def _inventory_report(fmt: str, schema: str, data_key: str) -> bytes:
    return json.dumps({
        "sourceBucket": "bucket", "destinationBucket": "arn:aws:s3:::inv", "version": "2016-11-30",
        "fileFormat": fmt, "fileSchema": schema,
        "files": [{"key": data_key, "size": 0, "MD5checksum": "x"}],
    }).encode()


def test_s3_inventory_csv(s3):
    fs, options = s3
    fs.mkdir("bucket")
    fs.mkdir("inv")
    rows = ['"bucket","photos/a%20b.jpg","123","abc"', '"bucket","photos/c%2Bd.jpg","4","def"',
            '"bucket","photos/%C3%A9t%C3%A9.png","56","0123"']
    data_key = "bucket/config/data/part1.csv.gz"
    fs.pipe(f"inv/{data_key}", gzip.compress(("\n".join(rows) + "\n").encode()))
    fs.pipe("inv/bucket/config/2026-11-22T00-00Z/manifest.json",
            _inventory_report("CSV", "Bucket, Key, Size, ETag", data_key))
    manifest = read_manifest("s3://inv/bucket/config/2026-11-22T00-00Z/manifest.json", storage_options=options)
    assert manifest.kind == "s3-inventory"
    assert manifest.home == "s3://bucket/"
    assert manifest.table.to_pylist() == [
        {"row_index": 0, "uri": "s3://bucket/photos/a b.jpg", "etag": "abc", "size_bytes": 123},
        {"row_index": 1, "uri": "s3://bucket/photos/c+d.jpg", "etag": "def", "size_bytes": 4},
        {"row_index": 2, "uri": "s3://bucket/photos/\u00e9t\u00e9.png", "etag": "0123", "size_bytes": 56},
    ]


def test_s3_inventory_parquet(s3):
    fs, options = s3
    fs.mkdir("bucket")
    fs.mkdir("inv")
    part = pa.table({"bucket": ["bucket", "bucket"], "key": ["photos/a b.jpg", "photos/100%25.jpg"],
                     "size": pa.array([123, 7], pa.int64()), "e_tag": ["abc", "def"]})
    buf = io.BytesIO()
    pq.write_table(part, buf)
    data_key = "bucket/config/data/part1.parquet"
    fs.pipe(f"inv/{data_key}", buf.getvalue())
    schema = ("message s3.inventory { required binary bucket (STRING); required binary key (STRING); "
              "optional int64 size; optional binary e_tag (STRING);}")
    fs.pipe("inv/bucket/config/2026-11-22T00-00Z/manifest.json", _inventory_report("Parquet", schema, data_key))
    manifest = read_manifest("s3://inv/bucket/config/2026-11-22T00-00Z/manifest.json", storage_options=options,
                             limit=5)
    assert manifest.kind == "s3-inventory"
    assert manifest.home == "s3://bucket/"
    assert manifest.table.to_pylist() == [
        {"row_index": 0, "uri": "s3://bucket/photos/a b.jpg", "etag": "abc", "size_bytes": 123},
        # Parquet inventory keys are not URL-encoded: '%25' is part of the key.
        {"row_index": 1, "uri": "s3://bucket/photos/100%25.jpg", "etag": "def", "size_bytes": 7},
    ]


def test_s3_inventory_all_versions_keeps_current_objects(s3):
    fs, options = s3
    fs.mkdir("inv")
    rows = ['"bucket","a.jpg","v2","true","false","10","e2"',
            '"bucket","a.jpg","v1","false","false","9","e1"',
            '"bucket","gone.jpg","v3","true","true","",""']
    data_key = "bucket/config/data/part1.csv.gz"
    fs.pipe(f"inv/{data_key}", gzip.compress(("\n".join(rows) + "\n").encode()))
    fs.pipe("inv/bucket/config/manifest.json",
            _inventory_report("CSV", "Bucket, Key, VersionId, IsLatest, IsDeleteMarker, Size, ETag", data_key))
    manifest = read_manifest("s3://inv/bucket/config/manifest.json", storage_options=options)
    assert manifest.table.select(["uri", "etag", "size_bytes"]).to_pylist() == [
        {"uri": "s3://bucket/a.jpg", "etag": "e2", "size_bytes": 10}]


def test_s3_inventory_with_missing_data_file_is_a_manifest_error(s3):
    fs, options = s3
    fs.mkdir("inv")
    fs.pipe("inv/cfg/manifest.json", _inventory_report("CSV", "Bucket, Key", "cfg/data/gone.csv.gz"))
    with pytest.raises(ManifestError, match="cannot read manifest s3://inv/cfg/manifest.json"):
        read_manifest("s3://inv/cfg/manifest.json", storage_options=options)
    fs.pipe("inv/bad/manifest.json", b"{not json")
    with pytest.raises(ManifestError, match="JSONDecodeError"):
        read_manifest("s3://inv/bad/manifest.json", storage_options=options)


def test_image_folder_with_json_sidecars_is_listed(tmp_path):
    (tmp_path / "IMG_1.jpg").write_bytes(b"x" * 5)
    (tmp_path / "IMG_1.jpg.json").write_text('{"title": "IMG_1.jpg"}')
    manifest = read_manifest(str(tmp_path))
    assert manifest.kind == "listing"
    assert manifest.table.column("uri").to_pylist() == [f"file://{tmp_path}/IMG_1.jpg"]


def test_s3_prefix_listing_streams_page_by_page(s3):
    """A listing of 2,100 objects comes a page (1,000 keys, one request) at a time, in key order."""
    from pipeline.batch.manifest import open_manifest

    fs, options = s3
    fs.mkdir("bucket")
    keys = [f"photos/{i:05d}.jpg" for i in range(2100)]
    fs.pipe({f"bucket/{k}": b"x" for k in keys})
    fs.pipe("bucket/photos/zz-notes.txt", b"not an image")
    reader = open_manifest("s3://bucket/photos/", storage_options=options)
    assert reader.kind == "listing"
    batches = next(iter(reader.parts()))
    first = next(batches)
    assert first.num_rows == 1000  # one page, before the rest of the listing was asked for
    rest = list(batches)
    uris = [u for b in (first, *rest) for u in b.column("uri").to_pylist()]
    assert [b.num_rows for b in rest] == [1000, 100]
    assert uris == [f"s3://bucket/{k}" for k in keys]

    # Whether a prefix holds manifest files is told from the same pages: one found past the first page of
    # images makes the prefix a folder of manifests.
    fs.pipe("bucket/photos/zz-manifest.csv", b"uri\nphotos/00001.jpg\n")
    fs.invalidate_cache()
    folder = open_manifest("s3://bucket/photos/", storage_options=options)
    assert folder.kind == "folder" and [p for p, _ in folder.files] == ["bucket/photos/zz-manifest.csv"]
    assert folder.files[0][1].startswith("etag:")  # the version a rerun compares


def test_local_listing_walks_in_path_order(tmp_path):
    from pipeline.batch.manifest import open_manifest

    names = ["a.jpg", "sub.jpg", "sub/c.jpg", "sub/deeper/d.jpg", "sub-2/e.jpg", "z.png"]
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    batches = list(next(iter(open_manifest(str(tmp_path)).parts())))
    uris = [u for b in batches for u in b.column("uri").to_pylist()]
    assert uris == [f"file://{tmp_path}/{n}" for n in sorted(names)]


# A presigned manifest URL is typed (and decompressed) by its path, not by the end of its query.


@pytest.mark.parametrize(("key", "kind"), [("m.parquet", "parquet"), ("m.jsonl", "jsonl"), ("m.csv.gz", "csv"),
                                           ("m.jsonl.gz", "jsonl")])
def test_presigned_manifest_url_is_read_by_its_path(s3, key, kind):
    import boto3
    from botocore.config import Config

    fs, options = s3
    fs.mkdir("lib")
    rows = [{"uri": f"s3://lib/img/{i}.jpg", "label": f"l{i}"} for i in range(3)]
    body = {"parquet": lambda: _parquet_bytes(pa.Table.from_pylist(rows)),
            "jsonl": lambda: "".join(json.dumps(r) + "\n" for r in rows).encode(),
            "csv": lambda: _csv(rows, ("uri", "label")).encode()}[kind]()
    fs.pipe(f"lib/{key}", gzip.compress(body) if key.endswith(".gz") else body)
    client = boto3.client("s3", endpoint_url=options["client_kwargs"]["endpoint_url"],
                          config=Config(signature_version="s3v4"), region_name="us-east-1")
    url = client.generate_presigned_url("get_object", Params={"Bucket": "lib", "Key": key}, ExpiresIn=3600)
    assert "?X-Amz-" in url and not url.endswith((".parquet", ".jsonl", ".gz"))
    manifest = read_manifest(url)
    assert manifest.kind == kind
    assert manifest.home == f"{options['client_kwargs']['endpoint_url']}/lib/"
    assert manifest.row_errors is None
    assert manifest.table.select(["uri", "label"]).to_pylist() == rows


def test_unreadable_presigned_manifest_error_keeps_its_signature_out(s3):
    import boto3
    from botocore.config import Config

    fs, options = s3
    fs.mkdir("lib")
    fs.pipe("lib/m.parquet", b"this is not parquet")
    client = boto3.client("s3", endpoint_url=options["client_kwargs"]["endpoint_url"],
                          config=Config(signature_version="s3v4"), region_name="us-east-1")
    url = client.generate_presigned_url("get_object", Params={"Bucket": "lib", "Key": "m.parquet"}, ExpiresIn=3600)
    signature = url.split("X-Amz-Signature=")[1].split("&")[0]
    with pytest.raises(ManifestError, match="cannot read manifest file") as info:
        read_manifest(url)
    assert signature not in str(info.value) and "X-Amz-Signature=***" in str(info.value)


def _parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


# Sizes: one value that is not a whole number of bytes is that row's error; the other rows are read.


def test_bad_size_in_csv_is_that_rows_error(tmp_path):
    sizes = ["10", "12kb", "", "-5", " 7 ", "1e3", "12.0", "1.5", "0x10", "99999999999999999999", "0"]
    (tmp_path / "m.csv").write_text("uri,size,label\n" + "".join(f"{i}.jpg,{s},l{i}\n" for i, s in enumerate(sizes)))
    manifest = read_manifest(str(tmp_path / "m.csv"))
    assert manifest.table.column("size_bytes").to_pylist() == [
        10, None, None, None, 7, 1000, 12, None, None, None, 0]
    assert manifest.table.column("label").to_pylist() == [f"l{i}" for i in range(len(sizes))]
    assert manifest.row_errors == [
        None, "size '12kb' is not a whole number of bytes", None, "size '-5' is negative", None, None, None,
        "size '1.5' is not a whole number of bytes", "size '0x10' is not a whole number of bytes",
        "size '99999999999999999999' is too large for a number of bytes", None]


@pytest.mark.parametrize("form", ["parquet-double", "parquet-string", "parquet-int", "parquet-uint", "jsonl"])
def test_size_columns_of_other_types_follow_the_same_rule(tmp_path, form):
    if form == "jsonl":
        values = [10, "12kb", 1.5, "20", 30.0, -1, None, True]
        (tmp_path / "m.jsonl").write_text("".join(json.dumps({"uri": f"{i}.jpg", "size_bytes": v}) + "\n"
                                                  for i, v in enumerate(values)))
        path = tmp_path / "m.jsonl"
        expected = [10, None, None, 20, 30, None, None, None]
        bad = {1: "size_bytes '12kb' is not a whole number of bytes",
               2: "size_bytes '1.5' is not a whole number of bytes", 5: "size_bytes '-1' is negative",
               7: "size_bytes 'true' is not a whole number of bytes"}
    else:
        values, kind, expected, bad = {
            "parquet-double": ([10.0, 1.5, float("nan"), None, 2.0**63, -3.0], pa.float64(),
                               [10, None, None, None, None, None],
                               {1: "size_bytes 1.5 is not a whole number of bytes",
                                2: "size_bytes nan is not a whole number of bytes",
                                4: "size_bytes 9.223372036854776e+18 is too large for a number of bytes",
                                5: "size_bytes -3.0 is negative"}),
            "parquet-string": (["10", "12kb", None, " ", "7"], pa.string(), [10, None, None, None, 7],
                               {1: "size_bytes '12kb' is not a whole number of bytes"}),
            "parquet-int": ([10, -4, None], pa.int32(), [10, None, None], {1: "size_bytes -4 is negative"}),
            "parquet-uint": ([10, 2**64 - 1], pa.uint64(), [10, None],
                             {1: f"size_bytes {2**64 - 1} is too large for a number of bytes"}),
        }[form]
        path = tmp_path / "m.parquet"
        pq.write_table(pa.table({"uri": [f"{i}.jpg" for i in range(len(values))],
                                 "size_bytes": pa.array(values, kind)}), path)
    manifest = read_manifest(str(path))
    assert manifest.table.schema.field("size_bytes").type == pa.int64()
    assert manifest.table.column("size_bytes").to_pylist() == expected
    assert manifest.row_errors == [bad.get(i) for i in range(len(values))]


def test_a_bad_size_is_one_error_row_of_the_plan(tmp_path):
    from pipeline.batch.allowlist import Allowlist
    from pipeline.batch.plan import make_plan

    (tmp_path / "m.csv").write_text("uri,size\n" + "".join(f"img/{i}.jpg,{1000 + i}\n" for i in range(5))
                                    + "img/x.jpg,12kb\n")
    reader = open_manifest(str(tmp_path / "m.csv"))
    plan = make_plan(reader, Allowlist((reader.home,)), _local_fs(), str(tmp_path / "out"), "m@1",
                     "2026-12-01", True, 1000)
    decided = plan.rows(scored=False).read_all().to_pylist()
    assert [(r["uri"], r["status"], r["error"]) for r in decided] == [
        (f"file://{tmp_path}/img/x.jpg", "error", "size '12kb' is not a whole number of bytes")]
    assert [r["size_bytes"] for r in plan.rows(scored=True).read_all().to_pylist()] == list(range(1000, 1005))


def _local_fs():
    import fsspec

    return fsspec.filesystem("file")


# JSON Lines: read block by block, as robustly as CSV.


def _jsonl_rows(n: int, late_from: int) -> list[dict]:
    """Rows whose optional ``album`` first appears at ``late_from`` and whose ``id`` turns from number to text."""
    rows = []
    for i in range(n):
        row = {"uri": f"photos/{i:08d}-a-longer-name-than-most.jpg", "id": i if i < late_from else f"x{i}"}
        if i >= late_from:
            row["album"] = "holiday"
        rows.append(row)
    return rows


@pytest.fixture(params=[None, 1 << 16], ids=["default blocks", "64 KiB blocks"])
def late_jsonl(request, tmp_path, monkeypatch) -> tuple[Path, list[dict]]:
    """40,000 lines (2.4 MB): past pyarrow's first block of 1 MB, whose types its stream reader would keep.

    With 64 KiB blocks the change falls between blocks, and the file comes in parts of growing columns.
    """
    if request.param:
        monkeypatch.setattr(manifest_module, "JSON_BLOCK_BYTES", request.param)
    rows = _jsonl_rows(40_000, late_from=30_000)
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path / "m.jsonl", rows


def test_jsonl_field_appearing_or_changing_type_late(tmp_path, late_jsonl):
    path, rows = late_jsonl
    manifest = read_manifest(str(path))
    table = manifest.table
    assert table.column_names == [*HEAD, "id", "album"]
    assert table.schema.field("id").type == pa.string()
    assert table.column("id").to_pylist() == [str(r["id"]) for r in rows]
    assert table.column("album").to_pylist() == [r.get("album") for r in rows]
    assert table.column("uri").to_pylist() == [f"file://{tmp_path}/{r['uri']}" for r in rows]
    assert table.column("row_index").to_pylist() == list(range(len(rows)))
    assert manifest.row_errors is None


def test_jsonl_late_field_through_the_planner(tmp_path, late_jsonl):
    from pipeline.batch.allowlist import Allowlist
    from pipeline.batch.output import output_schema
    from pipeline.batch.plan import make_plan

    path, rows = late_jsonl
    reader = open_manifest(str(path))
    plan = make_plan(reader, Allowlist((reader.home,)), _local_fs(), str(tmp_path / "out"), "m@1",
                     "2026-12-01", True, 100_000)
    assert output_schema(plan.extras).names[-2:] == ["id", "album"]
    got = plan.rows(scored=True).read_all().select(["row_index", "id", "album"]).to_pylist()
    assert got == [{"row_index": i, "id": str(r["id"]), "album": r.get("album")} for i, r in enumerate(rows)]


def test_jsonl_bad_lines_are_error_rows_in_place(tmp_path):
    lines = [json.dumps({"uri": "a.jpg", "n": 1}).encode(), b"{not json", json.dumps({"uri": "b.jpg"}).encode(),
             b"", b"[1, 2]", b'{"uri": "c\xff.jpg"}', b"   ", b'{"uri": "d.jpg", "n": "two"}',
             b'{"uri": "e.jpg", "nested": {"k": [1, 2.5]}, "flag": true, "f": 0.5}']
    (tmp_path / "m.jsonl").write_bytes(b"\r\n".join(lines) + b"\n")
    manifest = read_manifest(str(tmp_path / "m.jsonl"))
    table = manifest.table
    assert table.column("uri").to_pylist() == [
        f"file://{tmp_path}/a.jpg", None, f"file://{tmp_path}/b.jpg", None, f"file://{tmp_path}/c\ufffd.jpg",
        f"file://{tmp_path}/d.jpg", f"file://{tmp_path}/e.jpg"]
    assert table.column("n").to_pylist() == ["1", None, None, None, None, "two", None]
    assert table.column("nested").to_pylist()[-1] == '{"k": [1, 2.5]}'
    assert table.column("flag").to_pylist()[-1] is True
    assert table.column("f").to_pylist()[-1] == 0.5
    errors = manifest.row_errors
    assert errors[0] is None and errors[2] is None and errors[5] is None and errors[6] is None
    assert errors[1].startswith("malformed manifest line 2 (Expecting property name") and "'{not json'" in errors[1]
    assert errors[3] == "manifest line 5 is not a JSON object: '[1, 2]'"
    assert errors[4].startswith("manifest line 6 is not valid UTF-8")


def test_jsonl_malformed_line_is_one_error_row_of_the_plan(tmp_path):
    from pipeline.batch.allowlist import Allowlist
    from pipeline.batch.plan import make_plan

    (tmp_path / "m.jsonl").write_text("".join(json.dumps({"uri": f"img/{i}.jpg"}) + "\n" for i in range(5))
                                      + "{not json\n")
    reader = open_manifest(str(tmp_path / "m.jsonl"))
    plan = make_plan(reader, Allowlist((reader.home,)), _local_fs(), str(tmp_path / "out"), "m@1",
                     "2026-12-01", True, 1000)
    assert plan.manifest_rows == 6
    [decided] = plan.rows(scored=False).read_all().to_pylist()
    assert decided["status"] == "error" and decided["error"].startswith("malformed manifest line 6")
    assert plan.rows(scored=True).read_all().num_rows == 5


@pytest.mark.parametrize("through", ["read_manifest", "planner"])
def test_jsonl_field_whose_type_changes_between_blocks(tmp_path, monkeypatch, through):
    # A line or two per block: the field is read with each block's type, widened, then text, part by part.
    monkeypatch.setattr(manifest_module, "JSON_BLOCK_BYTES", 64)
    values = [1, 2, 2.5, None, "n/a", True, {"a": [1]}, 7]
    days = ["2024-01-01", "2024-01-02", "2024-01-03", "soon", None, "2024-01-06", "2024-01-07", "x"]
    rows = [{"uri": f"{i}.jpg", "v": v, "day": d, "n": i, "r": 2.5 if i == 2 else i}
            for i, (v, d) in enumerate(zip(values, days, strict=True))]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if through == "read_manifest":
        table = read_manifest(str(tmp_path / "m.jsonl")).table
    else:
        from pipeline.batch.allowlist import Allowlist
        from pipeline.batch.plan import make_plan

        reader = open_manifest(str(tmp_path / "m.jsonl"))
        plan = make_plan(reader, Allowlist((reader.home,)), _local_fs(), str(tmp_path / "out"), "m@1",
                         "2026-12-01", True, 1000)
        table = plan.rows(scored=True).read_all()
    assert table.column("v").to_pylist() == ["1", "2", "2.5", None, "n/a", "true", '{"a": [1]}', "7"]
    # Dates are Arrow's timestamps while the field holds only dates, then text: those read before are written
    # as Arrow writes a timestamp.
    assert table.column("day").to_pylist() == ["2024-01-01 00:00:00", "2024-01-02 00:00:00", "2024-01-03 00:00:00",
                                               "soon", None, "2024-01-06", "2024-01-07", "x"]
    assert table.column("n").to_pylist() == list(range(len(rows)))  # a field of one type keeps it
    assert pa.types.is_integer(table.schema.field("n").type)
    assert table.schema.field("r").type == pa.float64()  # integers, then a float: floats
    assert table.column("r").to_pylist() == [0.0, 1.0, 2.5, 3.0, 4.0, 5.0, 6.0, 7.0]


def test_jsonl_overlong_line_is_skipped_as_an_error_row(tmp_path, monkeypatch):
    monkeypatch.setattr(manifest_module, "JSON_BLOCK_BYTES", 64)
    monkeypatch.setattr(manifest_module, "MAX_LINE_BYTES", 1000)
    long = json.dumps({"uri": "long.jpg", "pad": "x" * 5000})
    lines = [json.dumps({"uri": "a.jpg"}), long, *(json.dumps({"uri": f"{i}.jpg"}) for i in range(20))]
    (tmp_path / "m.jsonl").write_text("\n".join(lines))
    manifest = read_manifest(str(tmp_path / "m.jsonl"))
    assert manifest.table.column("uri").to_pylist() == [
        f"file://{tmp_path}/a.jpg", None, *(f"file://{tmp_path}/{i}.jpg" for i in range(20))]
    assert manifest.row_errors == [
        None, "manifest line 2 is longer than 1,000 bytes: not a manifest row, skipped unread", *[None] * 20]


@pytest.mark.parametrize("block_bytes", [1, 2, 3, 5, 8, 13, 64])
def test_jsonl_blocks_keep_every_line_and_its_number(monkeypatch, block_bytes):
    monkeypatch.setattr(manifest_module, "JSON_BLOCK_BYTES", block_bytes)
    monkeypatch.setattr(manifest_module, "MAX_LINE_BYTES", 12)
    lines = [b"a", b"", b"bb" * 10, b"ccc", b"d" * 12, b"e" * 13, b"", b"f" * 30, b"g"]
    got = {}
    for first, data, long_line in manifest_module._line_blocks(io.BytesIO(b"\xef\xbb\xbf" + b"\n".join(lines))):
        if long_line:
            got[first] = None
            continue
        for number, line in enumerate(data.removesuffix(b"\n").split(b"\n"), first):
            assert number not in got
            got[number] = line
    assert sorted(got) == list(range(1, len(lines) + 1))
    for number, line in got.items():
        # A line is given whole, or (only when over the limit) skipped unread.
        assert line == lines[number - 1] or (line is None and len(lines[number - 1]) > 12)
    if block_bytes < 12:
        assert got[3] is None and got[8] is None


@pytest.mark.parametrize(("text", "message"), [
    (b"", "no JSON lines in it"), (b"\n  \n", "no JSON lines in it"),
    (b"uri,etag\na.jpg,e\n", "is not JSON Lines: malformed manifest line 1"),
    (b'{"path": "a.jpg"}\n', "has no 'uri' column"),
])
def test_a_file_that_is_no_jsonl_manifest_is_a_manifest_error(tmp_path, text, message):
    (tmp_path / "m.jsonl").write_bytes(text)
    with pytest.raises(ManifestError, match=message):
        read_manifest(str(tmp_path / "m.jsonl"))


# Manifest columns named like the job's own are carried under another name, never dropped or colliding.


def test_columns_named_like_the_jobs_own_are_renamed(tmp_path):
    (tmp_path / "m.csv").write_text("uri,row_index,read_retries,shard,__row_error__,manifest_row_index,album\n"
                                    "a.jpg,A-7,3,s1,not an error,m,x\n")
    manifest = read_manifest(str(tmp_path / "m.csv"))
    assert manifest.extra_columns == ["manifest_manifest_row_index", "manifest_read_retries", "manifest_shard",
                                      "manifest___row_error__", "manifest_row_index", "album"]
    assert manifest.table.to_pylist() == [{
        "row_index": 0, "uri": f"file://{tmp_path}/a.jpg", "etag": None, "size_bytes": None,
        "manifest_manifest_row_index": "A-7", "manifest_read_retries": "3", "manifest_shard": "s1",
        "manifest___row_error__": "not an error", "manifest_row_index": "m", "album": "x"}]
    assert manifest.row_errors is None


def test_columns_named_like_the_jobs_own_pass_the_stages(tmp_path):
    from pipeline.batch.allowlist import Allowlist
    from pipeline.batch.output import output_schema
    from pipeline.batch.plan import make_plan
    from pipeline.batch.stages import fetch_batch, prepare_batch

    (tmp_path / "m.csv").write_text("uri,row_index,read_retries,album\nmissing.jpg,A-7,3,x\n")
    reader = open_manifest(str(tmp_path / "m.csv"))
    allowlist = Allowlist((reader.home,))
    plan = make_plan(reader, allowlist, _local_fs(), str(tmp_path / "out"), "m@1", "2026-12-01", True, 1000)
    rows = plan.rows(scored=True).read_all()
    fetched = fetch_batch(rows, allowlist=allowlist)
    prepared = prepare_batch(fetched, config=None)  # no row to decode: the object is missing
    assert prepared.column("read_retries").to_pylist() == [0]
    assert prepared.select(["row_index", "status", "manifest_row_index", "manifest_read_retries"]).to_pylist() == [
        {"row_index": 0, "status": "error", "manifest_row_index": "A-7", "manifest_read_retries": "3"}]
    assert output_schema(plan.extras).names[-3:] == ["manifest_row_index", "manifest_read_retries", "album"]
