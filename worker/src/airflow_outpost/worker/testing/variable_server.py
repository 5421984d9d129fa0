"""A loopback stand-in for the Execution API's ``GET variables/{key}``, for tests of the tokens a
local trigger's requests carry (a real server refreshes a token only in its last fifth).

Answers every ``GET .../variables/<key>`` with ``{"key": key, "value": "v<n>"}`` and records each
request's bearer token in :attr:`VariableServer.tokens`; :meth:`refresh_next` makes the next answer
hand out a new token (``Refreshed-API-Token``), as the real server does. Listens on 127.0.0.1 only.
"""

from __future__ import annotations

import threading

from airflow_outpost.worker.testing.loopback_http import QuietHandler, serve


class VariableServer:
    """``url`` is the Execution API root (``.../execution/``). ``close()`` stops it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.tokens: list[str] = []
        self._refresh: str | None = None
        outer = self

        class Handler(QuietHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                key = self.path.rstrip("/").rsplit("/", 1)[-1]
                with outer.lock:
                    outer.tokens.append(self.headers.get("Authorization", "").removeprefix("Bearer "))
                    refresh, outer._refresh = outer._refresh, None
                    doc = {"key": key, "value": f"v{len(outer.tokens)}"}
                self.reply_json(200, doc, {"Refreshed-API-Token": refresh} if refresh else None)

        self.server, port = serve(Handler)
        self.url = f"http://127.0.0.1:{port}/execution/"

    def refresh_next(self, token: str) -> None:
        with self.lock:
            self._refresh = token

    def seen(self) -> list[str]:
        with self.lock:
            return list(self.tokens)

    def close(self) -> None:
        self.server.shutdown()
