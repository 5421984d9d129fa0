"""Dispatch benchmark: outpost worker vs the stock ``airflow edge worker`` on one control plane.

For each worker configuration (stock defaults, stock with ``job_poll_interval=1``, outpost
defaults), all at concurrency 4 on the same embedded control plane, it runs a chain of 8 no-op
tasks (``--chain-runs`` times) and a fan-out of 50 mapped no-ops, then the same DAGs with the
scheduler restarted under its own ``LocalExecutor`` at parallelism 4 (the floor: no remote hop at
all; again with the Task SDK's ``min_heartbeat_interval`` at 1 s, as outpost sets it for its tasks,
a stricter floor), and measures:

* makespan: DAG run start -> end as recorded by the control plane;
* queued->start p50/p95: per task instance, ``queued_when`` -> ``start_date``;
* idle requests/s: Edge API requests from that worker per second while it has no work, counted
  from the API server's access log (the same way for every worker).

With ``--fanout500`` it adds the long case: a fan-out of 500 mapped no-ops (``dags/bench_fanout500_dag.py``)
for outpost at ``--fanout500-concurrency`` (16) and for the floor at the same parallelism (the stock worker
only with ``--fanout500-stock``: at its pace that case alone takes minutes per configuration). Each of those
runs is bounded by ``--fanout500-timeout``; a scheduler that dies (SQLite "database is locked" under many
concurrent tasks on a small machine) is recorded in the result, restarted, and the next contender runs.
``--fanout500-only`` skips the chain and fan-out-50 part.

``--db postgres`` (or ``OUTPOST_TEST_DB=postgres``) runs the control plane's metadata DB on a
throw-away PostgreSQL server, as production control planes do (needs Debian's ``postgresql``
and the dev extra's drivers); SQLite is the default.

Prints a table with ratios against the stock default and writes JSON to benchmarks/results/.
Usage: python benchmarks/bench_dispatch.py [--quick] [--fanout500 [--fanout500-only]] [--db postgres] [--out PATH]
"""

from __future__ import annotations

import argparse
import contextlib
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

import httpx
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from airflow_outpost.worker.testing.controlplane import ControlPlane, ControlPlaneError  # noqa: E402
from benchmarks._machine import summary as machine  # noqa: E402

DAGS = Path(__file__).parent / "dags"
ACCESS_RE = re.compile(r"^(\S+) .*\[http\.access\].*path=(/edge_worker/v1/\S+)")
EDGE_EXECUTOR = "airflow.providers.edge3.executors.EdgeExecutor"
BASE_CONCURRENCY = 4  # every worker in the chain / fan-out-50 table, and the floor's parallelism there


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
        self.concurrency = BASE_CONCURRENCY

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
    log_level = "WARNING"  # bench_chain_breakdown.py wants INFO: the "started <key> (pid N)" lines

    def argv_env(self) -> tuple[list[str], dict[str, str]]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW__", "OUTPOST_"))}
        env["OUTPOST_JWT_SECRET"] = self.cp.jwt_secret
        return ([sys.executable, "-m", "airflow_outpost", "--log-level", self.log_level, "worker", "--api-url", self.cp.base_url,
                 "--name", self.name, "--queues", "bench", "--concurrency", str(self.concurrency),
                 "--state-folder", str(self.work / f"{self.name}-state"), "--log-folder", str(self.work / f"{self.name}-logs"),
                 "--dags-folder", str(DAGS)], env)


