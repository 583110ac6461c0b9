"""Which URIs a job may read: every manifest URI is checked here before any request is made.

A manifest is user data, and a nightly job runs with broad storage credentials, so a row must not be able to
make the job read another bucket, the worker's own files (``file:///etc/passwd``), or an HTTP address such as
the cloud metadata service. URIs are compared after normalisation; any ``.`` or ``..`` path segment, also in
percent-encoded form, is refused outright rather than resolved, and so is ``::`` (fsspec's URL chaining, which
would let ``s3://allowed/x::http://elsewhere`` open a second file system).

Secrets never reach a log, a summary or an error row: ``redact_uri`` and ``redact_text`` replace passwords in
``user:password@`` and every query value (presigned S3 and GCS URLs, Azure SAS tokens) with ``***``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

if TYPE_CHECKING:
    import pyarrow as pa

# Schemes fsspec treats as the same store.
_SCHEME_ALIASES = {"s3a": "s3", "s3n": "s3", "gcs": "gs", "local": "file", "": "file"}
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# URIs already in the form ``normalize_uri`` gives, decided in bulk by Arrow's regex engine: a canonical scheme,
# a bucket, no character that needs decoding or refusing, no dot segment, no empty segment in a local path.
# Anything else goes through ``normalize_uri`` one by one, so both paths give the same answers.
_PLAIN = r"[^%\\?#\x00-\x1f\x7f]"
_CANONICAL = (rf"^(?:(?:s3|gs|az|abfs|abfss|hdfs|memory)://[^/%\\?#@\x00-\x1f\x7f]+(?:/{_PLAIN}*)?"
              rf"|file:///(?:[^/%\\?#\x00-\x1f\x7f]+/?)*)$")
_DOT_SEGMENT = r"/\.\.?(?:/|$)"


class RejectedURI(ValueError):
    """A URI outside the allowed prefixes, or not a plain object address."""


def normalize_uri(uri: str) -> str:
    """Canonical ``scheme://bucket/key`` (or ``file:///abs/path``) form of a URI, for prefix comparison.

    Raises:
        RejectedURI: The URI has control characters, dot segments, or a relative local path.
    """
    if not isinstance(uri, str) or not uri.strip():
        raise RejectedURI("empty URI")
    if _CONTROL.search(uri) or "\\" in uri:
        raise RejectedURI(f"URI has control characters or backslashes: {redact_uri(uri)!r}")
    if "::" in uri:
        raise RejectedURI(f"URI chains file systems with '::': {redact_uri(uri)}")
    parts = urlsplit(uri)
    scheme = _SCHEME_ALIASES.get(parts.scheme.lower(), parts.scheme.lower())
    if len(parts.scheme) == 1:  # a Windows drive letter, not a scheme
        raise RejectedURI(f"unsupported URI: {redact_uri(uri)!r}")
    if parts.query or parts.fragment:
        raise RejectedURI(f"URI has a query or fragment: {redact_uri(uri)!r}")
    if "@" in parts.netloc:  # a plain object address carries no credentials; the job's own are used
        raise RejectedURI(f"URI has a user or password before its host: {redact_uri(uri)!r}")
    path = parts.path
    segments = unquote(path).split("/")
    if any(s in (".", "..") for s in segments):
        raise RejectedURI(f"URI has '.' or '..' path segments: {redact_uri(uri)!r}")
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise RejectedURI(f"file URI names a host: {redact_uri(uri)!r}")
        if not path.startswith("/"):
            raise RejectedURI(f"local path is not absolute: {redact_uri(uri)!r}")
        return "file://" + re.sub("/+", "/", path)
    if not parts.netloc:
        raise RejectedURI(f"URI has no bucket or host: {redact_uri(uri)!r}")
    return f"{scheme}://{parts.netloc.lower() if scheme in ('http', 'https') else parts.netloc}{path}"


def normalize_prefix(prefix: str) -> str:
    """Normalise an allowed prefix; it always ends with ``/`` so ``s3://bucket`` never admits ``s3://bucket2``."""
    if "://" not in prefix:
        prefix = os.path.abspath(os.path.expanduser(prefix))
    normalized = normalize_uri(prefix)
    return normalized if normalized.endswith("/") else normalized + "/"


