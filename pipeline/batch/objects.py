"""Reading one object (an image, a thumbnail, a training image): allowed, bounded, retried.

Every object the product reads for a row goes through ``read_object``: the nightly job's fetch stage, ``dgiqa
score``, training and evaluation, and the report's thumbnails. So one set of rules holds everywhere:

- the URI must pass an ``Allowlist`` (no ``..``, no ``::`` chaining, no query) before any request is made;
- a local path is resolved first, and a symlink that leads out of the allowed folders is refused;
- an HTTP(S) redirect is refused, not followed: the next hop could be anywhere (the metadata service);
- an object larger than ``max_bytes`` is refused before reading where its size is known (a manifest's
  ``size_bytes``, the store's metadata, ``Content-Length``) and never read beyond ``max_bytes + 1`` otherwise;
- transient storage errors (throttling, 5xx, resets) are retried with backoff; others fail at once.

Objects are opened through their own file system, never through ``fsspec.open`` on the raw string, so fsspec's
URL chaining (``simplecache::s3://...``) can never be reached from a URI in the data.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping

import fsspec

from pipeline.batch.allowlist import Allowlist, RejectedURI, redact_uri
from pipeline.limits import DEFAULT_MAX_BYTES

logger = logging.getLogger(__name__)

_HTTP_TIMEOUT_S = 60


class ObjectTooLarge(ValueError):
    """An object over the byte limit; it was not read (or not read past the limit)."""

    def __init__(self, uri: str, size: int | None, max_bytes: int):
        size_text = f"{size} bytes" if size is not None else f"more than {max_bytes} bytes"
        super().__init__(f"{redact_uri(uri)} is {size_text}, over the limit of {max_bytes} bytes (--max-bytes)")


_TRANSIENT_WORDS = ("slowdown", "slow down", "throttl", "unavailable", "internalerror", "internal error",
                    "timeout", "timed out", "connection", "disconnect", "reset by peer", "broken pipe",
                    "remote end closed", "(503)", "(500)", "(502)", "(504)", " 503", " 500", " 502", " 504")
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, RejectedURI, ObjectTooLarge)
# s3fs reports 503 / SlowDown as EBUSY; the others are the network's own transient errors.
_TRANSIENT_ERRNOS = {errno.EBUSY, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED,
                     errno.EAGAIN, errno.EPIPE, errno.ENETUNREACH, errno.EHOSTUNREACH}


def is_transient(exc: BaseException) -> bool:
    """Whether a storage error is worth retrying: throttling, 5xx, timeouts, dropped connections."""
    if isinstance(exc, _PERMANENT):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS:
        return True
    text = f"{type(exc).__name__} {exc}".lower()
    return any(word in text for word in _TRANSIENT_WORDS)


def read_object(uri: str, storage_options: Mapping | None = None, *, allowlist: Allowlist,
                max_bytes: int = DEFAULT_MAX_BYTES, known_size: int | None = None, attempts: int = 4,
                backoff_s: float = 0.5, on_retry: Callable[[BaseException], None] | None = None) -> bytes:
    """Read one object under the rules of this module, retrying transient errors with backoff and jitter.

    Args:
        uri: The object's URI or local path.
        storage_options: fsspec options of the object's file system (``headers`` only, for HTTP).
        allowlist: Where reads may go; checked before any request, and again after resolving a local path.
        max_bytes: The byte limit.
        known_size: The size the caller already knows (a manifest's ``size_bytes``); over the limit, no request.
        attempts: Tries for transient errors.
        backoff_s: The first retry's mean delay; each later one doubles it.
        on_retry: Gets each transient error before its retry, so the job can count what it recovered from.

    Raises:
        RejectedURI: Not allowed (outside the prefixes, a symlink out of them, a redirect); no request was made
            to an address outside the allowlist.
        ObjectTooLarge: Over ``max_bytes``.
        OSError: The last storage error, once ``attempts`` are used up or at once for a permanent one.
    """
    target = allowlist.check(uri)
    if known_size is not None and known_size > max_bytes:
        raise ObjectTooLarge(uri, known_size, max_bytes)
    for attempt in range(1, attempts + 1):
        try:
            return _read_once(target, storage_options or {}, allowlist, max_bytes)
        except Exception as exc:
            if attempt == attempts or not is_transient(exc):
                if attempt > 1:
                    exc.add_note(f"after {attempt} attempts")
                raise
            delay = backoff_s * 2 ** (attempt - 1) * (0.5 + random.random())
            logger.warning("transient error reading %s (attempt %d/%d), retrying in %.1fs: %s", redact_uri(uri),
                           attempt, attempts, delay, exc)
            if on_retry is not None:
                on_retry(exc)
            time.sleep(delay)
    raise AssertionError("unreachable")


def _read_once(target: str, storage_options: Mapping, allowlist: Allowlist, max_bytes: int) -> bytes:
    scheme = target.split("://", 1)[0]
    if scheme == "file":
        return _read_local(target, allowlist, max_bytes)
    if scheme in ("http", "https"):
        return _read_http(target, storage_options, max_bytes)
    fs = fsspec.filesystem(scheme, **storage_options)
    with fs.open(fs._strip_protocol(target), "rb") as f:
        size = getattr(f, "size", None)
        if size is not None and size > max_bytes:
            raise ObjectTooLarge(target, size, max_bytes)
        return _bounded_read(f, target, max_bytes)


def _read_local(target: str, allowlist: Allowlist, max_bytes: int) -> bytes:
    path = target[len("file://"):]
    resolved = os.path.realpath(path)
    if resolved != path and not allowlist.allows_resolved("file://" + resolved):
        raise RejectedURI(f"{target} is a link that leads outside the allowed prefixes")
    with open(resolved, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > max_bytes:
            raise ObjectTooLarge(target, size, max_bytes)
        return _bounded_read(f, target, max_bytes)


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        raise RejectedURI(f"{redact_uri(req.full_url)} answered with a redirect (HTTP {code}); redirects are "
                          "not followed")


_HTTP = urllib.request.build_opener(_RefuseRedirects)


def _read_http(target: str, storage_options: Mapping, max_bytes: int) -> bytes:
    request = urllib.request.Request(target, headers=dict(storage_options.get("headers") or {}))
    try:
        with _HTTP.open(request, timeout=_HTTP_TIMEOUT_S) as response:
            length = response.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) > max_bytes:
                raise ObjectTooLarge(target, int(length), max_bytes)
            return _bounded_read(response, target, max_bytes)
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            raise FileNotFoundError(errno.ENOENT, "no such object", redact_uri(target)) from None
        if exc.code in (401, 403):
            raise PermissionError(errno.EACCES, f"HTTP {exc.code}", redact_uri(target)) from None
        raise OSError(f"HTTP error {exc.code} from {redact_uri(target)}") from None


def _bounded_read(f, target: str, max_bytes: int) -> bytes:
    data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ObjectTooLarge(target, None, max_bytes)
    return data
