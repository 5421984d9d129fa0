"""Egress benchmark: what leaves the region per task, and what the ledger costs per request.

1. Bytes to the control plane, by kind and task, for ``bench_egress`` (an ETL-shaped DAG, see
   benchmarks/dags/bench_egress_dag.py) run on an embedded control plane twice: region-local XCom
   on (the default) and off (``max_xcom_bytes=0``, i.e. everything central). Figures come from
   the workers' egress ledgers (what the gateway forwarded).
2. Ledger overhead per request: the gateway's bookkeeping (classify, policy check, SHA-256 of a
   typical 300-byte body, queueing the row) timed per call, median over many calls; and the
   end-to-end latency of a request through the gateway with the ledger on vs off (same run, same
   upstream), so the ledger's share shows as a ratio.

Writes JSON to benchmarks/results/egress.json. Usage: python benchmarks/bench_egress.py [--skip-dag]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402

from airflow_outpost.worker.config import load_settings  # noqa: E402
from airflow_outpost.worker.egress.gateway import Egress  # noqa: E402
from airflow_outpost.worker.egress.ledger import Entry  # noqa: E402
from airflow_outpost.worker.egress.policy import classify  # noqa: E402
from airflow_outpost.worker.testing.controlplane import ControlPlane  # noqa: E402

DAGS = Path(__file__).parent / "dags"
DAG = "bench_egress"


def _worker(cp: ControlPlane, tmp: Path, *extra: str) -> tuple[subprocess.Popen, Path]:
    name = f"bench-egress-{uuid.uuid4().hex[:6]}"
    state = tmp / f"{name}-state"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OUTPOST_", "AIRFLOW__"))}
    env.update({"OUTPOST_JWT_SECRET": cp.jwt_secret, "OUTPOST_METRICS_PORT": "0"})
    argv = [sys.executable, "-m", "airflow_outpost", "worker", "--api-url", cp.base_url, "--name", name,
            "--queues", "q_bench_egress", "--state-folder", str(state), "--log-folder", str(tmp / f"{name}-logs"),
            "--dags-folder", str(DAGS), "--poll-interval-s", "1", *extra]
    out = open(tmp / f"{name}.out", "wb")  # noqa: SIM115
    return subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO), state


def bytes_by_task(cp: ControlPlane, tmp: Path, *extra: str) -> dict:
    proc, state = _worker(cp, tmp, *extra)
    try:
        run_id = cp.trigger(DAG)
        result = cp.wait_for_run(DAG, run_id, timeout_s=300)
    finally:
        proc.terminate()
        proc.wait(120)
    db = sqlite3.connect(state / "egress.sqlite")
    per_task: dict[str, dict[str, int]] = {}
    for task, kind, sent in db.execute(
            "SELECT task, kind, SUM(bytes) FROM egress WHERE outcome='sent' AND task LIKE ? GROUP BY task, kind",
            (f"%run={run_id}%",)):
        per_task.setdefault(task.split(" ")[0].split(".", 1)[1], {})[kind] = sent
    return {"state": result, "tasks": per_task, "total": sum(sum(k.values()) for k in per_task.values())}


def bookkeeping_overhead(n: int = 20_000) -> dict:
    """Median cost of what the gateway adds per request (classification, policy, digest, ledger row)."""
    import hashlib

    with tempfile.TemporaryDirectory() as tmp:
        egress = Egress(load_settings({"api_url": "http://cp.invalid", "state_folder": tmp}, env={}))
        egress.ledger.start()
        body = b'{"state": "success", "end_date": "2024-01-01T00:00:00Z", "task_outlets": [], "outlet_events": []' + b" " * 200 + b"}"
        samples = []
        for i in range(n):
            t0 = time.perf_counter()
            kind = classify("task-instances/0190f0f0-0000-7000-8000-000000000001/state", "PATCH")
            egress.policy.check(kind, "PATCH", "task-instances/x/state", len(body))
            digest = hashlib.sha256(body).hexdigest()
            egress.ledger.record(Entry(ts=time.time(), task=f"d.t run=r{i}", endpoint="/execution/task-instances/x/state",
                                       method="PATCH", kind=kind, bytes=len(body), bytes_in=0, status=204, digest=digest))
            samples.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        egress.ledger.close()
        drain = time.perf_counter() - t0
        rows = sqlite3.connect(Path(tmp) / "egress.sqlite").execute("SELECT COUNT(*) FROM egress").fetchone()[0]
    samples.sort()
    return {"requests": n, "median_us": round(statistics.median(samples) * 1e6, 1),
            "p99_us": round(samples[int(n * 0.99)] * 1e6, 1), "rows_written": rows, "final_drain_s": round(drain, 3)}


async def _latency(ledger_on: bool, n: int) -> float:
    async def upstream(scope, receive, send):
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    with tempfile.TemporaryDirectory() as tmp:
        egress = Egress(load_settings({"api_url": "http://upstream", "state_folder": tmp}, env={}),
                        upstream_transport=httpx.ASGITransport(upstream))
        if not ledger_on:
            egress.ledger.record = lambda entry: None  # type: ignore[method-assign]
        url = await egress.start()
        samples = []
        async with httpx.AsyncClient(base_url=url) as client:
            for _ in range(n):
                t0 = time.perf_counter()
                await client.put("task-instances/x/heartbeat", json={"pid": 1, "hostname": "h"})
                samples.append(time.perf_counter() - t0)
        await egress.aclose()
    return statistics.median(samples[n // 10:]) * 1000


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--skip-dag", action="store_true", help="only the ledger overhead figures")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "egress.json"))
    args = p.parse_args()
    results: dict = {"host": {"cpus": os.cpu_count(), "python": platform.python_version()}}
    results["bookkeeping"] = bookkeeping_overhead()
    on = [asyncio.run(_latency(True, 600)) for _ in range(3)]
    off = [asyncio.run(_latency(False, 600)) for _ in range(3)]
    results["gateway_latency_ms"] = {"ledger_on_median": round(statistics.median(on), 3),
                                     "ledger_off_median": round(statistics.median(off), 3),
                                     "ratio": round(statistics.median(on) / statistics.median(off), 3)}
    print(json.dumps(results, indent=1))
    if not args.skip_dag:
        with tempfile.TemporaryDirectory() as tmp, ControlPlane(dags_folder=DAGS, home=Path(tmp) / "home") as cp:
            results["region_local_on"] = bytes_by_task(cp, Path(tmp))
            results["region_local_off"] = bytes_by_task(cp, Path(tmp), "--region-local-xcom", "off", "--max-xcom-bytes", "0")
        for mode in ("region_local_on", "region_local_off"):
            print(f"\n{mode}: run {results[mode]['state']}, {results[mode]['total']:,} bytes to the control plane")
            for task, kinds in sorted(results[mode]["tasks"].items()):
                print(f"  {task:<12}" + "  ".join(f"{k}={v:,}" for k, v in sorted(kinds.items())))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