def cpu_tree(pid: int) -> tuple[float, float]:
    """CPU seconds used so far by a process alone and by its whole tree (every live process with the
    children it has reaped: a finished task process counts in its supervisor's or zygote's figure)."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
        own = root.cpu_times()
    except psutil.NoSuchProcess:
        return 0.0, 0.0
    total = 0.0
    for proc in procs:
        try:
            t = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += t.user + t.system + t.children_user + t.children_system
    return own.user + own.system, total


def cpu_snapshot(cp: ControlPlane, worker_pid: int | None = None) -> dict[str, tuple[float, float]]:
    procs = {name: proc.pid for name, proc in cp._procs.items()}  # noqa: SLF001 - the benchmark owns this control plane
    if worker_pid is not None:
        procs["worker"] = worker_pid
    snap = {name: cpu_tree(pid) for name, pid in procs.items()}
    me = psutil.Process().cpu_times()  # this script alone: the control plane and the worker are its children
    snap["benchmark (REST polling)"] = (me.user + me.system, me.user + me.system)
    return snap


def cpu_per_chain(before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]],
                  runs: int) -> dict[str, dict[str, float]]:
    """Per component and chain: its tree, its main process alone, and the rest (children: task
    supervisors and task processes for the worker's zygote and the LocalExecutor's workers)."""
    out = {}
    for name, (own, tree) in after.items():
        d_own, d_tree = (own - before[name][0]) / runs, (tree - before[name][1]) / runs
        out[name] = {"tree": round(d_tree, 3), "main": round(d_own, 3), "children": round(d_tree - d_own, 3)}
    return out


REQUEST_LINE = re.compile(r"^(\S+) .*\[http\.access\].* duration_us=(\d+) .*method=(\S+) path=(\S+)")


def request_mix(cp: ControlPlane, t0: float, t1: float) -> dict[str, dict[str, float]]:
    """Requests the API server finished between t0 and t1, by kind: count and summed time in the server."""
    kinds = (("/execution/", "Execution API"), ("/edge_worker/v1/jobs/fetch/", "Edge: fetch"),
             ("/edge_worker/v1/jobs/state/", "Edge: job state"), ("/edge_worker/", "Edge: other"), ("/api/v2/", "REST (benchmark)"))
    out: dict[str, dict[str, float]] = {}
    for line in (cp.home / "cp-logs" / "api-server.log").read_text(errors="replace").splitlines():  # type: ignore[operator]
        m = REQUEST_LINE.match(line)
        if m is None or not t0 <= (_ts(m.group(1)) or 0) <= t1:
            continue
        kind = next((k for prefix, k in kinds if m.group(4).startswith(prefix)), "other")
        row = out.setdefault(kind, {"requests": 0, "server_s": 0.0})
        row["requests"] += 1
        row["server_s"] = round(row["server_s"] + int(m.group(2)) / 1e6, 3)
    return out


def edge_requests(cp: ControlPlane, worker: str, t0: float, t1: float) -> int:
    log = (cp.home / "cp-logs" / "api-server.log").read_text(errors="replace")  # type: ignore[operator]
    n = 0
    for line in log.splitlines():
        m = ACCESS_RE.match(line)
        if m and m.group(2).endswith("/" + worker) and t0 <= _ts(m.group(1)) <= t1:  # type: ignore[operator]
            n += 1
    return n


def run_dag(cp: ControlPlane, dag_id: str, timeout_s: float = 900) -> dict:
    run_id = cp.trigger(dag_id)
    state = cp.wait_for_run(dag_id, run_id, timeout_s=timeout_s)
    run = cp.api.get(f"/dags/{dag_id}/dagRuns/{run_id}").json()
    tis = cp.task_instances(dag_id, run_id)
    waits = [(_ts(t["start_date"]) or 0) - (_ts(t["queued_when"]) or 0) for t in tis if t["queued_when"] and t["start_date"]]
    return {"state": state, "makespan_s": (_ts(run["end_date"]) or 0) - (_ts(run["start_date"]) or 0), "waits": waits}


def run_fanout50(cp: ControlPlane, worker_pid: int | None) -> dict:
    """The fan-out of 50, with the CPU seconds of each process tree during it (as for the fan-out of 500)."""
    before = cpu_snapshot(cp, worker_pid)
    fan = run_dag(cp, "bench_fanout50")
    fan["cpu_s"] = cpu_per_chain(before, cpu_snapshot(cp, worker_pid), 1)
    return fan


def bench(contender: Contender, cp: ControlPlane, chain_runs: int, idle_s: float) -> dict:
    contender.start()
    try:
        time.sleep(3)
        t0 = time.time()
        time.sleep(idle_s)
        idle_rps = edge_requests(cp, contender.name, t0, time.time()) / idle_s
        chains = [run_dag(cp, "bench_chain8") for _ in range(chain_runs)]
        assert contender.proc is not None
        fan = run_fanout50(cp, contender.proc.pid)
    finally:
        contender.stop()
    waits = [w for c in chains for w in c["waits"]] + fan["waits"]
    return {
        "label": contender.label,
        "chain8_makespan_s": statistics.median(c["makespan_s"] for c in chains),
        "chain8_runs": [round(c["makespan_s"], 2) for c in chains],
        "fanout50_makespan_s": fan["makespan_s"],
        "fanout50_cpu_s": fan["cpu_s"],
        "queued_to_start_p50_s": pct(waits, 0.5),
        "queued_to_start_p95_s": pct(waits, 0.95),
        "idle_requests_per_s": idle_rps,
        "all_success": all(c["state"] == "success" for c in chains) and fan["state"] == "success",
    }


def use_floor(cp: ControlPlane, parallelism: int, min_heartbeat_s: int = 5) -> dict[str, str]:
    """Restart the control plane's scheduler with its own LocalExecutor at ``parallelism``; return that env.

    ``min_heartbeat_s`` is the Task SDK's ``[workers] min_heartbeat_interval`` for its task supervisors:
    Airflow's default 5 s keeps a LocalExecutor worker busy up to that long after its task ended (outpost
    gives its tasks 1 s), so the floor runs with the default and, as a stricter floor, with 1 s."""
    env = {"AIRFLOW__CORE__EXECUTOR": "LocalExecutor", "AIRFLOW__CORE__PARALLELISM": str(parallelism),
           "AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL": str(min_heartbeat_s)}
    cp.restart_scheduler(**env)
    time.sleep(5)
    return env


STOCK_DEFAULT = "stock default (poll 5s)"
FLOOR = "LocalExecutor (floor)"
FLOOR_HB1 = "LocalExecutor, min_heartbeat_interval=1"


def bench_floor(cp: ControlPlane, chain_runs: int, parallelism: int = BASE_CONCURRENCY, min_heartbeat_s: int = 5,
                label: str = FLOOR) -> dict:
    """The floor: the same control plane and DAGs with no remote hop at all, the scheduler restarted
    with its own LocalExecutor at the workers' concurrency."""
    use_floor(cp, parallelism, min_heartbeat_s)
    chains = [run_dag(cp, "bench_chain8") for _ in range(chain_runs)]
    fan = run_fanout50(cp, None)
    waits = [w for c in chains for w in c["waits"]] + fan["waits"]
    return {
        "label": label,
        "chain8_makespan_s": statistics.median(c["makespan_s"] for c in chains),
        "chain8_runs": [round(c["makespan_s"], 2) for c in chains],
        "fanout50_makespan_s": fan["makespan_s"],
        "fanout50_cpu_s": fan["cpu_s"],
        "queued_to_start_p50_s": pct(waits, 0.5),
        "queued_to_start_p95_s": pct(waits, 0.95),
        "idle_requests_per_s": 0.0,
        "all_success": all(c["state"] == "success" for c in chains) and fan["state"] == "success",
    }


