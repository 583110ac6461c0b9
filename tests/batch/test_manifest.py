import gzip
import hashlib
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.batch.manifest import ManifestError, read_manifest

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
