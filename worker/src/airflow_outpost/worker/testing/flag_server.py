"""A loopback HTTP "flag" for tests and benchmarks of tasks that wait on an outside condition.

404 until :meth:`FlagServer.raise_flag` (or ``up.set()``), then 200 with ``{"flag": "up", "i": <task>}``;
every GET is counted with the ``?i=`` index a task puts in its URL. Listens on 127.0.0.1 only.
"""

from __future__ import annotations

import threading
import time
from urllib.parse import parse_qs, urlparse

from airflow_outpost.worker.testing.loopback_http import QuietHandler, serve


class FlagServer:
    """Loopback HTTP flag: 404 until ``raise_flag()``, then 200 with JSON. Counts GETs per task (``?i=``)."""

    def __init__(self) -> None:
        self.up = threading.Event()
        self.lock = threading.Lock()
        self.hits: list[tuple[float, int]] = []  # (time.time(), task index)
        outer = self

        class Handler(QuietHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                index = int(parse_qs(urlparse(self.path).query).get("i", ["-1"])[0])
                with outer.lock:
                    outer.hits.append((time.time(), index))
                up = outer.up.is_set()
                self.reply_json(200 if up else 404, {"flag": "up", "i": index} if up else {})

        self.server, port = serve(Handler)
        self.url = f"http://127.0.0.1:{port}/flag"

    def reset(self) -> None:
        self.up.clear()
        with self.lock:
            self.hits.clear()

    def hits_between(self, t0: float, t1: float) -> list[tuple[float, int]]:
        with self.lock:
            return [(t, i) for t, i in self.hits if t0 <= t <= t1 and i >= 0]

    def close(self) -> None:
        self.server.shutdown()

    def raise_flag(self) -> None:
        self.up.set()