def _scheduler_error(cp: ControlPlane) -> str:
    """The last 'database is locked' (or other error) line of the scheduler's log, for the record."""
    log = (cp.home / "cp-logs" / "scheduler.log").read_text(errors="replace").splitlines()  # type: ignore[operator]
    hits = [ln for ln in log if "database is locked" in ln] or [ln for ln in log if "Error" in ln or "error" in ln]
    return hits[-1][-400:] if hits else ""


def run_fanout500(cp: ControlPlane, label: str, timeout_s: float, restart_env: dict[str, str],
                  worker_pid: int | None = None) -> dict:
    """One bounded run of the fan-out of 500; a dead scheduler or a timeout is recorded, not raised.

    ``restart_env`` is the scheduler's environment to restart it with if it died (the run is failed
    first, so that the next contender starts on a quiet control plane). Also recorded: the CPU
    seconds of each component's process tree and the API server's requests by kind during the run."""
    cpu_before, wall0 = cpu_snapshot(cp, worker_pid), time.time()
    run_id = cp.trigger("bench_fanout500")
    t0 = time.monotonic()
    out: dict = {"label": label, "run_id": run_id}
    try:
        out["state"] = cp.wait_for_run("bench_fanout500", run_id, timeout_s=timeout_s)
    except ControlPlaneError as exc:
        dead = cp._procs["scheduler"].poll() is not None  # noqa: SLF001 - the benchmark owns this control plane
        out["state"] = "scheduler died" if dead else "timed out"
        out["error"] = (_scheduler_error(cp) if dead else str(exc))[:600]
        out["after_s"] = round(time.monotonic() - t0, 1)
        if dead:
            cp.restart_scheduler(**restart_env)
            time.sleep(5)
        with contextlib.suppress(ControlPlaneError, httpx.HTTPError):
            cp.api.patch(f"/dags/bench_fanout500/dagRuns/{run_id}", json={"state": "failed"})
    if out["state"] != "scheduler died":  # a restarted scheduler has other process ids
        out["cpu_s"] = cpu_per_chain(cpu_before, cpu_snapshot(cp, worker_pid), 1)
    out["requests"] = request_mix(cp, wall0, time.time())
    run = cp.api.get(f"/dags/bench_fanout500/dagRuns/{run_id}").json()
    tis = cp.task_instances("bench_fanout500", run_id)
    waits = [(_ts(t["start_date"]) or 0) - (_ts(t["queued_when"]) or 0) for t in tis if t["queued_when"] and t["start_date"]]
    done = sum(1 for t in tis if t["state"] == "success")
    out.update({
        "makespan_s": (_ts(run["end_date"]) or 0) - (_ts(run["start_date"]) or 0) if out["state"] == "success" else None,
        "tasks_succeeded": done, "queued_to_start_p50_s": pct(waits, 0.5), "queued_to_start_p95_s": pct(waits, 0.95),
    })
    out["tasks_per_s"] = done / out["makespan_s"] if out["makespan_s"] else None
    return out


