#!/usr/bin/env bash
# Device check: FAISS index build on the GPU vs on the CPU, same data, same run.
# Run from the repository root on a machine with an NVIDIA GPU and a GPU build of FAISS
# (faiss.get_num_gpus() > 0). Bounded: 1M x 384 structured vectors by default (N=...).
# Writes benchmarks/results/device-index.json (or $OUT/device-index.json when OUT is set).
set -euo pipefail
N="${N:-1000000}"
DEST="${OUT:-benchmarks/results}"
mkdir -p "$DEST"
WORK="$(mktemp -d /tmp/device-index.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
PY="${PYTHON:-python}"
"$PY" - "$N" "$WORK" "$DEST/device-index.json" <<'PY'
import json, sys, time
from pathlib import Path
import faiss
sys.path.insert(0, ".")
from airflow_outpost.runners.bench.run import structured_vectors, write_vector_shard
from airflow_outpost.runners.index.build import IndexConfig, build_index
from benchmarks._machine import summary

n, work, dest = int(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
print(f"# {summary()}; faiss {faiss.__version__}, GPUs visible to FAISS: {faiss.get_num_gpus()}", flush=True)
for i, start in enumerate(range(0, n, 100_000)):
    write_vector_shard(work / "emb", f"shard-{i:05d}", structured_vectors(min(100_000, n - start), 384, seed=i), start)
rows = []
for kind in ("ivf", "ivfpq", "ivfsq8"):
    for device in ("cpu", "gpu"):
        if device == "gpu" and faiss.get_num_gpus() == 0:
            rows.append({"kind": kind, "device": device, "skipped": "no GPU visible to FAISS"})
            continue
        cfg = IndexConfig(kind=kind, nlist=1024, nprobe=32, train_sample=65_536, device=device, min_recall=0.0)
        out = build_index(work / "emb", work / f"idx-{kind}-{device}", cfg)
        gpu_used = json.loads((Path(out["path"]) / "manifest.json").read_text())["gpu"]
        rows.append({"kind": kind, "device": device, "gpu_used": gpu_used, "build_s": out["seconds"],
                     "recall@10": out["recall"], "index_bytes": out["index_bytes"]})
        print(json.dumps(rows[-1]), flush=True)
for kind in ("ivf", "ivfpq", "ivfsq8"):
    cpu = next(r for r in rows if r["kind"] == kind and r["device"] == "cpu")
    gpu = next(r for r in rows if r["kind"] == kind and r["device"] == "gpu")
    if "build_s" in gpu:
        print(f"{kind}: GPU build {cpu['build_s'] / gpu['build_s']:.1f}x faster than CPU; "
              f"recall@10 {gpu['recall@10']:.3f} vs {cpu['recall@10']:.3f}")
dest.write_text(json.dumps({"machine": summary(), "n": n, "results": rows}, indent=2) + "\n")
PY