class Allowlist:
    """A set of allowed prefixes.

    Args:
        prefixes: URIs (``s3://bucket/photos/``, ``/data/library``, ``file:///data``); at least one.
    """

    def __init__(self, prefixes: Iterable[str]):
        self.prefixes = tuple(sorted({normalize_prefix(p) for p in prefixes}))
        if not self.prefixes:
            raise ValueError("at least one allowed prefix is needed")

    def allows_resolved(self, uri: str) -> bool:
        """Whether a resolved local URI (symlinks followed) lies under an allowed prefix, itself resolved.

        An allowed folder reached through a symlink (``/data`` -> ``/mnt/disk1/data``) still admits its files;
        a symlink inside it that points elsewhere does not.
        """
        resolved = tuple(p if not p.startswith("file://") else
                         "file://" + os.path.join(os.path.realpath(p[len("file://"):]), "")
                         for p in self.prefixes)
        return any(uri.startswith(p) for p in resolved + self.prefixes)

    def check(self, uri: str) -> str:
        """Return the normalised URI if it lies under an allowed prefix.

        Raises:
            RejectedURI: It does not, or it is not a plain object address.
        """
        normalized = normalize_uri(uri)
        if not any(normalized.startswith(p) for p in self.prefixes):
            raise RejectedURI(f"{redact_uri(uri)} is outside the allowed prefixes ({', '.join(self.prefixes)})")
        return normalized

    def check_array(self, uris: pa.Array) -> tuple[pa.Array, pa.Array]:
        """``check`` over a column of URIs: the normalised URIs (the given one, redacted, if refused) and the errors.

        Canonical URIs (nearly all of a real manifest) are decided by Arrow compute in bulk; the others go
        through ``check`` one by one.
        """
        import pyarrow as pa  # here, not at the top: argument parsers import this module before any data
        import pyarrow.compute as pc

        uris = uris.cast(pa.string())
        canonical = pc.and_(pc.fill_null(pc.match_substring_regex(uris, _CANONICAL), False),
                            pc.invert(pc.fill_null(pc.match_substring_regex(uris, _DOT_SEGMENT), True)))
        canonical = pc.and_(canonical, pc.invert(pc.fill_null(pc.match_substring(uris, "::"), True)))
        allowed = pa.array([False] * len(uris)) if not len(self.prefixes) else None
        for prefix in self.prefixes:
            under = pc.fill_null(pc.starts_with(uris, prefix), False)
            allowed = under if allowed is None else pc.or_(allowed, under)
        outside = f" is outside the allowed prefixes ({', '.join(self.prefixes)})"
        errors = pc.if_else(allowed, pa.scalar(None, pa.string()),
                            pc.binary_join_element_wise(uris, outside, ""))
        normalized = pc.fill_null(uris, "")
        unusual = pc.invert(canonical)
        if pc.any(unusual).as_py():
            slow_rows = pc.indices_nonzero(unusual).to_pylist()
            fixed_uris, fixed_errors = normalized.to_pylist(), errors.to_pylist()
            raw = uris.to_pylist()
            for i in slow_rows:
                try:
                    fixed_uris[i], fixed_errors[i] = self.check(raw[i]), None
                except RejectedURI as exc:  # the row keeps its URI, less any secret it carries
                    fixed_uris[i], fixed_errors[i] = redact_uri(raw[i]) if raw[i] else "", str(exc)
            normalized, errors = pa.array(fixed_uris, pa.string()), pa.array(fixed_errors, pa.string())
        return normalized, errors

    def __repr__(self) -> str:
        return f"Allowlist({list(self.prefixes)!r})"


_URI_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")


def redact_uri(uri: str) -> str:
    """The URI without secrets, for logs, summaries and error rows.

    ``user:password@`` becomes ``***@`` and every query value becomes ``***`` (names are kept, so a reader
    still sees that a URL was presigned: ``X-Amz-Signature=***``).
    """
    try:
        parts = urlsplit(uri)
    except ValueError:
        return "<unparseable URI>"
    if "@" in parts.netloc:
        parts = parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1])
    if parts.query:
        query = "&".join(p.split("=", 1)[0] + "=***" if p else p for p in parts.query.split("&"))
        parts = parts._replace(query=query)
    return parts.geturl()


def redact_text(text: str) -> str:
    """``text`` with every URI in it passed through ``redact_uri`` (error messages of storage libraries)."""
    return _URI_IN_TEXT.sub(lambda m: redact_uri(m.group(0)), text)


def error_line(exc: BaseException) -> str:
    """A user's error as one redacted line; an ``OSError`` as the path and what went wrong, without ``[Errno N]``.

    Our own errors (``ValueError``) already name the flag, the URI and the fix; an ``OSError`` that escapes them
    (a disk filling up mid-write, a file removed under the command) carries errno decoration users need not read.
    """
    if isinstance(exc, OSError) and exc.strerror:
        where = f"{redact_uri(str(exc.filename))}: " if exc.filename else ""
        text = f"{where}{exc.strerror.lower()}"
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(redact_text(text).split())
