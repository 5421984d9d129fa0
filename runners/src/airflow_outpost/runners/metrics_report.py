"""Report runner throughput to the worker that runs this task: ``report("embeddings", 512)``.

The worker gives each task process ``OUTPOST_METRICS_DIR``; :func:`report` appends one small JSON
line to ``<dir>/<pid>.jsonl`` and the worker exports it on ``/metrics`` as
``outpost_runner_<name>_total`` (counters, summed) or ``outpost_runner_<name>`` (gauges, last
value). Outside a worker (no ``OUTPOST_METRICS_DIR``) it does nothing, so runners can always call
it. Never raises: metrics must not fail a task.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time

__all__ = ["report"]

_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
log = logging.getLogger(__name__)


def report(name: str, value: float, labels: dict[str, str] | None = None, *, kind: str = "counter") -> bool:
    """Add ``value`` to counter ``name`` (or set gauge ``name`` with ``kind="gauge"``).

    Typical names: ``embeddings``, ``rows``, ``batches``. Returns True if the record was written.
    """
    folder = os.environ.get("OUTPOST_METRICS_DIR")
    if not folder:
        return False
    if not _NAME.match(name) or kind not in ("counter", "gauge"):
        log.warning("metric %r (%s) not reported: names are lower_snake_case, kind counter or gauge", name, kind)
        return False
    record = {"name": name, "value": float(value), "kind": kind, "ts": time.time(),
              "labels": {str(k): str(v) for k, v in (labels or {}).items()}}
    line = (json.dumps(record, separators=(",", ":")) + "\n").encode()
    try:
        # One O_APPEND write per record: lines from threads of this process never interleave.
        fd = os.open(os.path.join(folder, f"{os.getpid()}.jsonl"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)
    except OSError as exc:
        log.warning("could not report metric %s: %s", name, exc)
        return False
    return True