def bench_fanout500(contender: Contender, cp: ControlPlane, concurrency: int, timeout_s: float) -> dict:
    contender.concurrency = concurrency
    contender.start()
    try:
        time.sleep(3)
        assert contender.proc is not None
        return run_fanout500(cp, contender.label, timeout_s, {"AIRFLOW__CORE__EXECUTOR": EDGE_EXECUTOR}, contender.proc.pid)
    finally:
        contender.stop()


def _ratio(a: float | None, b: dict | None, key: str) -> float:
    return a / b[key] if a and b and b.get(key) else float("nan")


def cpu_line(cpu: dict[str, dict[str, float]]) -> str:
    """One line of :func:`cpu_per_chain`'s figures: ``name tree (main + children)`` per component."""
    return ", ".join(f"{n} {c['tree']:.1f} ({c['main']:.1f} + {c['children']:.1f})" for n, c in cpu.items())


def print_fanout500(results: list[dict], concurrency: int) -> None:
    floor = next((r for r in results if r["label"] == FLOOR), None)
    hb1 = next((r for r in results if r["label"] == FLOOR_HB1), None)
    print(f"\nfan-out of 500 no-ops, concurrency / parallelism {concurrency}")
    hdr = f"{'worker':40} {'makespan s':>10} {'x floor':>8} {'x hb1':>6} {'tasks/s':>8} {'q->start p50':>12} {'p95':>7}  state"
    print(hdr)
    print("-" * len(hdr))
    for r in results:
        ms = r["makespan_s"]
        print(f"{r['label']:40} {ms or float('nan'):10.2f} {_ratio(ms, floor, 'makespan_s'):8.2f} "
              f"{_ratio(ms, hb1, 'makespan_s'):6.2f} {r['tasks_per_s'] or float('nan'):8.2f} "
              f"{r['queued_to_start_p50_s']:12.2f} {r['queued_to_start_p95_s']:7.2f}  {r['state']}"
              + (f" ({r['tasks_succeeded']}/500 succeeded after {r.get('after_s')} s: {r.get('error', '')[:160]})"
                 if r["state"] != "success" else ""))
    print("\nduring each run: CPU seconds of each process tree (main process + children), and the API server's requests")
    for r in results:
        cpu = cpu_line(r.get("cpu_s", {}))
        req = ", ".join(f"{k} {v['requests']} ({v['server_s']:.0f} s)" for k, v in r.get("requests", {}).items())
        print(f"  {r['label']}:\n    CPU: {cpu or 'not measured'}\n    requests (summed time in the server): {req}")


