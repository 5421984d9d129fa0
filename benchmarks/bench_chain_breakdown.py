"""Where a chain's time goes: outpost vs the LocalExecutor floor, task by task, on one control plane.

The same embedded control plane as ``bench_dispatch.py`` (api-server, scheduler, dag-processor, SQLite).
First ``outpost worker --concurrency 4`` (at ``--log-level INFO``) runs the chain of 8 no-op tasks
(``bench_chain8``) ``--warmup`` + ``--runs`` times; then the scheduler is restarted with its own
``LocalExecutor`` at parallelism 4 (the floor, as in ``bench_dispatch.py``) and runs the same chain as
often, once with the Task SDK's default ``min_heartbeat_interval`` (5 s) and once with 1 s (the value outpost
gives its tasks). Warm-up runs are not counted. For every task instance of a counted run it puts together:

* the control plane's REST API: ``queued_when``, ``start_date`` (the Task SDK supervisor's clock just
  before its ``/run`` call), ``end_date`` (the task's clock when it finished);
* the API server's access log (every request's finish time and duration): the task's Execution API
  calls (``/run``, ``/heartbeat``, ``/rtif``, the XCom push, ``/state``) and, for outpost, the Edge
  job's final state (``PATCH /edge_worker/v1/jobs/state/.../success``);
* the task's own log (JSON lines): "DAG bundles loaded" (the task process has its start-up message, so
  the supervisor's ``/run`` was answered), "Worker startup parse complete" (the DAG file is parsed), the
  end of the pre-execute group (after ``/rtif``) and "Done. Returned value" (``execute`` returned);
* for outpost only: the egress ledger (``<state-folder>/egress.sqlite``, one row per request after its
  answer): the fetch that returned the job, and the Execution API calls its gateway answered itself; the
  worker log: "started <key> (pid N)" (the zygote forked the task process) and "job <key> succeeded"
  (the worker saw the supervisor exit).

A chain is strictly sequential, so its makespan (DAG run start -> end) is exactly the sum, over its
tasks, of: previous task's end_date -> queued (report: -> ``/state`` answered; scheduler: -> queued),
queued -> start_date (outpost: pickup -> job fetched, launch -> process forked, start-up -> supervisor
ready to call ``/run``; the floor has no fetch, its LocalExecutor hands the workload to a pre-forked
worker in memory), start_date -> end_date (``/run`` round trip and hand-off to the task process, DAG
parse, execute, XCom push and post-execute), plus the last task's end -> run end. The script checks that
identity per run, prints medians per task and per chain for each, and writes
``benchmarks/results/chain-breakdown.json``.

Usage: python benchmarks/bench_chain_breakdown.py [--runs 3] [--warmup 1] [--reanalyse RAW_JSON] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import re
import sqlite3
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from airflow_outpost.worker.testing.controlplane import ControlPlane  # noqa: E402
from benchmarks._machine import summary as machine  # noqa: E402
from benchmarks.bench_dispatch import BASE_CONCURRENCY, DAGS, Outpost, _ts, cpu_per_chain, cpu_snapshot, use_floor  # noqa: E402

DAG = "bench_chain8"
ACCESS = re.compile(r"^(\S+) .*\[http\.access\].* duration_us=(\d+) .*method=(\S+) path=(\S+)")
TI_PATH = re.compile(r"^/execution/task-instances/([0-9a-f-]{32,36})/(\w+)$")
XCOM_PATH = re.compile(r"^/execution/xcoms/([^/]+)/([^/]+)/([^/]+)/[^/]+$")
EDGE_STATE = re.compile(r"^/edge_worker/v1/jobs/state/([^/]+)/([^/]+)/([^/]+)/(\d+)/(-?\d+)/(\w+)$")
WORKER_LOG = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \S+\s+\S+: "
                        r"(?:(started) (\S+?)\.(\S+) run=(\S+) try=\d+ \(pid|(job) (\S+?)\.(\S+) run=(\S+) try=\d+ succeeded)")

# (name, label, parent): coarse segments have no parent; they add up to the makespan with "tail".
SEGMENTS = [
    ("to_queued", "previous end_date (run start) -> queued", None),
    ("report", "  report: end_date -> /state answered", "to_queued"),
    ("scheduler", "  scheduler: /state answered -> queued", "to_queued"),
    ("to_start", "queued -> start_date", None),
    ("pickup", "  pickup: queued -> job fetched", "to_start"),
    ("edge_job", "    queued -> Edge job row written", "pickup"),
    ("fetch_wait", "    Edge job -> fetched (poll + fetch)", "pickup"),
    ("launch", "  launch: fetched -> process forked", "to_start"),
    ("startup", "  start-up: forked -> start_date", "to_start"),
    ("running", "start_date -> end_date", None),
    ("run_call", "  /run answered + start-up message in", "running"),
    ("parse", "  DAG file parse", "running"),
    ("execute", "  execute (with /rtif)", "running"),
    ("finish", "  XCom push + post-execute", "running"),
]
# Inside the segments above: how long a task waits between the answer to a request and its next
# step (the answer travels API server -> [gateway ->] supervisor -> task process); and, off the
# critical path, what follows a task's end.
OFF_PATH = [
    ("rtif_to_task", "/rtif answered -> task goes on"),
    ("xcom_to_state", "XCom push answered -> /state sent"),
    ("supervisor_exit", "end_date -> worker saw the supervisor exit"),
    ("edge_success", "end_date -> Edge job success answered"),
]


def _log_ts(value: str) -> float:
    return datetime.strptime(value, "%Y-%m-%d %H:%M:%S,%f").timestamp()  # the worker logs local time


def _t(value: str | None) -> float:
    ts = _ts(value)
    if ts is None:
        raise ValueError("a timestamp the control plane should have set is missing")
    return ts


def _norm(ti_id: str) -> str:
    return ti_id.replace("-", "")


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def read_access(cp_home: Path) -> list[tuple[float, float, str, str]]:
    """(finish, duration, method, path) of every request the API server logged."""
    out = []
    for line in (cp_home / "cp-logs" / "api-server.log").read_text(errors="replace").splitlines():
        if (m := ACCESS.match(line)) is not None:
            out.append((_t(m.group(1)), int(m.group(2)) / 1e6, m.group(3), m.group(4)))
    return out


def task_log_marks(logs: Path, run_id: str, task_id: str) -> dict[str, float]:
    """Start-up message in / DAG parsed / pre-execute done / execute returned, from the task's own log."""
    marks: dict[str, float] = {}
    for path in sorted((logs / f"dag_id={DAG}" / f"run_id={run_id}" / f"task_id={task_id}").glob("*.log")):
        for line in path.read_text(errors="replace").splitlines():
            try:
                rec = json.loads(line)
                ts = _t(rec["timestamp"])
            except (ValueError, KeyError, TypeError, AttributeError):
                continue
            event = str(rec.get("event", ""))
            if event.startswith("DAG bundles loaded"):
                # The first line after "::group::Pre Execute", which the task logs before it waits for
                # its start-up message: the supervisor's /run has been answered and the message is in.
                marks.setdefault("first", ts)
            elif event.startswith("Worker startup parse complete"):
                marks.setdefault("parsed", ts)
            elif event == "::endgroup::" and "parsed" in marks:
                marks.setdefault("pre_end", ts)  # the pre-execute group ends (after /rtif)
            elif event.startswith("Done. Returned value"):
                marks.setdefault("done", ts)
    return marks


