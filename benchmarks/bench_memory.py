"""Memory benchmark: PSS of the whole worker process tree with N running tasks, outpost against
the stock ``airflow edge worker`` on one control plane, in one run.

For each worker, N in ``--tasks`` (default 1, 8, 32) and each task kind (a sleeping no-op, and one
that first imports pyarrow and the SQL provider), the worker is started with concurrency N, the
``bench_memory`` DAG maps N tasks that hold their slot, and once all N run (and a settle time has
passed) the PSS of every process in the worker's tree is read from ``/proc/<pid>/smaps_rollup``.
PSS counts a page shared by k processes as 1/k in each, so the tree's sum is the memory the tree
really costs. For the heavy kind, outpost also runs with ``--preload`` of what those tasks import.
Prints totals, the ratio to the stock worker, the per-task slope (least squares over
N) and the per-process breakdown; writes JSON to benchmarks/results/memory.json.

Where a task's private memory comes from: run as root (the kernel shows physical frame numbers in
``/proc/<pid>/pagemap`` only with CAP_SYS_ADMIN) and each task supervisor and task process is
also split page by page against the processes it was forked from (its parent and grandparent):
*shared* (the same physical page as there), *copied* (a page the ancestor has too, written since
the fork: copy-on-write) and *new* (memory the ancestors never had), and of those, *merged* (pages
the kernel's KSM merged with identical ones, ``/proc/kpageflags``). Without root that split is left
out and said so.

``merge`` in ``--workers`` adds outpost with ``--memory-merge true`` (and ``--preload`` for the heavy
kind). It needs KSM running on the host (``/sys/kernel/mm/ksm/run`` = 1, set by root: the benchmark
never changes it) and is left out, saying why, where it is not. Before sampling it waits for ksmd to
merge what it will (``--merge-wait-s``) and records how long that took, how much was merged, ksmd's
CPU time meanwhile and the host's KSM settings (its scan rate decides how fast pages merge).

Usage: python benchmarks/bench_memory.py [--tasks 1,8,32] [--kinds noop,heavy] [--workers stock,outpost,merge]
       [--settle-s 8] [--merge-wait-s 300] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import re
import struct
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import TypeVar

import httpx
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from airflow_outpost.worker.processes import memory_merge  # noqa: E402
from airflow_outpost.worker.testing.controlplane import ControlPlane  # noqa: E402
from benchmarks._machine import summary as machine  # noqa: E402
from benchmarks.bench_dispatch import DAGS, Contender, Outpost, Stock  # noqa: E402

MIB = 2**20
T = TypeVar("T")
# What the heavy tasks import: with --preload the zygote imports it once and every task shares it.
HEAVY_IMPORTS = "pyarrow,airflow.providers.common.sql.hooks.sql"


class OutpostPreload(Outpost):
    def argv_env(self) -> tuple[list[str], dict[str, str]]:
        argv, env = super().argv_env()
        return [*argv, "--preload", HEAVY_IMPORTS], env


class OutpostMerge(Outpost):
    """``--memory-merge true`` (README "Memory merging"), with ``--preload`` for the heavy kind."""

    def __init__(self, *args, preload: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.preload = preload

    def argv_env(self) -> tuple[list[str], dict[str, str]]:
        argv, env = super().argv_env()
        return [*argv, "--memory-merge", "true", *(["--preload", HEAVY_IMPORTS] if self.preload else [])], env


def ksmd_cpu_s() -> float | None:
    """CPU seconds the kernel's ksmd thread has used since boot (it scans for every process)."""
    for proc in psutil.process_iter(["name"]):
        if proc.info["name"] == "ksmd":
            try:
                times = proc.cpu_times()
            except psutil.Error:
                return None
            return times.user + times.system
    return None


def wait_for_merging(root_pid: int, bound_s: float, every_s: float = 10.0) -> tuple[float, int]:
    """Wait until ksmd has merged what it will of the tree's pages: some are merged and their count
    grew by under 2% in the last ``every_s`` (or ``bound_s`` passed). ksmd merges a page on its
    second pass over it, so with many tasks nothing is merged for a while: zero is not "done".
    Returns (seconds waited, merged pages)."""
    start = time.monotonic()
    last = 0
    while True:
        pids = [root_pid, *(p.pid for p in psutil.Process(root_pid).children(recursive=True))]
        now = memory_merge.merging_pages(pids)
        if (now > 0 and now <= last * 1.02) or time.monotonic() - start > bound_s:
            return round(time.monotonic() - start, 1), now
        last = now
        time.sleep(every_s)


