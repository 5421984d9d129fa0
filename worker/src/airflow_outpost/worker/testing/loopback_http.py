"""What the tests' small HTTP stand-ins share: a threaded server on 127.0.0.1 and a JSON reply."""

from __future__ import annotations

import http.server
import json
import threading
from typing import Any


def serve(handler: type[http.server.BaseHTTPRequestHandler]) -> tuple[http.server.ThreadingHTTPServer, int]:
    """Start ``handler`` on a free loopback port in a daemon thread; ``(server, port)``. Stop with
    ``server.shutdown()``."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, server.server_address[1]


class QuietHandler(http.server.BaseHTTPRequestHandler):
    """A request handler that logs nothing and answers JSON with :meth:`reply_json`."""

    def reply_json(self, status: int, doc: Any, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:  # tests read their own output, not http.server's
        pass
