import pytest

from pipeline.batch.allowlist import Allowlist, RejectedURI, normalize_prefix, normalize_uri, redact_text, redact_uri


@pytest.mark.parametrize(("uri", "expected"), [
    ("s3://bucket/photos/a.jpg", "s3://bucket/photos/a.jpg"),
    ("S3://bucket/photos/a.jpg", "s3://bucket/photos/a.jpg"),
    ("s3a://bucket/photos/a.jpg", "s3://bucket/photos/a.jpg"),
    ("s3n://bucket/photos/a.jpg", "s3://bucket/photos/a.jpg"),
    ("/data/lib/a.jpg", "file:///data/lib/a.jpg"),
    ("file:///data/lib/a.jpg", "file:///data/lib/a.jpg"),
    ("file://localhost/data/lib/a.jpg", "file:///data/lib/a.jpg"),
    ("/data//lib///a.jpg", "file:///data/lib/a.jpg"),
    ("file:////data//lib//a.jpg", "file:///data/lib/a.jpg"),
    ("HTTPS://CDN.Example.com/x.jpg", "https://cdn.example.com/x.jpg"),
])
def test_normalize_uri(uri, expected):
    assert normalize_uri(uri) == expected


@pytest.mark.parametrize("uri", [
    "",
    "   ",
    "s3://bucket/../other/x.jpg",
    "s3://bucket/photos/%2e%2e/x.jpg",
    "s3://bucket/photos/%2E%2E/x.jpg",
    "s3://bucket/photos/..%2fother/x.jpg",
    "s3://bucket/photos/./x.jpg",
    "/data/lib/../../etc/passwd",
    "data/lib/a.jpg",
    "a.jpg",
    "file://otherhost/data/lib/a.jpg",
    "s3://bucket/photos/a.jpg\n",
    "s3://bucket/photos/a\x00.jpg",
    "s3://bucket/photos/a\x7f.jpg",
    "/data/lib/a\tb.jpg",
    "s3://bucket\\photos\\a.jpg",
    "c:/data/lib/a.jpg",
    "s3://bucket/photos/a.jpg?versionId=1",
    "s3://bucket/photos/a.jpg#x",
    "s3:///photos/a.jpg",
])
def test_normalize_uri_rejects(uri):
    with pytest.raises(RejectedURI):
        normalize_uri(uri)


def test_rejected_uri_is_a_value_error():
    assert issubclass(RejectedURI, ValueError)


@pytest.mark.parametrize(("prefix", "expected"), [
    ("s3://bucket", "s3://bucket/"),
    ("s3://bucket/", "s3://bucket/"),
    ("s3a://bucket/photos", "s3://bucket/photos/"),
    ("/data/lib", "file:///data/lib/"),
    ("/data/lib/", "file:///data/lib/"),
    ("/data//lib", "file:///data/lib/"),
    ("file:///data//lib", "file:///data/lib/"),
    ("/", "file:///"),
])
def test_normalize_prefix_always_ends_with_slash(prefix, expected):
    assert normalize_prefix(prefix) == expected


def test_relative_local_prefix_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert normalize_prefix("lib") == f"file://{tmp_path}/lib/"


def test_bucket_prefix_does_not_admit_a_sibling_bucket():
    allow = Allowlist(["s3://bucket"])
    assert allow.check("s3://bucket/x.jpg") == "s3://bucket/x.jpg"
    assert allow.check("s3://bucket/a/b/c.jpg") == "s3://bucket/a/b/c.jpg"
    with pytest.raises(RejectedURI, match="outside the allowed prefixes"):
        allow.check("s3://bucket2/x.jpg")
    with pytest.raises(RejectedURI):
        allow.check("s3://other/x.jpg")


def test_sub_prefix():
    allow = Allowlist(["s3://bucket/photos/"])
    assert allow.check("s3://bucket/photos/a/b.jpg") == "s3://bucket/photos/a/b.jpg"
    for uri in ("s3://bucket/other.jpg", "s3://bucket/photos2/a.jpg", "s3://bucket/photos"):
        with pytest.raises(RejectedURI):
            allow.check(uri)


@pytest.mark.parametrize("uri", [
    "s3://bucket/../other/x.jpg",
    "s3://bucket/photos/%2e%2e/x.jpg",
    "s3://bucket/photos/%2e%2e/%2e%2e/other/x.jpg",
    "s3://bucket/photos/..%2F..%2Fother/x.jpg",
])
def test_dot_segments_are_rejected_not_resolved(uri):
    allow = Allowlist(["s3://bucket/", "s3://other/"])
    with pytest.raises(RejectedURI, match=r"'\.' or '\.\.'"):
        allow.check(uri)


@pytest.mark.parametrize("uri", [
    "file:///etc/passwd",
    "/etc/passwd",
    "http://169.254.169.254/latest/meta-data/",
    "https://169.254.169.254/latest/meta-data/iam/",
    "gs://bucket/photos/a.jpg",
    "s3://user:pw@bucket/photos/a.jpg",
    "s3://bucket@evil/photos/a.jpg",
])
def test_other_schemes_and_hosts_rejected_when_only_s3_allowed(uri):
    allow = Allowlist(["s3://bucket/photos/"])
    with pytest.raises(RejectedURI):
        allow.check(uri)


