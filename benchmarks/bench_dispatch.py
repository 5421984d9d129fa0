"""Dispatch benchmark: outpost worker vs the stock ``airflow edge worker`` on one control plane.

For each worker configuration (stock defaults, stock with ``job_poll_interval=1``, outpost
defaults), all at concurrency 4 on the same embedded control plane, it runs a chain of 8 no-op
tasks (``--chain-runs`` times) and a fan-out of 50 mapped no-ops, then the same DAGs with the
scheduler restarted under its own ``LocalExecutor`` at parallelism 4 (the floor: no remote hop at
all), and measures:

* makespan: DAG run start -> end as recorded by the control plane;
* queued->start p50/p95: per task instance, ``queued_when`` -> ``start_date``;
* idle requests/s: Edge API requests from that worker per second while it has no work, counted
  from the API server's access log (the same way for every worker).

Prints a table with ratios against the stock default and writes JSON to benchmarks/results/.
Usage: python benchmarks/bench_dispatch.py [--quick] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from airflow_outpost.worker.testing.controlplane import ControlPlane  # noqa: E402
from benchmarks._machine import summary as machine  # noqa: E402

DAGS = Path(__file__).parent / "dags"
ACCESS_RE = re.compile(r"^(\S+) .*\[http\.access\].*path=(/edge_worker/v1/\S+)")




def _ts(value: str | None) -> float | None:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp() if value else None


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    if not values:
        return float("nan")
    idx = min(len(values) - 1, max(0, round(q * (len(values) - 1))))
    return values[idx]


class Contender:
    def __init__(self, label: str, cp: ControlPlane, work: Path) -> None:
        self.label, self.cp, self.work = label, cp, work
        self.name = re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")
        self.proc: subprocess.Popen[bytes] | None = None
        self.concurrency = 4

    def argv_env(self) -> tuple[list[str], dict[str, str]]:
        raise NotImplementedError

    def start(self) -> None:
        argv, env = self.argv_env()
        out = open(self.work / f"{self.name}.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            w = self.cp.workers().get(self.name)
            if w and w["state"] in ("idle", "running"):
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.label} exited: {(self.work / f'{self.name}.log').read_text()[-2000:]}")
            time.sleep(0.5)
        raise RuntimeError(f"{self.label} did not register")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


class Stock(Contender):
    def __init__(self, label: str, cp: ControlPlane, work: Path, poll_s: int | None) -> None:
        super().__init__(label, cp, work)
        self.poll_s = poll_s

    def argv_env(self) -> tuple[list[str], dict[str, str]]:
        env = dict(self.cp.env)
        env["AIRFLOW__LOGGING__BASE_LOG_FOLDER"] = str(self.work / f"{self.name}-logs")
        env["AIRFLOW__EDGE__HEARTBEAT_INTERVAL"] = "30"  # the stock default
        env["AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL"] = "5"
        if self.poll_s is not None:
            env["AIRFLOW__EDGE__JOB_POLL_INTERVAL"] = str(self.poll_s)
        airflow = str(Path(sys.executable).with_name("airflow"))
        return ([airflow, "edge", "worker", "-q", "bench", "-c", str(self.concurrency), "--edge-hostname", self.name,
                 "--pid", str(self.work / f"{self.name}.pid")], env)


class Outpost(Contender):
    def argv_env(self) -> tuple[list[str], dict[str, str]]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW__", "OUTPOST_"))}
        env["OUTPOST_JWT_SECRET"] = self.cp.jwt_secret
        return ([sys.executable, "-m", "airflow_outpost", "--log-level", "WARNING", "worker", "--api-url", self.cp.base_url,
                 "--name", self.name, "--queues", "bench", "--concurrency", str(self.concurrency),
                 "--state-folder", str(self.work / f"{self.name}-state"), "--log-folder", str(self.work / f"{self.name}-logs"),
                 "--dags-folder", str(DAGS)], env)


def edge_requests(cp: ControlPlane, worker: str, t0: float, t1: float) -> int:
    log = (cp.home / "cp-logs" / "api-server.log").read_text(errors="replace")  # type: ignore[operator]
    n = 0
    for line in log.splitlines():
        m = ACCESS_RE.match(line)
        if m and m.group(2).endswith("/" + worker) and t0 <= _ts(m.group(1)) <= t1:  # type: ignore[operator]
            n += 1
    return n


def run_dag(cp: ControlPlane, dag_id: str) -> dict:
    run_id = cp.trigger(dag_id)
    state = cp.wait_for_run(dag_id, run_id, timeout_s=900)
    run = cp.api.get(f"/dags/{dag_id}/dagRuns/{run_id}").json()
    tis = cp.task_instances(dag_id, run_id)
    waits = [(_ts(t["start_date"]) or 0) - (_ts(t["queued_when"]) or 0) for t in tis if t["queued_when"] and t["start_date"]]
    return {"state": state, "makespan_s": (_ts(run["end_date"]) or 0) - (_ts(run["start_date"]) or 0), "waits": waits}


def bench(contender: Contender, cp: ControlPlane, chain_runs: int, idle_s: float) -> dict:
    contender.start()
    try:
        time.sleep(3)
        t0 = time.time()
        time.sleep(idle_s)
        idle_rps = edge_requests(cp, contender.name, t0, time.time()) / idle_s
        chains = [run_dag(cp, "bench_chain8") for _ in range(chain_runs)]
        fan = run_dag(cp, "bench_fanout50")
    finally:
        contender.stop()
    waits = [w for c in chains for w in c["waits"]] + fan["waits"]
    return {
        "label": contender.label,
        "chain8_makespan_s": statistics.median(c["makespan_s"] for c in chains),
        "chain8_runs": [round(c["makespan_s"], 2) for c in chains],
        "fanout50_makespan_s": fan["makespan_s"],
        "queued_to_start_p50_s": pct(waits, 0.5),
        "queued_to_start_p95_s": pct(waits, 0.95),
        "idle_requests_per_s": idle_rps,
        "all_success": all(c["state"] == "success" for c in chains) and fan["state"] == "success",
    }


def bench_floor(cp: ControlPlane, chain_runs: int, parallelism: int = 4) -> dict:
    """The floor: the same control plane and DAGs with no remote hop at all, the scheduler restarted
    with its own LocalExecutor at the workers' concurrency."""
    cp.restart_scheduler(AIRFLOW__CORE__EXECUTOR="LocalExecutor", AIRFLOW__CORE__PARALLELISM=str(parallelism))
    time.sleep(5)
    chains = [run_dag(cp, "bench_chain8") for _ in range(chain_runs)]
    fan = run_dag(cp, "bench_fanout50")
    waits = [w for c in chains for w in c["waits"]] + fan["waits"]
    return {
        "label": "LocalExecutor (floor)",
        "chain8_makespan_s": statistics.median(c["makespan_s"] for c in chains),
        "chain8_runs": [round(c["makespan_s"], 2) for c in chains],
        "fanout50_makespan_s": fan["makespan_s"],
        "queued_to_start_p50_s": pct(waits, 0.5),
        "queued_to_start_p95_s": pct(waits, 0.95),
        "idle_requests_per_s": 0.0,
        "all_success": all(c["state"] == "success" for c in chains) and fan["state"] == "success",
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 chain run, 20 s idle window")
    ap.add_argument("--chain-runs", type=int, default=3)
    ap.add_argument("--idle-s", type=float, default=60)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "dispatch.json")
    args = ap.parse_args()
    if args.quick:
        args.chain_runs, args.idle_s = 1, 20
    work = Path(tempfile.mkdtemp(prefix="outpost-bench-dispatch-"))
    with ControlPlane(dags_folder=DAGS, home=work / "airflow") as cp:
        cp.wait_for_dag("bench_chain8")
        cp.wait_for_dag("bench_fanout50")
        contenders = [Stock("stock default (poll 5s)", cp, work, None), Stock("stock poll 1s", cp, work, 1),
                      Outpost("outpost", cp, work)]
        results = []
        for c in contenders:
            print(f"running {c.label} ...", flush=True)
            results.append(bench(c, cp, args.chain_runs, args.idle_s))
        print("running LocalExecutor (floor) ...", flush=True)
        floor = bench_floor(cp, args.chain_runs)
        results.append(floor)
    base = results[0]
    print(f"\nmachine: {machine()}\n")
    hdr = (f"{'worker':26} {'chain8 s':>9} {'x stock':>8} {'x floor':>8} {'fanout50 s':>11} {'x stock':>8} "
           f"{'x floor':>8} {'q->start p50':>12} {'p95':>7} {'idle req/s':>10}")
    print(hdr)
    print("-" * len(hdr))
    for r in results:
        print(f"{r['label']:26} {r['chain8_makespan_s']:9.2f} {r['chain8_makespan_s'] / base['chain8_makespan_s']:8.2f} "
              f"{r['chain8_makespan_s'] / floor['chain8_makespan_s']:8.2f} "
              f"{r['fanout50_makespan_s']:11.2f} {r['fanout50_makespan_s'] / base['fanout50_makespan_s']:8.2f} "
              f"{r['fanout50_makespan_s'] / floor['fanout50_makespan_s']:8.2f} "
              f"{r['queued_to_start_p50_s']:12.2f} {r['queued_to_start_p95_s']:7.2f} {r['idle_requests_per_s']:10.2f}"
              + ("" if r["all_success"] else "  (NOT all runs succeeded)"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine(), "date": datetime.now().isoformat(timespec="seconds"),
                                    "chain_runs": args.chain_runs, "idle_window_s": args.idle_s, "results": results}, indent=1))
    print(f"\nwritten {args.out}")
    return 0 if all(r["all_success"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
