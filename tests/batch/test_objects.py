"""``read_object``: nothing outside the allowlist is requested, nothing over the byte limit is read whole."""

import http.server
import os
import threading

import pytest

from pipeline.batch.allowlist import Allowlist, RejectedURI
from pipeline.batch.objects import ObjectTooLarge, is_transient, read_object


class _Recorder(http.server.BaseHTTPRequestHandler):
    """Serves ``routes`` (path -> (status, headers, body)) and records every request path it gets."""

    routes: dict = {}
    seen: list = []

    def do_GET(self):  # noqa: N802 - http.server's naming
        type(self).seen.append(self.path)
        status, headers, body = self.routes.get(self.path, (404, {}, b"missing"))
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        if "Content-Length" not in headers and "Transfer-Encoding" not in headers:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if headers.get("Transfer-Encoding") == "chunked":
            for i in range(0, len(body), 1000):
                chunk = body[i:i + 1000]
                self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
        else:
            self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture()
def http_server():
    """Two servers on 127.0.0.1: ``allowed`` (its prefix may be read) and ``elsewhere`` (must never be asked)."""
    servers = {}
    for name in ("allowed", "elsewhere"):
        handler = type(name, (_Recorder,), {"routes": {}, "seen": []})
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers[name] = (f"http://127.0.0.1:{server.server_port}", handler, server)
    yield {name: (url, handler) for name, (url, handler, _) in servers.items()}
    for _, _, server in servers.values():
        server.shutdown()
        server.server_close()


def test_a_symlink_leaving_the_allowed_folder_is_refused_unread(tmp_path):
    allowed, secret = tmp_path / "allowed", tmp_path / "secret"
    allowed.mkdir(), secret.mkdir()
    (secret / "key.jpg").write_bytes(b"secret bytes")
    (allowed / "inside.jpg").write_bytes(b"fine")
    os.symlink(secret / "key.jpg", allowed / "escape.jpg")
    os.symlink(allowed / "inside.jpg", allowed / "alias.jpg")
    allow = Allowlist([str(allowed)])
    with pytest.raises(RejectedURI, match="link that leads outside the allowed prefixes") as caught:
        read_object(str(allowed / "escape.jpg"), allowlist=allow)
    assert "secret bytes" not in str(caught.value)
    assert read_object(str(allowed / "alias.jpg"), allowlist=allow) == b"fine"  # a link that stays inside is read


def test_an_allowed_folder_reached_through_a_link_still_admits_its_files(tmp_path):
    (tmp_path / "disk").mkdir()
    (tmp_path / "disk" / "a.jpg").write_bytes(b"image")
    os.symlink(tmp_path / "disk", tmp_path / "library")
    assert read_object(str(tmp_path / "library" / "a.jpg"), allowlist=Allowlist([str(tmp_path / "library")])) \
        == b"image"


@pytest.mark.parametrize("uri", ["{root}/a.jpg::http://127.0.0.1:9/x", "{root}/../etc/passwd",
                                 "file:///etc/passwd", "{root}/a.jpg?x=1"])
def test_chaining_dot_segments_and_outside_paths_are_refused(tmp_path, uri):
    (tmp_path / "a.jpg").write_bytes(b"image")
    with pytest.raises(RejectedURI):
        read_object(uri.format(root=tmp_path), allowlist=Allowlist([str(tmp_path)]))


def test_the_byte_limit_holds_for_known_and_unknown_sizes(tmp_path):
    path = tmp_path / "big.jpg"
    path.write_bytes(b"x" * 5000)
    allow = Allowlist([str(tmp_path)])
    with pytest.raises(ObjectTooLarge, match=r"is 5000 bytes, over the limit of 4999 bytes \(--max-bytes\)"):
        read_object(str(path), allowlist=allow, max_bytes=4999)
    assert len(read_object(str(path), allowlist=allow, max_bytes=5000)) == 5000
    # A size the manifest states is refused without touching storage: this object does not even exist.
    with pytest.raises(ObjectTooLarge, match="is 10000 bytes"):
        read_object(str(tmp_path / "absent.jpg"), allowlist=allow, max_bytes=5000, known_size=10_000)
    assert not is_transient(ObjectTooLarge("x", 1, 0)) and not is_transient(RejectedURI("connection"))


def test_http_redirects_are_refused_and_the_target_never_asked(http_server):
    allowed, handler = http_server["allowed"]
    elsewhere, other = http_server["elsewhere"]
    handler.routes["/photos/a.jpg"] = (200, {}, b"image bytes")
    handler.routes["/photos/moved.jpg"] = (302, {"Location": f"{elsewhere}/latest/meta-data?token=SECRET"}, b"")
    allow = Allowlist([f"{allowed}/photos/"])
    assert read_object(f"{allowed}/photos/a.jpg", allowlist=allow) == b"image bytes"
    with pytest.raises(RejectedURI, match=r"redirect \(HTTP 302\); redirects are not followed") as caught:
        read_object(f"{allowed}/photos/moved.jpg", allowlist=allow)
    assert "SECRET" not in str(caught.value)
    with pytest.raises(RejectedURI, match="outside the allowed prefixes"):
        read_object(f"{elsewhere}/latest/meta-data", allowlist=allow)
    with pytest.raises(FileNotFoundError):
        read_object(f"{allowed}/photos/none.jpg", allowlist=allow)
    assert handler.seen == ["/photos/a.jpg", "/photos/moved.jpg", "/photos/none.jpg"]
    assert other.seen == []


@pytest.mark.parametrize("chunked", [False, True])
def test_http_objects_over_the_limit_are_not_read_whole(http_server, chunked):
    allowed, handler = http_server["allowed"]
    headers = {"Transfer-Encoding": "chunked"} if chunked else {}
    handler.routes["/big.jpg"] = (200, headers, b"y" * 50_000)
    expected = "more than 10000 bytes" if chunked else "is 50000 bytes"
    with pytest.raises(ObjectTooLarge, match=expected):
        read_object(f"{allowed}/big.jpg", allowlist=Allowlist([allowed]), max_bytes=10_000)
