"""What the test servers on 127.0.0.1 share: a threaded server with a deep listen backlog, started
and stopped in one call each, and a request handler that answers JSON and stays quiet."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class LoopbackServer(ThreadingHTTPServer):
    request_queue_size = 128  # a burst of concurrent connections is not refused by the listen backlog
    daemon_threads = True


def start(handler: type[BaseHTTPRequestHandler]) -> LoopbackServer:
    server = LoopbackServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    return server


def stop(server: LoopbackServer | None) -> None:
    assert server is not None
    server.shutdown()
    server.server_close()


class JsonHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        return None

    def _send(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None,
              ignore_errors: bool = False) -> None:
        self._raw(status, json.dumps(payload).encode(), headers, ignore_errors)

    def _raw(self, status: int, data: bytes, headers: dict[str, str] | None = None,
             ignore_errors: bool = False) -> None:
        """``ignore_errors``: a client that gave up (a timeout test) may have closed the socket."""
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            if not ignore_errors:
                raise
