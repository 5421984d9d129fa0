"""Index benchmark: build time and recall@10 of Flat / IVF / HNSW; incremental 1% update vs rebuild.

Vectors are 384-d with low-dimensional structure (clusters in a 32-d latent space projected
up, plus noise, unit-normalised): random Gaussian vectors would make every neighbour equally
far and recall meaningless. All ratios come from the same run on the same machine.

    python benchmarks/bench_index.py --quick      # 100k vectors, a few minutes on 2 cores
    python benchmarks/bench_index.py              # 100k, all kinds
    python benchmarks/bench_index.py --full       # 1M vectors too (all kinds; ~30 min on 2 cores)
    python benchmarks/bench_index.py --large 5000000 --work /data/bench   # larger than memory:
        # IVF-Flat vs IVF-PQ (+ rerank) vs IVF-SQ8 (and on-disk IVF-PQ); shards generated streamed
        # to disk, each build in its own process so its peak RSS (wait4) is its own

``--large`` reports build seconds, peak RSS (and as a fraction of the raw float32 bytes),
index bytes, memory at search time and recall@10 with and without the rerank.

Prints one JSON line per measurement and writes them all to ``--out``
(default benchmarks/results/index.json).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from airflow_outpost.runners.bench.run import structured_vectors as structured  # noqa: E402
from airflow_outpost.runners.bench.run import write_vector_shard as write  # noqa: E402
from airflow_outpost.runners.index.build import IndexConfig, build_index, update_index  # noqa: E402
from benchmarks._machine import summary as machine  # noqa: E402


def run(n: int, dim: int, kinds: list[str], work: Path) -> list[dict]:
    emb = work / f"emb-{n}"
    x = structured(n, dim, seed=0)
    for i, start in enumerate(range(0, n, 100_000)):
        write(emb, f"shard-{i:04d}", x[start:start + 100_000], start)
    del x
    rows = []
    configs = {
        "flat": IndexConfig(kind="flat", min_recall=0.0),
        "ivf": IndexConfig(kind="ivf", nlist=1024 if n <= 200_000 else 4096, nprobe=32, min_recall=0.0),
        "hnsw": IndexConfig(kind="hnsw", hnsw_m=32, hnsw_ef_construction=80, hnsw_ef_search=64, min_recall=0.0),
    }
    for kind in kinds:
        out = build_index(emb, work / f"idx-{kind}-{n}", configs[kind])
        rows.append({"n": n, "kind": kind, "build_s": out["seconds"], "recall@10": out["recall"]})
        print(json.dumps(rows[-1]), flush=True)

    # Incremental: add 1% new vectors and delete 0.1%, vs a full rebuild of the same data (IVF).
    if "ivf" in kinds:
        add = structured(n // 100, dim, seed=1)
        write(emb, "shard-new", add, 10 * n)
        (emb / "deleted_ids.json").write_text(json.dumps(list(range(0, n, 1000))))
        inc = update_index(emb, work / f"idx-ivf-{n}")
        full = build_index(emb, work / f"idx-ivf-full-{n}", configs["ivf"])
        rows.append({"n": n, "kind": "ivf", "incremental_s": inc["seconds"], "incremental_recall@10": inc["recall"],
                     "rebuild_s": full["seconds"], "rebuild_recall@10": full["recall"],
                     "speedup": round(full["seconds"] / inc["seconds"], 1), "mode": inc["mode"]})
        print(json.dumps(rows[-1]), flush=True)
    return rows


LARGE_KINDS = {
    # Same lists, probes and training sample for every kind, so only the storage differs.
    # The README's recommendation for larger than memory: IVF-SQ8 with the rerank.
    "ivf": {"kind": "ivf", "nlist": 1024, "nprobe": 32, "train_sample": 65_536},
    "ivfpq": {"kind": "ivfpq", "nlist": 1024, "nprobe": 32, "train_sample": 65_536},
    "ivfsq8": {"kind": "ivfsq8", "nlist": 1024, "nprobe": 32, "train_sample": 65_536},
    "ivfpq-ondisk": {"kind": "ivfpq", "nlist": 1024, "nprobe": 32, "train_sample": 65_536, "on_disk": True,
                     "group_rows": 250_000},
    # Twice the codes of the default pq_m (96 bytes a vector, 4 dimensions per sub-quantizer) and a
    # deeper rerank: what IVF-PQ costs when its recall has to come near IVF-SQ8's.
    "ivfpq-m96": {"kind": "ivfpq", "nlist": 1024, "nprobe": 32, "train_sample": 65_536, "pq_m": 96,
                  "rerank_factor": 20},
}
_CHILD = """
import json, sys, time
from airflow_outpost.runners.index.build import IndexConfig, build_index
emb, idx, cfg = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
out = build_index(emb, idx, IndexConfig(min_recall=0.0, **cfg))
print(json.dumps(out))
"""


def write_streamed(emb: Path, n: int, dim: int, rows_per_shard: int = 100_000) -> int:
    """Write ``n`` structured vectors as shards, one shard in memory at a time; return raw bytes."""
    for i, start in enumerate(range(0, n, rows_per_shard)):
        if (emb / f"shard-{i:05d}.ids.npy").is_file():
            continue  # a rerun reuses what is there
        m = min(rows_per_shard, n - start)
        write(emb, f"shard-{i:05d}", structured(m, dim, seed=1000 + i), start)
    return n * dim * 4


def run_large(n: int, dim: int, kinds: list[str], work: Path) -> list[dict]:
    emb = work / f"emb-{n}"
    raw = write_streamed(emb, n, dim)
    rows = []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                         os.environ.get("PYTHONPATH", "")])}
    for name in kinds:
        idx = work / f"idx-{name}-{n}"
        proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(emb), str(idx), json.dumps(LARGE_KINDS[name])],
                                stdout=subprocess.PIPE, env=env, text=True)
        assert proc.stdout is not None
        stdout = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            rows.append({"n": n, "kind": name, "error": f"exit {proc.returncode}"})
            print(json.dumps(rows[-1]), flush=True)
            continue
        out = json.loads(stdout.strip().splitlines()[-1])
        peak = usage.ru_maxrss * 1024  # kilobytes on Linux
        rows.append({
            "n": n, "dim": dim, "kind": name, "build_s": out["seconds"], "peak_rss_bytes": peak,
            "peak_rss_vs_raw": round(peak / raw, 3), "raw_bytes": raw, "index_bytes": out["index_bytes"],
            "search_memory_bytes": out["search_memory_bytes"], "recall@10": out["recall"],
            "recall@10_without_rerank": out["recall_without_rerank"], "rerank": out["rerank"], "on_disk": out["on_disk"],
        })
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="100k vectors, Flat + IVF + HNSW")
    ap.add_argument("--full", action="store_true", help="also 1M vectors")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "index.json"))
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--threads", type=int, default=None, help="FAISS threads (default: all cores)")
    ap.add_argument("--large", type=int, default=0, help="N vectors: IVF-Flat vs IVF-PQ (+rerank) vs IVF-SQ8 builds")
    ap.add_argument("--kinds", default="ivf,ivfpq,ivfsq8,ivfpq-ondisk", help="with --large: which builds")
    ap.add_argument("--work", default=None, help="with --large: where shards and indexes go (kept)")
    args = ap.parse_args()
    if args.threads:
        import faiss

        faiss.omp_set_num_threads(args.threads)
    print(f"# machine: {machine()}", flush=True)
    if args.large:
        work = Path(args.work or tempfile.mkdtemp(prefix="bench-index-large-"))
        rows = run_large(args.large, args.dim, args.kinds.split(","), work)
        result = json.dumps({"machine": machine(), "results": rows}, indent=2)
        print(result)
        out = Path(args.out if args.out != ap.get_default("out") else Path(__file__).parent / "results" / "index-large.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(result + "\n")
        return
    with tempfile.TemporaryDirectory(prefix="bench-index-") as tmp:
        rows = run(100_000, args.dim, ["flat", "ivf", "hnsw"], Path(tmp))
        if args.full and not args.quick:
            rows += run(1_000_000, args.dim, ["flat", "ivf", "hnsw"], Path(tmp))
    result = json.dumps({"machine": machine(), "results": rows}, indent=2)
    print(result)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(result + "\n")


if __name__ == "__main__":
    main()