def run_chain(cp: ControlPlane, edge_jobs: bool = False) -> dict[str, Any]:
    """Trigger one chain and wait for it; with ``edge_jobs``, also when the Edge executor queued each
    task's job (asked at once: edge3 purges finished jobs after ``job_success_purge``, 60 s here)."""
    run_id = cp.trigger(DAG)
    state = cp.wait_for_run(DAG, run_id, timeout_s=300)
    run = cp.api.get(f"/dags/{DAG}/dagRuns/{run_id}").json()
    jobs: dict[str, float] = {}
    if edge_jobs:
        resp = cp.api.get(f"{cp.base_url}/edge_worker/ui/jobs", params={"dag_id_pattern": DAG, "run_id_pattern": run_id})
        resp.raise_for_status()
        jobs = {j["task_id"]: _t(j["queued_dttm"]) for j in resp.json()["jobs"] if j["run_id"] == run_id and j["queued_dttm"]}
    return {"run_id": run_id, "state": state, "start": _t(run["start_date"]), "end": _t(run["end_date"]),
            "tis": sorted(cp.task_instances(DAG, run_id), key=lambda t: t["task_id"]), "edge_jobs": jobs}


class Sources:
    """What the logs and ledgers say, indexed for one contender's runs."""

    def __init__(self, cp_home: Path, logs: Path, worker: str | None = None, state_folder: Path | None = None,
                 worker_log: Path | None = None) -> None:
        self.logs = logs
        self.worker = worker
        self.ti_calls: dict[str, list[tuple[str, float, float]]] = {}  # ti id -> (op, finish, duration)
        self.xcom_calls: dict[tuple[str, str], list[tuple[float, float]]] = {}  # (run, task) -> (finish, duration)
        self.edge_success: dict[tuple[str, str], float] = {}
        self.fetches: list[tuple[float, float]] = []  # this worker's fetch requests (finish, duration)
        self.edge: list[tuple[float, float]] = []  # every Edge API request (finish, duration)
        self.requests: list[float] = []  # every request the API server answered (finish)
        for finish, dur, method, path in read_access(cp_home):
            self.requests.append(finish)
            if path.startswith("/edge_worker/v1/"):
                self.edge.append((finish, dur))
            if (m := TI_PATH.match(path)) is not None:
                self.ti_calls.setdefault(_norm(m.group(1)), []).append((m.group(2), finish, dur))
            elif (m := XCOM_PATH.match(path)) is not None and method == "POST" and unquote(m.group(1)) == DAG:
                self.xcom_calls.setdefault((unquote(m.group(2)), unquote(m.group(3))), []).append((finish, dur))
            elif (m := EDGE_STATE.match(path)) is not None and m.group(6) == "success":
                self.edge_success[(unquote(m.group(3)), unquote(m.group(2)))] = finish
            elif worker and path == f"/edge_worker/v1/jobs/fetch/{worker}":
                self.fetches.append((finish, dur))
        self.job_fetches: list[float] = []  # ledger: fetches that returned a job (worker side, after the answer)
        self.kept: dict[str, int] = {}  # ti id -> Execution API calls the gateway answered itself
        self.kept_at: dict[tuple[str, str], float] = {}  # (ti id, op) -> when the gateway answered it
        if state_folder is not None:
            db = sqlite3.connect(f"file:{state_folder / 'egress.sqlite'}?mode=ro", uri=True)
            try:
                rows = db.execute("SELECT ts, endpoint, bytes_in, outcome FROM egress ORDER BY id")
                for ts, endpoint, bytes_in, outcome in rows:
                    if "/jobs/fetch/" in endpoint and (bytes_in or 0) > 16:  # "null" is 4 bytes
                        self.job_fetches.append(ts)
                    elif outcome == "kept" and (m := re.search(r"/task-instances/([0-9a-f-]{32,36})/(\w+)$", endpoint)):
                        self.kept[_norm(m.group(1))] = self.kept.get(_norm(m.group(1)), 0) + 1
                        self.kept_at.setdefault((_norm(m.group(1)), m.group(2)), ts)
            finally:
                db.close()
        self.started: dict[tuple[str, str], float] = {}
        self.exited: dict[tuple[str, str], float] = {}
        if worker_log is not None:
            for line in worker_log.read_text(errors="replace").splitlines():
                if (m := WORKER_LOG.match(line)) is None:
                    continue
                if m.group(2):
                    self.started[(m.group(5), m.group(4))] = _log_ts(m.group(1))
                else:
                    self.exited[(m.group(9), m.group(8))] = _log_ts(m.group(1))

    def api_calls(self, ti: dict[str, Any]) -> list[tuple[str, float, float]]:
        calls = list(self.ti_calls.get(_norm(ti["id"]), []))
        calls += [("xcom", f, d) for f, d in self.xcom_calls.get((ti["dag_run_id"], ti["task_id"]), [])]
        return calls


