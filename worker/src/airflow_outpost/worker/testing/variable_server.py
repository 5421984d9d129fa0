"""A loopback stand-in for the Execution API's ``GET variables/{key}``, for tests of the tokens a
local trigger's requests carry (a real server refreshes a token only in its last fifth).

Answers every ``GET .../variables/<key>`` with ``{"key": key, "value": "v<n>"}`` and records each
request's bearer token in :attr:`VariableServer.tokens`; :meth:`refresh_next` makes the next answer
hand out a new token (``Refreshed-API-Token``), as the real server does. Listens on 127.0.0.1 only.
"""

from __future__ import annotations

import http.server
import json
import threading


class VariableServer:
    """``url`` is the Execution API root (``.../execution/``). ``close()`` stops it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.tokens: list[str] = []
        self._refresh: str | None = None
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                key = self.path.rstrip("/").rsplit("/", 1)[-1]
                with outer.lock:
                    outer.tokens.append(self.headers.get("Authorization", "").removeprefix("Bearer "))
                    refresh, outer._refresh = outer._refresh, None
                    body = json.dumps({"key": key, "value": f"v{len(outer.tokens)}"}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                if refresh:
                    self.send_header("Refreshed-API-Token", refresh)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/execution/"

    def refresh_next(self, token: str) -> None:
        with self.lock:
            self._refresh = token

    def seen(self) -> list[str]:
        with self.lock:
            return list(self.tokens)

    def close(self) -> None:
        self.server.shutdown()
