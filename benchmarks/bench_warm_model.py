"""Warm models: time to first vector for the first and the second embedding task on a worker.

Each "task" is a fresh Python process (as the worker starts one per task) that imports the
runners, gets an embedder and embeds one text; the figure is wall time from process start to
the first vector. Measured in the same run:

* local: ``Embedder(model)`` in the task (what every task pays without the service);
* service, first task: the task starts the model service, which loads the model;
* service, second task: the service already holds the model.

    python benchmarks/bench_warm_model.py [--quick] [--backend torch|ct2-int8|onnx-int8|auto] [--repeat N]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._machine import summary  # noqa: E402

TASK = """
import json, sys, time
t0 = float(sys.argv[1])
from airflow_outpost.runners import Embedder, ModelClient, ServiceEmbedder
mode, backend, sock = sys.argv[2], sys.argv[3], sys.argv[4]
if mode == "local":
    e = Embedder(None, device="cpu", backend=backend)
else:
    e = ServiceEmbedder(None, device="cpu", backend=backend, client=ModelClient(sock))
e.embed(["the first vector of this task"])
print(json.dumps({"s": time.time() - t0, "loaded_now": getattr(e, "loaded_now", True)}))
"""


def task(mode: str, backend: str, sock: Path, env: dict[str, str]) -> dict:
    proc = subprocess.run([sys.executable, "-c", TASK, repr(time.time()), mode, backend, str(sock)],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=900, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{mode} task failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine() -> str:
    return f"{summary()}, load average {os.getloadavg()[0]:.1f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="torch", choices=["torch", "ct2", "ct2-int8", "onnx", "onnx-int8", "auto"])
    parser.add_argument("--repeat", type=int, default=3, help="rounds (each: fresh service)")
    parser.add_argument("--quick", action="store_true", help="one round")
    args = parser.parse_args()
    rounds = 1 if args.quick else args.repeat
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    rows: dict[str, list[float]] = {"local": [], "first": [], "second": []}
    print(f"machine: {machine()}", flush=True)
    for r in range(rounds):
        folder = Path(tempfile.mkdtemp(prefix="bw-"))
        sock = folder / "s.sock"
        env["OUTPOST_STORE_ROOT"] = str(folder)  # ONNX builds are cached under the store's models/
        try:
            rows["local"].append(task("local", args.backend, sock, env)["s"])
            first = task("service", args.backend, sock, env)
            second = task("service", args.backend, sock, env)
            assert first["loaded_now"] and not second["loaded_now"], (first, second)
            rows["first"].append(first["s"])
            rows["second"].append(second["s"])
        finally:
            from airflow_outpost.runners import ModelClient

            ModelClient(sock, autostart=False).shutdown_service()
            time.sleep(1)
            shutil.rmtree(folder, ignore_errors=True)
        print(f"round {r + 1}: local {rows['local'][-1]:.2f}s, first {rows['first'][-1]:.2f}s, "
              f"second {rows['second'][-1]:.2f}s", flush=True)
    med = {k: statistics.median(v) for k, v in rows.items()}
    print(f"\nbackend {args.backend}, {rounds} round(s), medians; machine: {machine()}\n")
    print("| time to first vector | seconds | vs first task |")
    print("|---|---|---|")
    print(f"| local `Embedder` in the task | {med['local']:.2f} | {med['local'] / med['first']:.2f}x |")
    print(f"| service, first task (starts service, loads model) | {med['first']:.2f} | 1.00x |")
    print(f"| service, second task (model warm) | {med['second']:.2f} | **{med['second'] / med['first']:.3f}x** |")
    print(f"\nsecond task vs a local load: {med['second'] / med['local']:.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
