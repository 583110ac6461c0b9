"""A small HTTP proxy in front of the test S3 server that injects faults: 503s, throttling, dropped connections.

It listens on 127.0.0.1 only, forwards everything else unchanged, and records every request path, so tests can
also prove that some objects were never requested.
"""

from __future__ import annotations

import http.client
import threading
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

# A fault policy gets (method, path, how many times this method+path was seen before) and returns
# None (forward), "503", "throttle" or "reset".
Policy = Callable[[str, str, int], str | None]


def s3fs_retries_off() -> None:
    """Make s3fs try each S3 call once (its own retry loop takes ``retries`` tries; the default is 5).

    s3fs retries throttling (``SlowDown``) and dropped connections by itself, nested twice around a ranged read,
    so without this a fault injected here may never reach the layer a test means to test. The setting is a
    class attribute, not a constructor option: Ray workers get it from a worker set-up hook.
    """
    import s3fs

    s3fs.S3FileSystem.retries = 1
    s3fs.core.S3File.retries = 1


class FaultyProxy:
    def __init__(self, upstream: str, policy: Policy):
        self.upstream = urlsplit(upstream)
        self.policy = policy
        self.requests: list[tuple[str, str]] = []
        self.faults: Counter = Counter()
        self._seen: Counter = Counter()
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _handle(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with proxy._lock:
                    key = (self.command, self.path.split("?")[0])
                    proxy.requests.append(key)
                    fault = proxy.policy(self.command, key[1], proxy._seen[key])
                    proxy._seen[key] += 1
                    if fault:
                        proxy.faults[fault] += 1
                if fault == "reset":
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                if fault in ("503", "throttle"):
                    code = "SlowDown" if fault == "throttle" else "ServiceUnavailable"
                    payload = f"<Error><Code>{code}</Code><Message>injected</Message></Error>".encode()
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                headers["Host"] = proxy.upstream.netloc
                conn.request(self.command, self.path, body=body or None, headers=headers)
                response = conn.getresponse()
                data = response.read()
                self.send_response(response.status)
                for k, v in response.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                length = response.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FaultyProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def paths(self) -> set[str]:
        return {path for _, path in self.requests}