def breakdown(run: dict[str, Any], src: Sources) -> dict[str, Any]:
    """Per task: the segments (None where a source lacks the mark) and the off-path figures."""
    tasks = []
    prev_end, prev_state = run["start"], None
    for ti in run["tis"]:
        key = (ti["dag_run_id"], ti["task_id"])
        q, s, e = _t(ti["queued_when"]), _t(ti["start_date"]), _t(ti["end_date"])
        calls = src.api_calls(ti)
        finish_of = {op: f for op, f, _ in calls}
        marks = task_log_marks(src.logs, ti["dag_run_id"], ti["task_id"])
        seg: dict[str, float | None] = dict.fromkeys(n for n, _, _ in SEGMENTS)
        seg["to_queued"], seg["to_start"], seg["running"] = q - prev_end, s - q, e - s
        if prev_state is not None:
            seg["report"], seg["scheduler"] = prev_state - prev_end, q - prev_state
        elif ti is run["tis"][0]:
            seg["scheduler"] = q - prev_end  # the first task: run start -> queued is the scheduler's alone
        if src.worker is not None and key in src.started:
            launched = src.started[key]
            fetched = max((f for f in src.job_fetches if f <= launched + 0.005), default=None)
            if fetched is not None and fetched >= q - 0.005:
                seg["pickup"], seg["launch"] = fetched - q, launched - fetched
                if (job_q := run["edge_jobs"].get(ti["task_id"])) is not None:
                    seg["edge_job"], seg["fetch_wait"] = job_q - q, fetched - job_q
            seg["startup"] = s - launched
        if {"first", "parsed", "done"} <= marks.keys():
            seg["run_call"], seg["parse"] = marks["first"] - s, marks["parsed"] - marks["first"]
            seg["execute"], seg["finish"] = marks["done"] - marks["parsed"], e - marks["done"]
        rtif_answer = finish_of.get("rtif", src.kept_at.get((_norm(ti["id"]), "rtif")))
        state_sent = next((f - d for op, f, d in calls if op == "state"), None)
        off: dict[str, float | None] = {
            "rtif_to_task": marks["pre_end"] - rtif_answer if rtif_answer is not None and "pre_end" in marks else None,
            "xcom_to_state": state_sent - finish_of["xcom"] if state_sent is not None and "xcom" in finish_of else None,
            "supervisor_exit": src.exited[key] - e if key in src.exited else None,
            "edge_success": src.edge_success[key] - e if key in src.edge_success else None,
        }
        tasks.append({"task_id": ti["task_id"], "state": ti["state"], "segments": seg, "off_path": off,
                      "api_calls": {op: round(d, 4) for op, _, d in calls}, "api_call_count": len(calls),
                      "api_server_s": sum(d for _, _, d in calls), "gateway_kept": src.kept.get(_norm(ti["id"]), 0)})
        prev_end, prev_state = e, finish_of.get("state")
    tail = run["end"] - prev_end
    makespan = run["end"] - run["start"]
    coarse = sum(t["segments"][n] for t in tasks for n, _, p in SEGMENTS if p is None) + tail
    if abs(coarse - makespan) > 0.002:
        raise AssertionError(f"segments add up to {coarse:.3f}s, the makespan is {makespan:.3f}s")
    fetch_rate = sum(1 for f, _ in src.fetches if run["start"] <= f <= run["end"]) / makespan
    edge_s = sum(d for f, d in src.edge if run["start"] <= f <= run["end"])
    req_rate = sum(1 for f in src.requests if run["start"] <= f <= run["end"]) / makespan
    return {"run_id": run["run_id"], "state": run["state"], "makespan_s": makespan, "tail_s": tail, "tasks": tasks,
            "fetches_per_s": fetch_rate, "api_requests_per_s": req_rate, "edge_server_s": edge_s,
            "fetch_server_s": [d for f, d in src.fetches if run["start"] <= f <= run["end"]]}


