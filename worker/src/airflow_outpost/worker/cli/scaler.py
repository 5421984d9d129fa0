"""``outpost scaler``: serve queue depth to KEDA (``/scale``), Prometheus (``/metrics``) and probes
(``/healthz``). Signals are installed here: SIGTERM/SIGINT close the server and exit 0."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from typing import Any

_HELPS = {
    "api_url": "Airflow API server root, e.g. http://airflow:8080",
    "queues": "comma-separated queues always reported, 0 when empty (queues with tasks are reported anyway)",
    "concurrency": "slots per worker when /scale names no ?concurrency= (default 4)",
    "host": "address to listen on (default 127.0.0.1; 0.0.0.0 in a pod)",
    "port": "port of /scale, /healthz and /metrics (default 9465)",
    "refresh_interval_s": "at most one round of REST calls per this long, however many callers (default 10)",
    "stale_after_s": "after a failed round, serve values this old before answering 503 (default 30)",
    "request_timeout_s": "per-request HTTP timeout (default 10)",
    "token_file": "file holding a read-only API token (re-read when it changes)",
    "username": "API user exchanged at /auth/token with --password-file",
    "password_file": "file holding that user's password",
    "ca_bundle": "CA bundle for the API server's TLS certificate",
}


def add_scaler_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    from airflow_outpost.worker.scaler.settings import ENV_PREFIX, setting_names

    p = sub.add_parser("scaler", parents=[common], help="serve queue depth to KEDA and Prometheus (autoscaling)")
    for name in setting_names():
        p.add_argument("--" + name.replace("_", "-"), dest=name, default=None,
                       help=f"{_HELPS[name]} [env {ENV_PREFIX}{name.upper()}]")
    p.set_defaults(func=cmd_scaler)


def cmd_scaler(args: argparse.Namespace) -> int:
    from airflow_outpost.worker.errors import StartupError
    from airflow_outpost.worker.scaler import QueueDepthReader, Scaler, ScalerServer, TokenSource, load_scaler_settings
    from airflow_outpost.worker.scaler.settings import setting_names

    s = load_scaler_settings({name: getattr(args, name) for name in setting_names()})

    async def main() -> int:
        tokens = TokenSource(token_file=s.token_file, username=s.username, password_file=s.password_file)
        reader = QueueDepthReader(s.api_url, tokens, timeout_s=s.request_timeout_s,
                                  verify=str(s.ca_bundle) if s.ca_bundle else True)
        scaler = Scaler(reader, queues=s.queues, refresh_interval_s=s.refresh_interval_s, stale_after_s=s.stale_after_s)
        server = ScalerServer(scaler, s.host, s.port, default_concurrency=s.concurrency)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        async with contextlib.AsyncExitStack() as stack:
            stack.push_async_callback(reader.aclose)
            stack.push_async_callback(server.aclose)
            try:
                await server.start()
            except OSError as exc:
                raise StartupError(f"scaler cannot listen on {s.host}:{s.port}: {exc.strerror}") from exc
            await stop.wait()
        return 0

    return asyncio.run(main())
