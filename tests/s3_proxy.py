"""A fault-injecting HTTP proxy in front of a real S3 engine (not a fake S3: every answer it does
not spoil comes from SeaweedFS or Ceph RGW).

It forwards each request as it came, Host header included, so the client's SigV4
signature still holds; `faults` says what to spoil: answer 503 to the next N requests,
delay each request, or cut the next N response bodies in half and drop the connection.
"""

from __future__ import annotations

import http.client
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit


@dataclass
class Faults:
    unavailable: int = 0  # answer 503 SlowDown to this many more requests
    delay: float = 0.0  # seconds before forwarding each request
    cut_bodies: int = 0  # send half the body of this many more responses, then close
    lost_answers: int = 0  # forward this many more PUTs, then close without answering (the object landed)
    spoiled: int = 0  # requests spoiled so far


class FaultyProxy:
    def __init__(self, upstream: str) -> None:
        self.faults = Faults()
        #: Each request forwarded or spoiled: method, path, Range header ("" without one).
        self.requests: list[tuple[str, str, str]] = []
        self._lock = threading.Lock()
        target = urlsplit(upstream)
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                """Quiet: pytest shows the test's own output."""

            def _take(self, kind: str) -> bool:
                with proxy._lock:
                    left = getattr(proxy.faults, kind)
                    if left > 0:
                        setattr(proxy.faults, kind, left - 1)
                        proxy.faults.spoiled += 1
                        return True
                return False

            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with proxy._lock:
                    proxy.requests.append((self.command, self.path, self.headers.get("Range", "")))
                time.sleep(proxy.faults.delay)
                if self._take("unavailable"):
                    error = b"<Error><Code>SlowDown</Code><Message>injected</Message></Error>"
                    self.send_response(503)
                    self.send_header("Content-Length", str(len(error)))
                    self.end_headers()
                    self.wfile.write(error)
                    return
                upstream = http.client.HTTPConnection(target.hostname or "", target.port, timeout=30)
                try:
                    upstream.request(self.command, self.path, body=body, headers=dict(self.headers.items()))
                    answer = upstream.getresponse()
                    data = answer.read()
                finally:
                    upstream.close()
                if self.command == "PUT" and self._take("lost_answers"):
                    self.close_connection = True
                    return
                cut = self.command == "GET" and len(data) > 1 and self._take("cut_bodies")
                self.send_response(answer.status)
                for name, value in answer.getheaders():
                    if name.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(name, value)
                # A HEAD's answer has no body but the object's length.
                self.send_header("Content-Length", answer.getheader("Content-Length", "0") if self.command == "HEAD"
                                 else str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    try:
                        self.wfile.write(data[: len(data) // 2] if cut else data)
                    except (BrokenPipeError, ConnectionResetError):
                        self.close_connection = True  # the client gave up first (a timeout): nothing to send
                if cut:
                    self.close_connection = True

            do_GET = do_PUT = do_HEAD = do_DELETE = do_POST = _forward

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
