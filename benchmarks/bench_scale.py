"""Scaling of the embedding pipeline on Ray: chunks/s on 1 and 2 Ray CPUs, as a ratio in the same run.

Each configuration runs ``embed_corpus(engine="ray")`` in its own subprocess (a fresh Ray of its
own with ``--cpus`` CPUs, one model actor per CPU) over the same directory corpus, into a fresh
store, so nothing is resumed. Encoders: the stand-in (``tests.runners.store_writers.HashEmbedder``
with a per-call cost, ``--standin-ms`` per text, which stands for a model's compute), and the
packaged all-MiniLM-L6-v2 (``--model``; torch, 1 thread per actor).

    python benchmarks/bench_scale.py                 # a few minutes on 2 CPU cores
    python benchmarks/bench_scale.py --model         # also the packaged model
    python benchmarks/bench_scale.py --cpus 1,2,4,8,16 --partitions 32   # a larger host

Prints a table and writes JSON (``--out``, default benchmarks/results/scale.json) with the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

CHILD = r"""
import json, sys, time
import numpy as np
from tests.runners.store_writers import HashEmbedder
from airflow_outpost.runners.batch.ray_session import RayConfig
from airflow_outpost.runners.embeddings.corpus import EmbedConfig, embed_corpus

corpus, root, cpus, mode, ms = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], float(sys.argv[5])

class CostlyHash(HashEmbedder):
    def embed(self, texts):
        end = time.perf_counter() + ms * len(texts) / 1000.0
        out = super().embed(texts)
        while time.perf_counter() < end:  # burn CPU like a model would, not sleep
            pass
        return out

kw = {"embedder": CostlyHash()} if mode == "standin" else {"backend": "torch", "threads": 1, "device": "cpu"}
cfg = EmbedConfig(shard_rows=256, actors=cpus, cpus_per_actor=0.75, read_cpus=0.25)
t = time.perf_counter()
s = embed_corpus(corpus, store=root, name="b", engine="ray", ray_config=RayConfig(num_cpus=cpus), config=cfg, **kw)
print(json.dumps({"seconds": time.perf_counter() - t, "chunks": s["chunks"], "embedded": s["embedded"]}))
"""


def run(corpus: Path, cpus: int, mode: str, ms: float) -> dict:
    with tempfile.TemporaryDirectory() as root:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        out = subprocess.run([sys.executable, "-c", CHILD, str(corpus), root, str(cpus), mode, str(ms)],
                             capture_output=True, text=True, env=env, cwd=REPO, check=False)
        if out.returncode != 0:
            raise RuntimeError(out.stderr[-3000:])
        r = json.loads(out.stdout.strip().splitlines()[-1])
        r["chunks_per_s"] = r["embedded"] / r["seconds"]
        return r


def main() -> None:
    from benchmarks._machine import describe, summary
    from tests.runners.store_writers import write_partitions

    ap = argparse.ArgumentParser()
    ap.add_argument("--partitions", type=int, default=8)
    ap.add_argument("--docs", type=int, default=1000)
    ap.add_argument("--standin-ms", type=float, default=2.0)
    ap.add_argument("--model", action="store_true")
    ap.add_argument("--model-docs", type=int, default=200)
    ap.add_argument("--cpus", default="1,2", help="comma list of Ray CPU counts; ratios are against the first")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "scale.json"))
    args = ap.parse_args()
    cpu_counts = [int(c) for c in args.cpus.split(",")]
    results: dict = {"machine": describe(), "runs": []}
    with tempfile.TemporaryDirectory() as work:
        corpus = write_partitions(Path(work) / "corpus", args.partitions, args.docs)
        modes = [("standin", corpus)]
        if args.model:
            modes.append(("model", write_partitions(Path(work) / "small", args.partitions, args.model_docs)))
        for mode, path in modes:
            runs = {cpus: run(path, cpus, mode, args.standin_ms) for cpus in cpu_counts}
            base = runs[cpu_counts[0]]
            row: dict = {"encoder": mode, "chunks": base["embedded"]}
            for cpus, r in runs.items():
                row[f"cpu{cpus}_chunks_per_s"] = round(r["chunks_per_s"], 1)
            # "speedup" keeps its meaning in earlier results: the last count against the first.
            row["speedup"] = round(runs[cpu_counts[-1]]["chunks_per_s"] / base["chunks_per_s"], 2)
            results["runs"].append(row)
            rates = "  ".join(f"{c} CPU {row[f'cpu{c}_chunks_per_s']:8.1f}/s" for c in cpu_counts)
            print(f"{mode:8s} {row['chunks']:7d} chunks  {rates}  x{row['speedup']}", flush=True)
    print(summary(results["machine"]))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({**results, "written_at": time.time()}, indent=2))


if __name__ == "__main__":
    main()