def pss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


PAGE = 4096
PFN_MASK = (1 << 55) - 1
KPF_KSM = 1 << 21  # /proc/kpageflags: the frame is a KSM-merged page


def present_frames(pid: int) -> dict[int, int] | None:
    """Virtual page -> physical frame of every present page in ``pid``'s writable mappings (only
    those can be copied on write). None when unreadable or when the kernel hides frame numbers."""
    frames: dict[int, int] = {}
    try:
        maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
        with open(f"/proc/{pid}/pagemap", "rb") as pagemap:
            for line in maps:
                span, perms = line.split()[:2]
                if "w" not in perms:
                    continue
                lo, hi = (int(x, 16) // PAGE for x in span.split("-"))
                pagemap.seek(lo * 8)
                for i, (entry,) in enumerate(struct.iter_unpack("Q", pagemap.read((hi - lo) * 8))):
                    if entry >> 63:  # present in RAM
                        frames[lo + i] = entry & PFN_MASK
    except (OSError, ValueError):
        return None
    if frames and not any(frames.values()):  # frame numbers hidden: not CAP_SYS_ADMIN
        return None
    return frames


def page_origins(pid: int, ancestors: list[dict[int, int]]) -> dict[str, float] | None:
    """MiB of ``pid``'s present writable pages shared with, copied from, or new to its ancestors, and
    those (copied or new) that ksmd has merged with identical pages elsewhere (``merged``)."""
    mine = present_frames(pid)
    if mine is None:
        return None
    shared = copied = new = merged = 0
    with open("/proc/kpageflags", "rb") as flags:
        for page, frame in mine.items():
            theirs = [a[page] for a in ancestors if page in a]
            if frame in theirs:
                shared += 1
                continue
            flags.seek(frame * 8)
            (bits,) = struct.unpack("Q", flags.read(8) or bytes(8))
            if bits & KPF_KSM:  # a page ksmd merged: one copy for every process with the same content
                merged += 1
            elif theirs:
                copied += 1
            else:
                new += 1
    return {k: round(v * PAGE / MIB, 1)
            for k, v in (("shared", shared), ("copied", copied), ("new", new), ("merged", merged))}


def task_page_origins(root_pid: int, per_role: int = 4) -> dict[str, dict[str, float]] | str:
    """Mean page origins of up to ``per_role`` task supervisors and their task processes."""
    # Decided once, on the worker (alive while sampled): a task process that ends meanwhile also
    # reads as None, and must not be taken for hidden frame numbers.
    if present_frames(root_pid) is None:
        return "not measured: physical frame numbers need root (CAP_SYS_ADMIN)"
    root = psutil.Process(root_pid)
    sums: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    counts: dict[str, int] = defaultdict(int)
    frames_of: dict[int, dict[int, int] | None] = {}

    def frames(pid: int) -> dict[int, int] | None:
        if pid not in frames_of:
            frames_of[pid] = present_frames(pid)
        return frames_of[pid]

    for proc in root.children(recursive=True):
        name = role(proc, root)
        if name not in ("task supervisor", "task process") or counts[name] >= per_role:
            continue
        try:
            parent = proc.ppid()
            lineage = [parent, psutil.Process(parent).ppid()]
        except psutil.Error:
            continue
        ancestors = [f for f in (frames(p) for p in lineage) if f is not None]
        got = page_origins(proc.pid, ancestors) if ancestors else None
        if got is None:  # it (or its parent) ended since the listing
            continue
        counts[name] += 1
        for k, v in got.items():
            sums[name][k] += v
    return {name: {k: round(v / counts[name], 1) for k, v in kinds.items()} for name, kinds in sums.items()}


def role(proc: psutil.Process, root: psutil.Process) -> str:
    """A short name for what a process in the worker's tree is."""
    try:
        line = " ".join(proc.cmdline())
        parent = proc.parent()
        grand = parent.parent() if parent else None
    except psutil.Error:
        return "gone"
    if proc.pid == root.pid:
        return "worker"
    if "--zygote" in line:
        return "zygote"
    if "model_service" in line:
        return "model service"
    if "raylet" in line or "gcs_server" in line:
        return "ray"
    # A task's supervisor is the worker's (stock) or the zygote's (outpost) child; its child is the task.
    if parent and (parent.pid == root.pid or "--zygote" in " ".join(parent.cmdline())):
        return "task supervisor"
    if grand and (grand.pid == root.pid or "--zygote" in " ".join(grand.cmdline())):
        return "task process"
    return re.sub(r"\d+", "N", line[:60]) or proc.name()


def tree_pss(root_pid: int) -> tuple[int, dict[str, dict[str, float]]]:
    root = psutil.Process(root_pid)
    procs = [root, *root.children(recursive=True)]
    by_role: dict[str, dict[str, float]] = defaultdict(lambda: {"count": 0, "pss_mib": 0.0, "rss_mib": 0.0})
    total = 0
    for p in procs:
        pss = pss_bytes(p.pid)
        try:
            rss = p.memory_info().rss
        except psutil.Error:
            continue
        r = by_role[role(p, root)]
        r["count"] += 1
        r["pss_mib"] += pss / MIB
        r["rss_mib"] += rss / MIB
        total += pss
    return total, {k: {"count": v["count"], "pss_mib": round(v["pss_mib"], 1), "rss_mib": round(v["rss_mib"], 1)}
                   for k, v in sorted(by_role.items())}


def _patient(call: Callable[[], T], tries: int = 10) -> T:
    """``call()``, retried while the API server is too busy to answer in time (32 tasks on 2 cores)."""
    for attempt in range(tries):
        try:
            return call()
        except httpx.TimeoutException:
            if attempt == tries - 1:
                raise
            time.sleep(2)
    raise AssertionError("unreachable")


def running_holds(cp: ControlPlane, run_id: str) -> int:
    tis = _patient(lambda: cp.task_instances("bench_memory", run_id))
    return sum(1 for ti in tis if ti["task_id"] == "hold" and ti["state"] == "running")


def measure(contender: Contender, cp: ControlPlane, n: int, heavy: bool, settle_s: float, sleep_s: float,
            merge_wait_s: float = 0.0) -> dict:
    contender.concurrency = n
    merging = isinstance(contender, OutpostMerge)
    if merging:
        sleep_s += merge_wait_s
    contender.start()
    merge: dict = {}
    try:
        assert contender.proc is not None
        run_id = _patient(lambda: cp.trigger("bench_memory", conf={"n": n, "sleep": sleep_s, "heavy": heavy}))
        deadline = time.monotonic() + sleep_s
        while running_holds(cp, run_id) < n:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{contender.label}: only {running_holds(cp, run_id)}/{n} tasks running after {sleep_s}s")
            time.sleep(0.5)
        time.sleep(settle_s)  # the tasks have imported what they import and sleep
        if merging:
            cpu_before = ksmd_cpu_s()
            waited, pages = wait_for_merging(contender.proc.pid, merge_wait_s)
            cpu_after = ksmd_cpu_s()
            merge = {"waited_s": waited, "merging_mib": round(pages * PAGE / MIB, 1),
                     "ksmd_cpu_s_while_waiting": None if cpu_before is None or cpu_after is None
                     else round(cpu_after - cpu_before, 2)}
        still = running_holds(cp, run_id)
        total, breakdown = tree_pss(contender.proc.pid)
        origins = task_page_origins(contender.proc.pid)
        state = _patient(lambda: cp.wait_for_run("bench_memory", run_id, timeout_s=sleep_s + 300))
    finally:
        contender.stop()
    return {"label": contender.label, "tasks": n, "heavy": heavy, "running_at_sample": still,
            "pss_mib": round(total / MIB, 1), "breakdown": breakdown, "page_origins_mib": origins, "state": state,
            **({"memory_merge": merge} if merging else {})}


def slope(points: list[tuple[int, float]]) -> float:
    """MiB per additional running task (least squares)."""
    if len(points) < 2:
        return float("nan")
    mx = sum(x for x, _ in points) / len(points)
    my = sum(y for _, y in points) / len(points)
    den = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / den if den else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default="1,8,32", help="comma-separated numbers of running tasks")
    ap.add_argument("--kinds", default="noop,heavy", help="noop, heavy, or both")
    ap.add_argument("--workers", default="stock,outpost,merge",
                    help="comma-separated: stock, outpost, merge (outpost --memory-merge; needs KSM running on the host)")
    ap.add_argument("--settle-s", type=float, default=8.0, help="wait after all tasks run, before sampling")
    ap.add_argument("--merge-wait-s", type=float, default=300.0,
                    help="with --memory-merge: longest wait for ksmd to merge the tasks' pages before sampling")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "memory.json")
    args = ap.parse_args()
    counts = [int(x) for x in args.tasks.split(",")]
    kinds = args.kinds.split(",")
    sleep_s = 40 + 2 * max(counts)  # long enough for the slowest worker to start all of them
    ksm = memory_merge.host_settings()
    merging = "merge" in args.workers.split(",")
    if merging:
        # Not changed here: KSM is the host's (root's) decision, and its scan rate decides the figures.
        why = memory_merge.unsupported_reason() or (None if memory_merge.host_running() else
                                                     "KSM is not running on this host (as root: echo 1 > "
                                                     f"{memory_merge.KSM_SYSFS}/run)")
        if why is not None:
            print(f"outpost --memory-merge left out: {why}", flush=True)
            merging = False
    work = Path(tempfile.mkdtemp(prefix="outpost-bench-memory-"))
    results: list[dict] = []
    partial = args.out.with_suffix(".partial.json")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with ControlPlane(dags_folder=DAGS, home=work / "airflow") as cp:
        cp.wait_for_dag("bench_memory")
        for kind in kinds:
            for n in counts:
                chosen = args.workers.split(",")
                contenders: list[Contender] = []
                if "stock" in chosen:
                    contenders.append(Stock("stock", cp, work, 1))
                if "outpost" in chosen:
                    contenders.append(Outpost("outpost", cp, work))
                    if kind == "heavy":
                        contenders.append(OutpostPreload("outpost --preload", cp, work))
                if merging:
                    contenders.append(OutpostMerge("outpost --memory-merge" + (" --preload" if kind == "heavy" else ""),
                                                   cp, work, preload=kind == "heavy"))
                for c in contenders:
                    print(f"{c.label}: {n} {kind} task(s) ...", flush=True)
                    results.append(measure(c, cp, n, kind == "heavy", args.settle_s, sleep_s, args.merge_wait_s))
                    partial.write_text(json.dumps(results, indent=1))  # a later failure keeps these
    print(f"\nmachine: {machine()}; KSM: {ksm or 'not available'}\n")
    print(f"{'kind':6} {'tasks':>5} {'stock MiB':>10} {'outpost MiB':>12} {'x stock':>8}  worker")
    for kind in kinds:
        for n in counts:
            got = {r["label"]: r["pss_mib"] for r in results if r["tasks"] == n and r["heavy"] == (kind == "heavy")}
            s = got.get("stock", float("nan"))
            for label, o in got.items():
                if label != "stock":
                    print(f"{kind:6} {n:5d} {s:10.1f} {o:12.1f} {o / s:8.2f}  {label}")
    slopes = {}
    for kind in kinds:
        for lab in sorted({r["label"] for r in results if r["heavy"] == (kind == "heavy")}):
            pts = [(r["tasks"], r["pss_mib"]) for r in results if r["label"] == lab and r["heavy"] == (kind == "heavy")]
            slopes[f"{lab}/{kind}"] = round(slope(pts), 1)
    print("\nMiB per running task (slope):", ", ".join(f"{k} {v}" for k, v in slopes.items()))
    print("\nbreakdown (PSS MiB, count):")
    for r in results:
        parts = ", ".join(f"{k} {v['pss_mib']} ({v['count']})" for k, v in r["breakdown"].items())
        print(f"  {r['label']:17} {'heavy' if r['heavy'] else 'noop':5} n={r['tasks']:<3} {parts}")
    for r in results:
        if "memory_merge" in r:
            m = r["memory_merge"]
            print(f"  {r['label']} {'heavy' if r['heavy'] else 'noop'} n={r['tasks']}: {m['merging_mib']} MiB of the "
                  f"tree's pages merged after {m['waited_s']} s; ksmd used {m['ksmd_cpu_s_while_waiting']} CPU-s meanwhile")
    print("\npages of one task's processes against those it was forked from "
          "(MiB each: shared / copied / new / merged by KSM):")
    for r in results:
        origins = r["page_origins_mib"]
        parts = origins if isinstance(origins, str) else ", ".join(
            f"{k} {v['shared']} / {v['copied']} / {v['new']} / {v.get('merged', 0)}" for k, v in sorted(origins.items()))
        print(f"  {r['label']:17} {'heavy' if r['heavy'] else 'noop':5} n={r['tasks']:<3} {parts}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine(), "date": datetime.now().isoformat(timespec="seconds"),
                                    "ksm_host_settings": ksm,
                                    "slopes_mib_per_task": slopes, "results": results}, indent=1))
    partial.unlink(missing_ok=True)
    print(f"\nwritten {args.out}")
    return 0 if all(r["running_at_sample"] == r["tasks"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
