"""Which URIs a job may read: every manifest URI is checked here before any request is made.

A manifest is user data, and a nightly job runs with broad storage credentials, so a row must not be able to
make the job read another bucket, the worker's own files (``file:///etc/passwd``), or an HTTP address such as
the cloud metadata service. URIs are compared after normalisation; any ``.`` or ``..`` path segment, also in
percent-encoded form, is refused outright rather than resolved.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from urllib.parse import unquote, urlsplit

# Schemes fsspec treats as the same store.
_SCHEME_ALIASES = {"s3a": "s3", "s3n": "s3", "gcs": "gs", "local": "file", "": "file"}
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


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
        raise RejectedURI(f"URI has control characters or backslashes: {uri!r}")
    parts = urlsplit(uri)
    scheme = _SCHEME_ALIASES.get(parts.scheme.lower(), parts.scheme.lower())
    if len(parts.scheme) == 1:  # a Windows drive letter, not a scheme
        raise RejectedURI(f"unsupported URI: {uri!r}")
    if parts.query or parts.fragment:
        raise RejectedURI(f"URI has a query or fragment: {uri!r}")
    path = parts.path
    segments = unquote(path).split("/")
    if any(s in (".", "..") for s in segments):
        raise RejectedURI(f"URI has '.' or '..' path segments: {uri!r}")
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise RejectedURI(f"file URI names a host: {uri!r}")
        if not path.startswith("/"):
            raise RejectedURI(f"local path is not absolute: {uri!r}")
        return "file://" + re.sub("/+", "/", path)
    if not parts.netloc:
        raise RejectedURI(f"URI has no bucket or host: {uri!r}")
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

    def check(self, uri: str) -> str:
        """Return the normalised URI if it lies under an allowed prefix.

        Raises:
            RejectedURI: It does not, or it is not a plain object address.
        """
        normalized = normalize_uri(uri)
        if not any(normalized.startswith(p) for p in self.prefixes):
            raise RejectedURI(f"{uri} is outside the allowed prefixes ({', '.join(self.prefixes)})")
        return normalized

    def __repr__(self) -> str:
        return f"Allowlist({list(self.prefixes)!r})"


def redact_uri(uri: str) -> str:
    """The URI with any ``user:password@`` part removed, for logs and summaries."""
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    return parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]).geturl()