def test_local_folder_prefix_given_as_plain_path():
    allow = Allowlist(["/data/lib"])
    assert allow.check("file:///data/lib/a.jpg") == "file:///data/lib/a.jpg"
    assert allow.check("/data/lib/sub/a.jpg") == "file:///data/lib/sub/a.jpg"
    for uri in ("/data/library2/a.jpg", "file:///data/library2/a.jpg", "/data/lib", "/data/a.jpg",
                "file:///etc/passwd", "s3://bucket/data/lib/a.jpg"):
        with pytest.raises(RejectedURI):
            allow.check(uri)


def test_duplicate_slashes_in_local_paths():
    allow = Allowlist(["/data//lib/"])
    assert allow.prefixes == ("file:///data/lib/",)
    assert allow.check("/data//lib//a.jpg") == "file:///data/lib/a.jpg"
    assert allow.check("file:////data///lib/a.jpg") == "file:///data/lib/a.jpg"
    with pytest.raises(RejectedURI):
        allow.check("//data//library2/a.jpg")


def test_relative_local_paths_rejected():
    allow = Allowlist(["/"])
    assert allow.check("/anything/a.jpg") == "file:///anything/a.jpg"
    for uri in ("a.jpg", "lib/a.jpg", "file:a.jpg", "local:lib/a.jpg"):
        with pytest.raises(RejectedURI, match="not absolute"):
            allow.check(uri)


@pytest.mark.parametrize("char", ["\x00", "\n", "\r", "\t", "\x1b", "\x7f"])
def test_control_characters_rejected(char):
    allow = Allowlist(["s3://bucket/", "/data/lib"])
    with pytest.raises(RejectedURI, match="control characters"):
        allow.check(f"s3://bucket/a{char}b.jpg")
    with pytest.raises(RejectedURI, match="control characters"):
        allow.check(f"/data/lib/a{char}b.jpg")


def test_s3a_alias_is_treated_as_s3():
    allow = Allowlist(["s3a://bucket/photos"])
    assert allow.prefixes == ("s3://bucket/photos/",)
    assert allow.check("s3://bucket/photos/a.jpg") == "s3://bucket/photos/a.jpg"
    assert allow.check("s3a://bucket/photos/a.jpg") == "s3://bucket/photos/a.jpg"
    with pytest.raises(RejectedURI):
        allow.check("s3a://bucket2/photos/a.jpg")


def test_several_prefixes_are_deduplicated_and_each_admits():
    allow = Allowlist(["s3://a", "s3://a/", "/data/lib", "file:///data/lib/"])
    assert allow.prefixes == ("file:///data/lib/", "s3://a/")
    assert allow.check("s3://a/x.jpg") == "s3://a/x.jpg"
    assert allow.check("/data/lib/x.jpg") == "file:///data/lib/x.jpg"
    with pytest.raises(RejectedURI):
        allow.check("s3://b/x.jpg")


@pytest.mark.parametrize("prefixes", [[], (), iter([])])
def test_empty_allowlist_raises(prefixes):
    with pytest.raises(ValueError, match="at least one"):
        Allowlist(prefixes)


def test_bad_prefix_is_refused_at_construction():
    with pytest.raises(RejectedURI):
        Allowlist(["s3://bucket/../other"])


def test_redact_uri_hides_credentials():
    redacted = redact_uri("s3://user:secret@bucket/k")
    assert "secret" not in redacted
    assert "user" not in redacted
    assert redacted == "s3://***@bucket/k"
    assert redact_uri("https://u:p%40ss@host.example/a.jpg") == "https://***@host.example/a.jpg"


@pytest.mark.parametrize("uri", [
    "s3://bucket/photos/a.jpg::http://169.254.169.254/latest/meta-data/",
    "simplecache::s3://bucket/photos/a.jpg",
    "/data/lib/a.jpg::https://elsewhere.example/x",
])
def test_fsspec_url_chaining_is_refused(uri):
    allow = Allowlist(["s3://bucket/", "/data/lib"])
    with pytest.raises(RejectedURI):
        allow.check(uri)


@pytest.mark.parametrize(("uri", "secret"), [
    ("https://bucket.s3.amazonaws.com/m.csv?X-Amz-Algorithm=AWS4&X-Amz-Credential=AKIAEXAMPLE%2F2026"
     "&X-Amz-Signature=5f1e2d3c&X-Amz-Security-Token=FwoGZXIvYXdz", ("AKIAEXAMPLE", "5f1e2d3c", "FwoGZXIvYXdz")),
    ("https://storage.googleapis.com/b/m.csv?X-Goog-Signature=0badc0de&X-Goog-Credential=sa%40p", ("0badc0de",)),
    ("https://acct.blob.core.windows.net/c/m.csv?sv=2024-01-01&sig=AzureSAS%3D&se=2026", ("AzureSAS",)),
])
def test_redact_uri_hides_signed_url_query_values(uri, secret):
    redacted = redact_uri(uri)
    assert not any(s in redacted for s in secret), redacted
    assert redacted.split("?")[0] == uri.split("?")[0] and "=***" in redacted
    assert not any(s in redact_text(f"GET {uri} failed: 403") for s in secret)


