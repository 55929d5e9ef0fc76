"""A loopback proxy in front of the GCS emulator that refuses a bucket or cuts the network, for the bad-input tests.

fake-gcs-server checks no credentials and never drops a connection, so the failures a user meets on
a real bucket are made here, between the clients and the server, in the test's own process:
- `refuse(bucket)`: every request naming that bucket gets GCS's 403 answer, as a bucket the
  machine's service account may not use;
- `cut(fragment)`: every request whose path or query holds `fragment` (an object name, say
  `checkpoints/50/`) has its connection closed without an answer, as a network that fails mid-save.
Everything else is forwarded unchanged. It listens on 127.0.0.1 only and forwards only to the
emulator's loopback URL.
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import json
import threading
import urllib.parse
from typing import Iterator

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection",
               "content-length", "host"}


class FaultProxy:
    """The proxy's settings, read by its handler threads; change them while clients run."""

    def __init__(self, upstream: str):
        parsed = urllib.parse.urlsplit(upstream)
        assert parsed.hostname == "127.0.0.1", "the proxy forwards to loopback only"
        self.upstream = (parsed.hostname, parsed.port)
        self.refused_buckets: set[str] = set()
        self.cut_fragments: set[str] = set()
        self.cut_count = 0

    def refuse(self, bucket: str) -> None:
        self.refused_buckets.add(bucket)

    def cut(self, fragment: str) -> None:
        self.cut_fragments.add(fragment)

    def names_refused_bucket(self, target: str) -> bool:
        path = urllib.parse.unquote(urllib.parse.urlsplit(target).path)
        return any(f"/b/{bucket}/" in path + "/" or path.startswith(f"/{bucket}/") for bucket in self.refused_buckets)

    def is_cut(self, target: str) -> bool:
        return any(fragment in urllib.parse.unquote(target) for fragment in self.cut_fragments)


def _handler(proxy: FaultProxy) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # the test's output stays readable
            pass

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while size := int(self.rfile.readline().split(b";")[0], 16):
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                self.rfile.readline()
                return b"".join(chunks)
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _answer(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
            self.send_response(status)
            for name, value in headers:
                if name.lower() not in _HOP_BY_HOP:
                    self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                try:
                    self.wfile.write(body)
                except ConnectionError:  # the client gave up (its own timeout): nothing to tell it
                    self.close_connection = True

        def _forward(self) -> None:
            body = self._body()
            if proxy.is_cut(self.path):
                proxy.cut_count += 1
                self.close_connection = True
                self.connection.shutdown(2)  # no answer at all: the client sees the connection reset
                return
            if proxy.names_refused_bucket(self.path):
                error = {"error": {"code": 403, "message": "test-client does not have storage.objects access to "
                                   "the Google Cloud Storage bucket. Permission denied.",
                                   "errors": [{"reason": "forbidden", "domain": "global"}]}}
                self._answer(403, [("Content-Type", "application/json")], json.dumps(error).encode())
                return
            upstream = http.client.HTTPConnection(*proxy.upstream, timeout=60)
            try:
                headers = {name: value for name, value in self.headers.items() if name.lower() not in _HOP_BY_HOP}
                upstream.request(self.command, self.path, body=body if body or self.command in ("POST", "PUT")
                                 else None, headers=headers)
                response = upstream.getresponse()
                self._answer(response.status, response.getheaders(), response.read())
            finally:
                upstream.close()

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _forward

    return Handler


@contextlib.contextmanager
def running(upstream: str) -> Iterator[tuple[str, FaultProxy]]:
    """(the proxy's URL, its settings) while it serves on a free loopback port."""
    proxy = FaultProxy(upstream)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(proxy))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", proxy
    finally:
        server.shutdown()
        server.server_close()
