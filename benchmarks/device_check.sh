#!/usr/bin/env bash
# Device check: embeddings, batch inference and index builds on a machine with an NVIDIA GPU and
# more cores than a laptop, each against its baseline measured in the same run:
#   1. embeddings/s of the runner (fp16/bf16, large batches) vs the naive fp32
#      SentenceTransformer.encode on the same GPU            -> device-embeddings.json
#   2. the embedding pipeline on Ray (stand-in encoder), chunks/s on 1..N Ray CPUs -> device-scale.json
#   3. batch inference on Ray, actors 1..N vs the plain loop on the same cores     -> device-batch.json
#   4. the FAISS index build on the GPU vs on the CPU (device_check_index.sh)      -> device-index.json
# Run from the repository root after `make setup` (a CUDA torch and faiss-gpu for 1 and 4; see
# images/install.sh cuda). Bounded: about 10 minutes on one H100 with 16 cores. Results go to
# benchmarks/results/ (or $OUT when set); each file records the machine.
set -euo pipefail
DEST="${OUT:-benchmarks/results}"
PY="${PYTHON:-.venv/bin/python}"
CORES="$(nproc)"
mkdir -p "$DEST"
export HF_HUB_OFFLINE=1

counts="1"
c=2
while [ "$c" -le "$CORES" ]; do counts="$counts,$c"; c=$((c * 2)); done

"$PY" -c 'import torch, sys; print("# torch", torch.__version__, "CUDA:", torch.cuda.is_available(),
  torch.cuda.get_device_name(0) if torch.cuda.is_available() else "", file=sys.stderr)'

echo "== 1. embeddings on the GPU vs the naive fp32 encode" >&2
"$PY" benchmarks/bench_embeddings.py --device cuda --texts 20000 --docs 4000 --out "$DEST/device-embeddings.json"

echo "== 2. embedding pipeline on Ray, CPUs $counts" >&2
"$PY" benchmarks/bench_scale.py --cpus "$counts" --partitions "$((CORES * 2))" --docs 2000 \
  --out "$DEST/device-scale.json"

echo "== 3. batch inference on Ray, actors $counts on $CORES cores" >&2
"$PY" benchmarks/bench_batch.py --rows 16384 --partitions "$((CORES * 2))" --cores "$CORES" --actors "$counts" \
  --out "$DEST/device-batch.json"

echo "== 4. index build, GPU vs CPU" >&2
PYTHON="$PY" OUT="$DEST" bash benchmarks/device_check_index.sh
