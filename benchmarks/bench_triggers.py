"""Local-triggers benchmark: 50 tasks that wait on an external condition, deferred to the worker's own
trigger runner (``outpost worker --triggers local``) against sensors in ``mode="reschedule"`` (the stock
way to wait without a triggerer), on one control plane, in one run.

The embedded control plane runs api-server, scheduler and dag-processor and no triggerer. The condition is
a flag on a loopback HTTP server the benchmark runs (127.0.0.1 only): 404 until the benchmark raises it,
then 200. Both contenders are ``outpost worker --concurrency 4`` on queue ``bench``:

* ``local triggers`` (``--triggers local``): the ``bench_triggers_local`` DAG's 50 mapped tasks each defer
  with a trigger that polls the flag every ``--poll-s`` (default 5 s, the sensors' ``poke_interval``);
* ``reschedule sensors`` (default ``--triggers central``): the ``bench_triggers_reschedule`` DAG's 50 mapped
  sensors poke the same flag with ``mode="reschedule"``, ``poke_interval=5``.

Once the tasks are in their steady state (local: ``status.json`` says 50 wait on local triggers;
reschedule: at least ``--steady-s`` after the run started and every sensor has poked once, at most
``--steady-max-s``), it samples for ``--window-s``: the PSS of the worker's whole process tree
(``/proc/<pid>/smaps_rollup``, as bench_memory.py), the task slots held (``concurrency - free_slots`` from
``status.json``), which of the 50 tasks checked the flag (the flag server counts each task's GETs), the
worker's Edge API requests/s (``status.json`` ``requests_per_s``) and every control-plane request the
worker's tree made (Edge and Execution API, from the API server's access log). Then it raises the flag
and times until every task succeeded. Prints local vs reschedule ratios and writes JSON to
benchmarks/results/triggers.json.

Usage: python benchmarks/bench_triggers.py [--contenders local,reschedule] [--window-s 30] [--poll-s 5]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from collections import Counter, defaultdict
from datetime import datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from airflow_outpost.worker.testing.controlplane import ControlPlane  # noqa: E402
from airflow_outpost.worker.testing.flag_server import FlagServer  # noqa: E402
from benchmarks._machine import summary as machine  # noqa: E402
from benchmarks.bench_dispatch import DAGS, Outpost, _ts  # noqa: E402
from benchmarks.bench_memory import _patient, pss_bytes  # noqa: E402
from benchmarks.bench_memory import role as memory_role  # noqa: E402

MIB = 2**20
N = 50
ACCESS_RE = re.compile(r"^(\S+) .*\[http\.access\].*method=(\S+) path=(/(?:edge_worker/v1|execution)/\S*)")


class OutpostArgs(Outpost):
    """``outpost worker`` with its defaults, concurrency 4, plus ``extra`` arguments."""

    def __init__(self, label: str, cp: ControlPlane, work: Path, extra: list[str]) -> None:
        super().__init__(label, cp, work)
        self.extra = extra

    def argv_env(self) -> tuple[list[str], dict[str, str]]:
        argv, env = super().argv_env()
        return [*argv, *self.extra], env

    def status(self) -> dict:
        try:
            return json.loads((self.work / f"{self.name}-state" / "status.json").read_text())
        except (OSError, ValueError):
            return {}

    def log(self) -> str:
        path = self.work / f"{self.name}.log"
        return path.read_text(errors="replace") if path.exists() else ""


def tree_pss(root_pid: int) -> tuple[int, dict[str, dict[str, float]]]:
    """PSS of the worker's whole tree, by role (bench_memory's roles, plus the trigger runner)."""
    root = psutil.Process(root_pid)
    by_role: dict[str, dict[str, float]] = defaultdict(lambda: {"count": 0, "pss_mib": 0.0})
    total = 0
    for p in [root, *root.children(recursive=True)]:
        try:
            line = " ".join(p.cmdline())
        except psutil.Error:
            continue
        pss = pss_bytes(p.pid)
        r = by_role["trigger runner" if "triggers.runner" in line else memory_role(p, root)]
        r["count"] += 1
        r["pss_mib"] += pss / MIB
        total += pss
    return total, {k: {"count": v["count"], "pss_mib": round(v["pss_mib"], 1)} for k, v in sorted(by_role.items())}


def cp_requests(cp: ControlPlane, t0: float, t1: float) -> Counter[str]:
    """Edge and Execution API requests the API server logged between t0 and t1, by kind (the benchmark's
    own REST calls go to /api/v2 and are not counted; only the measured worker's tree talks to the rest)."""
    log = (cp.home / "cp-logs" / "api-server.log").read_text(errors="replace")  # type: ignore[operator]
    out: Counter[str] = Counter()
    for line in log.splitlines():
        m = ACCESS_RE.match(line)
        if m and t0 <= (_ts(m.group(1)) or 0) <= t1:
            path = m.group(3)
            parts = path.removeprefix("/execution/").split("/")
            name = "/".join(["task-instances", "ID", *parts[2:]]) if parts[0] == "task-instances" else parts[0]
            kind = "edge" if path.startswith("/edge_worker/") else f"execution {m.group(2)} {name}"
            out[kind] += 1
    return out


def state_counts(cp: ControlPlane, dag_id: str, run_id: str) -> dict[str, int]:
    tis = _patient(lambda: cp.task_instances(dag_id, run_id))
    return dict(Counter(str(ti["state"]) for ti in tis))


def wait_steady(c: OutpostArgs, cp: ControlPlane, flag: FlagServer, dag_id: str, run_id: str, t_start: float,
                args: argparse.Namespace) -> dict:
    """Block until the tasks are in their steady state, bounded; how long that took and whether it was reached."""
    if c.name == "local-triggers":
        deadline = time.monotonic() + args.defer_max_s
        while time.monotonic() < deadline:
            lt = c.status().get("local_triggers") or {}
            if lt.get("waiting", 0) >= N:
                return {"reached": True, "all_waiting_after_s": round(time.time() - t_start, 1)}
            if c.proc is not None and c.proc.poll() is not None:
                raise RuntimeError(f"{c.label}: the worker exited: {c.log()[-3000:]}")
            time.sleep(0.5)
        lt = c.status().get("local_triggers") or {}
        return {"reached": False, "waiting_at_bound": lt.get("waiting"), "bound_s": args.defer_max_s,
                "states": state_counts(cp, dag_id, run_id)}
    end_min, end_max = t_start + args.steady_s, t_start + args.steady_max_s
    while time.time() < end_max:
        poked = {i for _, i in flag.hits_between(t_start, time.time())}
        if time.time() >= end_min and len(poked) >= N:
            return {"reached": True, "all_poked_once_after_s": round(time.time() - t_start, 1)}
        if c.proc is not None and c.proc.poll() is not None:
            raise RuntimeError(f"{c.label}: the worker exited: {c.log()[-3000:]}")
        time.sleep(0.5)
    poked = {i for _, i in flag.hits_between(t_start, time.time())}
    return {"reached": len(poked) >= N, "poked_once_at_bound": len(poked), "bound_s": args.steady_max_s}


def foreign_pytest() -> int:
    """Processes of a test run going on beside the benchmark (it would share the 2 cores)."""
    n = 0
    for p in psutil.process_iter(["cmdline"]):
        if "pytest" in " ".join(p.info["cmdline"] or []):
            n += 1
    return n


def sample(c: OutpostArgs, cp: ControlPlane, flag: FlagServer, dag_id: str, run_id: str, window_s: float) -> dict:
    assert c.proc is not None
    st0 = c.status()
    t0 = time.time()
    foreign = foreign_pytest()
    slots: list[int] = []
    waiting: list[int] = []
    pss: list[tuple[int, dict]] = []
    states: list[dict[str, int]] = []
    next_pss = next_states = 0.0
    while time.time() < t0 + window_s:
        now = time.time()
        st = c.status()
        if st:
            slots.append(st["concurrency"] - st["free_slots"])
            waiting.append((st.get("local_triggers") or {}).get("waiting", 0))
        if now >= next_pss:
            pss.append(tree_pss(c.proc.pid))
            next_pss = now + 3
        if now >= next_states:
            states.append(state_counts(cp, dag_id, run_id))
            next_states = now + 10
        time.sleep(max(0.0, 1.0 - (time.time() - now)))
    t1 = time.time()
    st1 = c.status()
    hits = flag.hits_between(t0, t1)
    per_task: dict[int, list[float]] = defaultdict(list)
    for t, i in hits:
        per_task[i].append(t)
    gaps = [b - a for ts in per_task.values() for a, b in zip(ts, ts[1:], strict=False)]
    r0, r1 = st0.get("requests_per_s") or {}, st1.get("requests_per_s") or {}
    edge_dt = (st1.get("updated", t1) - st0.get("updated", t0)) or window_s
    cp_reqs = cp_requests(cp, t0, t1)
    totals = sorted(pss, key=lambda x: x[0])
    median_pss = totals[len(totals) // 2]
    return {
        "window_s": round(t1 - t0, 1),
        "pss_mib_median": round(median_pss[0] / MIB, 1), "pss_mib_max": round(totals[-1][0] / MIB, 1),
        "pss_samples": len(pss), "pss_breakdown_at_median": median_pss[1],
        "slots_held_mean": round(statistics.mean(slots), 2) if slots else None,
        "slots_held_max": max(slots, default=None), "slot_samples": slots,
        "local_triggers_waiting_mean": round(statistics.mean(waiting), 1) if waiting else None,
        "tasks_checked_flag": len(per_task), "flag_checks": len(hits),
        "flag_checks_per_s": round(len(hits) / (t1 - t0), 2),
        "checks_per_task_min_median_max": [min((len(v) for v in per_task.values()), default=0),
                                           statistics.median(len(v) for v in per_task.values()) if per_task else 0,
                                           max((len(v) for v in per_task.values()), default=0)],
        "check_interval_s_median": round(statistics.median(gaps), 1) if gaps else None,
        "check_interval_s_max": round(max(gaps), 1) if gaps else None,
        "edge_requests_per_s": round((r1.get("total", 0) - r0.get("total", 0)) / edge_dt, 3),
        "cp_requests_per_s": round(sum(cp_reqs.values()) / (t1 - t0), 3),
        "cp_requests_by_kind": dict(cp_reqs.most_common()),
        "task_states": states,
        "pytest_processes_beside": [foreign, foreign_pytest()],
    }


def after_flag(c: OutpostArgs, cp: ControlPlane, flag: FlagServer, dag_id: str, run_id: str, timeout_s: float) -> dict:
    t_flag = time.time()
    flag.up.set()
    try:
        state = _patient(lambda: cp.wait_for_run(dag_id, run_id, timeout_s=timeout_s))
    except Exception as exc:  # bounded: report what finished
        state = f"not finished ({type(exc).__name__}: {exc})"
    t_seen = time.time()
    tis = _patient(lambda: cp.task_instances(dag_id, run_id))
    ends = sorted((_ts(ti["end_date"]) or t_seen) - t_flag for ti in tis if ti["state"] == "success")
    return {
        "run_state": state,
        "succeeded": len(ends),
        "all_done_after_flag_s": round(ends[-1], 2) if len(ends) == N else None,
        "first_done_after_flag_s": round(ends[0], 2) if ends else None,
        "median_done_after_flag_s": round(statistics.median(ends), 2) if ends else None,
        "seen_done_after_flag_s": round(t_seen - t_flag, 2),
        "states": dict(Counter(str(ti["state"]) for ti in tis)),
        "try_numbers": dict(Counter(int(ti["try_number"]) for ti in tis)),
    }


def log_problems(text: str) -> list[str]:
    return [line[:300] for line in text.splitlines() if re.search(r"ERROR|CRITICAL|Traceback|error", line)][:40]


def measure(c: OutpostArgs, cp: ControlPlane, flag: FlagServer, dag_id: str, conf: dict, args: argparse.Namespace) -> dict:
    flag.reset()
    c.start()
    try:
        t_start = time.time()
        run_id = _patient(lambda: cp.trigger(dag_id, conf=conf))
        steady = wait_steady(c, cp, flag, dag_id, run_id, t_start, args)
        print(f"  steady state: {steady}", flush=True)
        sampled = sample(c, cp, flag, dag_id, run_id, args.window_s)
        print(f"  sampled: PSS {sampled['pss_mib_median']} MiB, slots held {sampled['slots_held_mean']}, "
              f"{sampled['tasks_checked_flag']} tasks checked the flag, {sampled['cp_requests_per_s']} req/s", flush=True)
        done = after_flag(c, cp, flag, dag_id, run_id, args.done_max_s)
        print(f"  after the flag: {done}", flush=True)
        final = c.status()
    finally:
        c.stop()
    return {"label": c.label, "dag_id": dag_id, "run_id": run_id, "steady": steady, "sample": sampled, "done": done,
            "worker_finished": final.get("finished"), "local_triggers_final": final.get("local_triggers"),
            "worker_log_problems": log_problems(c.log()), "worker_log": str(c.work / f"{c.name}.log")}


def versions() -> dict[str, str]:
    out = {}
    for dist in ("apache-airflow", "apache-airflow-providers-edge3", "airflow-outpost"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "?"
    return out


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a is not None and b else "n/a"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contenders", default="local,reschedule", help="local, reschedule, or both (ratios need both)")
    ap.add_argument("--window-s", type=float, default=30.0, help="sampling window in the steady state")
    ap.add_argument("--poll-s", type=float, default=5.0, help="the local trigger's poll interval (sensors: poke_interval=5)")
    ap.add_argument("--steady-s", type=float, default=60.0, help="reschedule: at least this long after the run started")
    ap.add_argument("--steady-max-s", type=float, default=90.0, help="reschedule: at most this long")
    ap.add_argument("--defer-max-s", type=float, default=150.0, help="local: at most this long until 50 wait")
    ap.add_argument("--done-max-s", type=float, default=180.0, help="after the flag: at most this long until all succeed")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "triggers.json")
    args = ap.parse_args()
    t_begin = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="outpost-bench-triggers-"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    partial = args.out.with_suffix(".partial.json")
    flag = FlagServer()
    load_before = os.getloadavg()
    results: list[dict] = []
    try:
        with ControlPlane(dags_folder=DAGS, home=work / "airflow") as cp:
            cp.wait_for_dag("bench_triggers_local")
            cp.wait_for_dag("bench_triggers_reschedule")
            plan = {
                "local": (OutpostArgs("local triggers", cp, work, ["--triggers", "local"]), "bench_triggers_local",
                          {"url": flag.url, "poll_s": args.poll_s}),
                "reschedule": (OutpostArgs("reschedule sensors", cp, work, []), "bench_triggers_reschedule",
                               {"url": flag.url}),
            }
            for key in args.contenders.split(","):
                c, dag_id, conf = plan[key]
                print(f"{c.label}: {N} tasks on {dag_id} ...", flush=True)
                results.append(measure(c, cp, flag, dag_id, conf, args))
                partial.write_text(json.dumps(results, indent=1))  # a later failure keeps these
    finally:
        flag.close()
    load_after = os.getloadavg()
    by = {r["label"]: r for r in results}
    print(f"\nmachine: {machine()}, {versions()}, load average {load_before[0]:.2f} before, {load_after[0]:.2f} after\n")
    rows = [("worker tree PSS, median (MiB)", lambda r: r["sample"]["pss_mib_median"]),
            ("task slots held, mean (of 4)", lambda r: r["sample"]["slots_held_mean"]),
            ("tasks that checked the flag in the window", lambda r: r["sample"]["tasks_checked_flag"]),
            ("flag checks per task in the window (median)", lambda r: r["sample"]["checks_per_task_min_median_max"][1]),
            ("Edge API requests/s (status.json)", lambda r: r["sample"]["edge_requests_per_s"]),
            ("control-plane requests/s (access log)", lambda r: r["sample"]["cp_requests_per_s"]),
            ("all 50 succeeded, s after the flag", lambda r: r["done"]["all_done_after_flag_s"])]
    loc, res = by.get("local triggers"), by.get("reschedule sensors")
    print(f"{'':46} {'local':>9} {'reschedule':>11} {'local/resch.':>12}")
    for name, get in rows:
        a = get(loc) if loc else None
        b = get(res) if res else None
        print(f"{name:46} {a if a is not None else '-':>9} {b if b is not None else '-':>11} {ratio(a, b):>12}")
    for r in results:
        print(f"\n{r['label']}: PSS breakdown {r['sample']['pss_breakdown_at_median']}")
        print(f"  control-plane requests in the window: {r['sample']['cp_requests_by_kind']}")
        if r["worker_log_problems"]:
            print(f"  worker log ({r['worker_log']}) lines with errors:\n    " + "\n    ".join(r["worker_log_problems"][:10]))
    elapsed = time.monotonic() - t_begin
    args.out.write_text(json.dumps({
        "machine": machine(), "versions": versions(), "date": datetime.now().isoformat(timespec="seconds"),
        "load_average_before_after": [round(load_before[0], 2), round(load_after[0], 2)],
        "tasks": N, "concurrency": 4, "poll_s": args.poll_s, "poke_interval_s": 5, "window_s": args.window_s,
        "elapsed_s": round(elapsed, 1), "work_folder": str(work), "results": results}, indent=1))
    partial.unlink(missing_ok=True)
    print(f"\nwritten {args.out} ({elapsed:.0f} s)")
    return 0 if all(r["done"]["succeeded"] == N for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