def print_base(results: list[dict]) -> None:
    base = next((r for r in results if r["label"] == STOCK_DEFAULT), None)
    floor = next(r for r in results if r["label"] == FLOOR)
    hb1 = next((r for r in results if r["label"] == FLOOR_HB1), None)
    hdr = (f"{'worker':40} {'chain8 s':>9} {'x stock':>8} {'x floor':>8} {'x hb1':>6} {'fanout50 s':>11} {'x stock':>8} "
           f"{'x floor':>8} {'x hb1':>6} {'q->start p50':>12} {'p95':>7} {'idle req/s':>10}")
    print(hdr)
    print("-" * len(hdr))
    for r in results:
        c, f = r["chain8_makespan_s"], r["fanout50_makespan_s"]
        print(f"{r['label']:40} {c:9.2f} {_ratio(c, base, 'chain8_makespan_s'):8.2f} {_ratio(c, floor, 'chain8_makespan_s'):8.2f} "
              f"{_ratio(c, hb1, 'chain8_makespan_s'):6.2f} {f:11.2f} {_ratio(f, base, 'fanout50_makespan_s'):8.2f} "
              f"{_ratio(f, floor, 'fanout50_makespan_s'):8.2f} {_ratio(f, hb1, 'fanout50_makespan_s'):6.2f} "
              f"{r['queued_to_start_p50_s']:12.2f} {r['queued_to_start_p95_s']:7.2f} {r['idle_requests_per_s']:10.2f}"
              + ("" if r["all_success"] else "  (NOT all runs succeeded)"))
    print("\nCPU seconds during the fan-out of 50 (process tree = main process + children):")
    for r in results:
        cpu = r.get("fanout50_cpu_s") or {}
        total = sum(c["tree"] for c in cpu.values())
        print(f"  {r['label']:40} total {total:6.1f}  ({total / r['fanout50_makespan_s']:.2f} cores): {cpu_line(cpu)}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 chain run, 20 s idle window")
    ap.add_argument("--chain-runs", type=int, default=3)
    ap.add_argument("--idle-s", type=float, default=60)
    ap.add_argument("--no-stock", action="store_true", help="leave the stock workers out (outpost and the floors only)")
    ap.add_argument("--fanout500", action="store_true", help="add the fan-out of 500 (long: minutes per contender)")
    ap.add_argument("--fanout500-only", action="store_true", help="only the fan-out of 500 (implies --fanout500)")
    ap.add_argument("--fanout500-concurrency", type=int, default=16, help="worker concurrency = floor parallelism")
    ap.add_argument("--fanout500-stock", action="store_true", help="run the stock worker (poll 1 s) on it too")
    ap.add_argument("--fanout500-timeout", type=float, default=480, help="bound of each fan-out-500 run, seconds")
    ap.add_argument("--db", choices=("sqlite", "postgres"), default=None,
                    help="the control plane's metadata DB (default: OUTPOST_TEST_DB, else sqlite)")
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON result (default results/dispatch.json; results/dispatch-fanout500.json with --fanout500-only)")
    args = ap.parse_args()
    if args.quick:
        args.chain_runs, args.idle_s = 1, 20
    args.fanout500 = args.fanout500 or args.fanout500_only
    if args.out is None:
        args.out = Path(__file__).parent / "results" / ("dispatch-fanout500.json" if args.fanout500_only else "dispatch.json")
    n500 = args.fanout500_concurrency
    work = Path(tempfile.mkdtemp(prefix="outpost-bench-dispatch-"))
    results: list[dict] = []
    big: list[dict] = []
    with ControlPlane(dags_folder=DAGS, home=work / "airflow", db=args.db) as cp:
        for dag_id in ("bench_chain8", "bench_fanout50") + (("bench_fanout500",) if args.fanout500 else ()):
            cp.wait_for_dag(dag_id)
        stock_1s = Stock("stock poll 1s", cp, work, 1)
        contenders = [Stock(STOCK_DEFAULT, cp, work, None), stock_1s, Outpost("outpost", cp, work)]
        if not args.fanout500_only:
            for c in [c for c in contenders if not (args.no_stock and isinstance(c, Stock))]:
                print(f"running {c.label} ...", flush=True)
                results.append(bench(c, cp, args.chain_runs, args.idle_s))
        if args.fanout500:
            for c in ([stock_1s] if args.fanout500_stock else []) + [contenders[-1]]:
                print(f"running {c.label}, fan-out of 500 at concurrency {n500} ...", flush=True)
                big.append(bench_fanout500(c, cp, n500, args.fanout500_timeout))
        floors = ((FLOOR, 5), (FLOOR_HB1, 1))
        if not args.fanout500_only:
            for label, heartbeat in floors:
                print(f"running {label} ...", flush=True)
                results.append(bench_floor(cp, args.chain_runs, BASE_CONCURRENCY, heartbeat, label))
        if args.fanout500:
            for label, heartbeat in floors:
                print(f"running {label}, fan-out of 500 at parallelism {n500} ...", flush=True)
                big.append(run_fanout500(cp, label, args.fanout500_timeout, use_floor(cp, n500, heartbeat)))
    print(f"\nmachine: {machine()}\n")
    if results:
        print_base(results)
    if big:
        print_fanout500(big, n500)
    out: dict = {"machine": machine(), "date": datetime.now().isoformat(timespec="seconds"), "db": cp.db}
    if results:
        out.update({"chain_runs": args.chain_runs, "idle_window_s": args.idle_s, "results": results})
    if big:
        out["fanout500"] = {"concurrency": n500, "timeout_s": args.fanout500_timeout, "results": big,
                            "stock": "run (poll 1 s)" if args.fanout500_stock else
                            "not run (--fanout500-stock): its slots turn over every few seconds, minutes per configuration"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(f"\nwritten {args.out}")
    return 0 if all(r["all_success"] for r in results) and all(r["state"] == "success" for r in big) else 1


if __name__ == "__main__":
    sys.exit(main())