def test_a_refused_row_keeps_its_uri_without_the_secrets_it_carries():
    """Manifest rows with a signature or a password are refused, and neither the row's uri nor its error (both
    written to the output) holds the secret."""
    import pyarrow as pa

    allow = Allowlist(["https://photos.example.com/", "s3://bucket/"])
    rows = ["https://photos.example.com/a.jpg?X-Amz-Credential=AKIDEXAMPLE&X-Amz-Signature=topsecret",
            "https://user:hunter2@photos.example.com/b.jpg", "https://user:hunter2@elsewhere.example.com/c.jpg",
            "https://photos.example.com/../d.jpg?sig=AzureSAS", "s3://bucket/e.jpg"]
    uris, errors = allow.check_array(pa.array(rows))
    assert uris.to_pylist() == [
        "https://photos.example.com/a.jpg?X-Amz-Credential=***&X-Amz-Signature=***",
        "https://***@photos.example.com/b.jpg", "https://***@elsewhere.example.com/c.jpg",
        "https://photos.example.com/../d.jpg?sig=***", "s3://bucket/e.jpg"]
    assert [e.split(":")[0] for e in errors.to_pylist()[:4]] == [
        "URI has a query or fragment", "URI has a user or password before its host",
        "URI has a user or password before its host", "URI has a query or fragment"]
    assert errors[4].as_py() is None
    written = " ".join(uris.to_pylist() + errors.to_pylist()[:4])
    assert not any(secret in written for secret in ("AKIDEXAMPLE", "topsecret", "hunter2", "AzureSAS"))


@pytest.mark.parametrize("uri", ["s3://bucket/k", "s3://bucket/a@b.jpg", "file:///data/lib/a.jpg", "/data/x.jpg"])
def test_redact_uri_leaves_uris_without_credentials_alone(uri):
    assert redact_uri(uri) == uri


# Every URI the tests above name, plus canonical ones on both sides of the prefixes and near misses.
BULK_URIS = [
    "s3://bucket/photos/a.jpg", "S3://bucket/photos/a.jpg", "s3a://bucket/photos/a.jpg", "s3://bucket2/x.jpg",
    "s3://bucket/photos/./x.jpg", "s3://bucket/photos/..", "s3://bucket/photos/.hidden/a.jpg",
    "s3://bucket/photos/a..b.jpg", "s3://bucket/photos/%2e%2e/x.jpg", "s3://bucket/photos/..%2fother/x.jpg",
    "s3://bucket/photos/a.jpg?versionId=1", "s3://bucket/photos/a.jpg#x", "s3:///photos/a.jpg",
    "s3://user:pw@bucket/photos/a.jpg", "s3://bucket\\photos\\a.jpg", "s3://bucket/photos/a\x00.jpg",
    "s3://bucket/photos/a.jpg\n", "s3://bucket/photos/caf\u00e9 au lait.jpg", "file:///data/lib/a.jpg",
    "file:///data/lib//a.jpg", "file:////data/lib/a.jpg", "file://localhost/data/lib/a.jpg",
    "file://otherhost/data/lib/a.jpg", "file:///data/library/a.jpg", "file:///data/lib/../../etc/passwd",
    "/data/lib/a.jpg", "data/lib/a.jpg", "c:/data/lib/a.jpg", "gs://bucket/photos/a.jpg",
    "https://CDN.example.com/x.jpg", "http://169.254.169.254/latest/meta-data/", "", "   ", None,
    "s3://bucket/photos/a.jpg::http://169.254.169.254/x", "s3://bucket/photos/simplecache::s3://other/x.jpg",
]


def test_bulk_check_gives_the_same_answers_as_one_by_one():
    """The job checks a manifest's URIs a batch at a time with Arrow's regex engine; nothing may differ."""
    import pyarrow as pa

    allow = Allowlist(["s3://bucket/photos/", "/data/lib", "gs://bucket/"])
    normalized, errors = allow.check_array(pa.array(BULK_URIS, pa.string()))
    expected = []
    for uri in BULK_URIS:
        try:
            expected.append((allow.check(uri), None))
        except RejectedURI as exc:
            expected.append((redact_uri(uri) if uri else "", str(exc)))  # a refused row's URI, less its secrets
    assert list(zip(normalized.to_pylist(), errors.to_pylist(), strict=True)) == expected
    allowed = {n for n, e in expected if e is None}
    assert any(n.startswith("s3://") for n in allowed) and any(n.startswith("file://") for n in allowed)
    assert any(n.startswith("gs://") for n in allowed) and len(allowed) < len(BULK_URIS) - 10