def chain_sum(run: dict[str, Any], name: str) -> float | None:
    """One segment summed over a run's tasks; None unless every task has it (the first has no report)."""
    values = [t["segments"][name] for t in run["tasks"]]
    needed = values[1:] if name == "report" else values
    return sum(v for v in values if v is not None) if needed and all(v is not None for v in needed) else None


def summarise(label: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    tasks = [t for r in runs for t in r["tasks"]]
    per_task = {n: median([t["segments"][n] for t in tasks if t["segments"][n] is not None]) for n, _, _ in SEGMENTS}
    per_chain = {n: median([x for r in runs if (x := chain_sum(r, n)) is not None]) for n, _, _ in SEGMENTS}
    ops: dict[str, list[float]] = {}
    for t in tasks:
        for op, d in t["api_calls"].items():
            ops.setdefault(op, []).append(d)
    return {
        "label": label,
        "makespan_s": median([r["makespan_s"] for r in runs]),
        "makespans_s": [round(r["makespan_s"], 3) for r in runs],
        "tail_s": median([r["tail_s"] for r in runs]),
        "per_task_median_s": per_task,
        "per_chain_median_s": per_chain,
        "off_path_median_s": {n: median([t["off_path"][n] for t in tasks if t["off_path"][n] is not None]) for n, _ in OFF_PATH},
        "api_calls_per_task": median([t["api_call_count"] for t in tasks]),
        "api_server_s_per_task": median([t["api_server_s"] for t in tasks]),
        "api_server_median_s_by_call": {op: median(v) for op, v in sorted(ops.items())},
        "gateway_kept_per_task": median([t["gateway_kept"] for t in tasks]),
        "edge_server_s_per_chain": median([r["edge_server_s"] for r in runs]),
        "fetch_server_median_s": median([d for r in runs for d in r["fetch_server_s"]]),
        "fetches_per_s": median([r["fetches_per_s"] for r in runs]),
        "api_requests_per_s": median([r["api_requests_per_s"] for r in runs]),
        "all_success": all(r["state"] == "success" for r in runs),
        "runs": runs,
    }


def _f(value: float | None, width: int = 8, scale: float = 1.0) -> str:
    return f"{value * scale:{width}.3f}" if value is not None else f"{'-':>{width}}"


def print_table(results: list[dict[str, Any]]) -> None:
    """Medians per task and per chain for every contender; diff = the first (outpost) - the second (floor)."""
    out = results[0]
    names = [r["short"] for r in results] + ["diff"]
    w = 10 * len(names)
    print(f"{'':42} {'per task (s)':^{w}}   {'per chain of 8 (s)':^{w}}")
    hdr = f"{'segment (medians)':42} " + "".join(f"{n:>10}" for n in names) + "   " + "".join(f"{n:>10}" for n in names)
    print(hdr)
    print("-" * len(hdr))

    def row(label: str, task: list[float | None] | None, chain: list[float | None]) -> None:
        def cells(v: list[float | None]) -> str:
            d = v[0] - v[1] if v[0] is not None and v[1] is not None else None
            return "".join(" " + _f(x, 9) for x in [*v, d])
        print(f"{label:42} {cells(task) if task else ' ' * w}   {cells(chain)}")

    for n, label, _ in SEGMENTS:
        row(label, [r["per_task_median_s"][n] for r in results], [r["per_chain_median_s"][n] for r in results])
    row("last end_date -> run end", None, [r["tail_s"] for r in results])
    row("sum of the coarse segments (chain medians)", None,
        [sum(r["per_chain_median_s"][n] or 0 for n, _, p in SEGMENTS if p is None) + r["tail_s"] for r in results])
    row("makespan (median of runs)", None, [r["makespan_s"] for r in results])
    print()
    for r in results[1:]:
        print(f"makespans: outpost {out['makespans_s']}, {r['short']} {r['makespans_s']}; "
              f"outpost / {r['short']} = {out['makespan_s'] / r['makespan_s']:.2f}x")
    print("\nwaits inside the segments, and after a task's end (median per task, s):")
    for n, label in OFF_PATH:
        print(f"  {label:42} " + "  ".join(f"{r['short']} {_f(r['off_path_median_s'][n])}" for r in results))
    print("  Execution API calls per task: " + ", ".join(f"{r['short']} {r['api_calls_per_task']}" for r in results)
          + "; API server time per task: " + ", ".join(f"{r['short']} {_f(r['api_server_s_per_task'], 0)} s" for r in results))
    for op in sorted({op for r in results for op in r["api_server_median_s_by_call"]}):
        print(f"    {op:10} server time, median: "
              + "  ".join(f"{r['short']} {_f(r['api_server_median_s_by_call'].get(op))}" for r in results))
    print(f"  outpost's own Edge API requests: {out['edge_server_s_per_chain']:.3f} s of API server time per chain "
          f"(fetch median {_f(out['fetch_server_median_s'], 0)} s); Execution API calls answered by the gateway itself "
          f"per task: {out['gateway_kept_per_task']}")
    print("  requests/s at the API server during a chain: "
          + ", ".join(f"{r['short']} {r['api_requests_per_s']:.1f}" for r in results)
          + f" (outpost's fetches: {out['fetches_per_s']:.1f})")
    print("\nCPU seconds per chain (process tree = main process + children, reaped ones included):")
    empty = {"tree": None, "main": None, "children": None}
    for n in dict.fromkeys(k for r in results for k in r["cpu_s_per_chain"]):
        print(f"  {n:26} " + "   ".join(
            f"{r['short']} {_f(c['tree'], 6)} ({_f(c['main'], 0)} + {_f(c['children'], 0)})"
            for r in results for c in [r["cpu_s_per_chain"].get(n, empty)]))
    print(f"  {'total':26} " + "   ".join(
        f"{r['short']} {sum(c['tree'] for c in r['cpu_s_per_chain'].values()):.3f} "
        f"(on average {sum(c['tree'] for c in r['cpu_s_per_chain'].values()) / r['makespan_s']:.2f} of 2 cores busy)"
        for r in results))


def measure(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Run both contenders; the raw runs, CPU figures and where their logs are (saved as raw.json)."""
    raw: dict[str, Any] = {"work": str(work)}
    with ControlPlane(dags_folder=DAGS, home=work / "airflow") as cp:
        cp.wait_for_dag(DAG)
        worker = Outpost("outpost", cp, work)
        worker.log_level = "INFO"
        print(f"running outpost (concurrency {worker.concurrency}) ...", flush=True)
        worker.start()
        try:
            time.sleep(3)
            for _ in range(args.warmup):
                run_chain(cp)
            assert worker.proc is not None
            before = cpu_snapshot(cp, worker.proc.pid)
            runs = [run_chain(cp, edge_jobs=True) for _ in range(args.runs)]
            raw["outpost"] = {"runs": runs, "cpu": cpu_per_chain(before, cpu_snapshot(cp, worker.proc.pid), args.runs),
                              "worker": worker.name}
        finally:
            worker.stop()
        for key, heartbeat in (("floor", 5), ("floor_hb1", 1)):
            print(f"running LocalExecutor (floor, parallelism {BASE_CONCURRENCY}, min_heartbeat_interval {heartbeat}) ...",
                  flush=True)
            use_floor(cp, BASE_CONCURRENCY, heartbeat)
            for _ in range(args.warmup):
                run_chain(cp)
            before = cpu_snapshot(cp)
            runs = [run_chain(cp) for _ in range(args.runs)]
            raw[key] = {"runs": runs, "cpu": cpu_per_chain(before, cpu_snapshot(cp), args.runs)}
    (work / "raw.json").write_text(json.dumps(raw))
    return raw


def analyse(raw: dict[str, Any]) -> list[dict[str, Any]]:
    work = Path(raw["work"])
    name = raw["outpost"]["worker"]
    src = Sources(work / "airflow", work / f"{name}-logs", name, work / f"{name}-state", work / f"{name}.log")
    results = [summarise("outpost", [breakdown(r, src) for r in raw["outpost"]["runs"]])]
    results[0].update(short="outpost", cpu_s_per_chain=raw["outpost"]["cpu"])
    src = Sources(work / "airflow", work / "airflow" / "logs")
    for key, label, short in (("floor", "LocalExecutor (floor)", "floor"),
                              ("floor_hb1", "LocalExecutor, min_heartbeat_interval=1", "floor-hb1")):
        if key in raw:
            results.append(summarise(label, [breakdown(r, src) for r in raw[key]["runs"]]))
            results[-1].update(short=short, cpu_s_per_chain=raw[key]["cpu"])
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3, help="counted chain runs per contender")
    ap.add_argument("--warmup", type=int, default=1, help="uncounted chain runs first, per contender")
    ap.add_argument("--reanalyse", type=Path, metavar="RAW_JSON", help="analyse a kept run again (its work folder's raw.json)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "chain-breakdown.json")
    args = ap.parse_args()
    if args.reanalyse:
        raw = json.loads(args.reanalyse.read_text())
        args.runs = len(raw["outpost"]["runs"])
    else:
        raw = measure(args, Path(tempfile.mkdtemp(prefix="outpost-bench-breakdown-")))
    print(f"raw data and logs: {raw['work']}")
    results = analyse(raw)
    print(f"\nmachine: {machine()}\n")
    print_table(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine(), "date": datetime.now().isoformat(timespec="seconds"),
                                    "dag": DAG, "concurrency": BASE_CONCURRENCY, "runs": args.runs,
                                    "warmup_runs": args.warmup, "segments": {n: lbl.strip() for n, lbl, _ in SEGMENTS},
                                    "results": results}, indent=1))
    print(f"\nwritten {args.out}")
    return 0 if all(r["all_success"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
