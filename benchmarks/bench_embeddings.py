"""Embedding throughput and incremental refresh, as ratios measured in the same run.

1. Throughput: embeddings/s of the runner (``Embedder``, auto backend) vs the naive call
   ``SentenceTransformer(model).encode(texts, batch_size=32)`` on the same generated texts
   (mixed lengths, 5-120 words), plus mean cosine of the runner to the fp32 reference.
2. Incremental refresh: time of ``embed_corpus`` after 1% of documents change vs embedding
   the whole corpus from scratch with the same runner.

    python benchmarks/bench_embeddings.py --quick            # a couple of minutes on 2 CPU cores
    python benchmarks/bench_embeddings.py --device cuda      # GPU path (bf16/fp16, large batches)

Prints a table and writes JSON (``--out``, default benchmarks/results/embeddings.json).
Best of ``--repeats`` runs each, interleaved, so background load hits both sides alike.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


from airflow_outpost.runners.bench.run import best_of as best  # noqa: E402
from airflow_outpost.runners.bench.run import make_texts, text_vocabulary  # noqa: E402
from benchmarks._machine import describe as machine  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (~2 minutes on 2 cores)")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda")
    ap.add_argument("--backend", default="auto", help="runner backend (auto, torch, ct2, ct2-int8, onnx, onnx-int8)")
    ap.add_argument("--texts", type=int, default=None, help="texts for the throughput test")
    ap.add_argument("--docs", type=int, default=None, help="documents for the refresh test")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "embeddings.json"))
    args = ap.parse_args()

    from sentence_transformers import SentenceTransformer

    from airflow_outpost.runners.embeddings.corpus import embed_corpus
    from airflow_outpost.runners.embeddings.embedder import Embedder, packaged_model_path
    from airflow_outpost.runners.store.region_store import Store

    model = packaged_model_path()
    gpu = args.device.startswith("cuda")
    n_texts = args.texts or (400 if args.quick else 2000) * (10 if gpu else 1)
    n_docs = args.docs or (400 if args.quick else 2000) * (10 if gpu else 1)
    naive = SentenceTransformer(str(model), device="cuda" if gpu else "cpu")
    vocab = text_vocabulary(naive.tokenizer)
    texts = make_texts(n_texts, 1, vocab)

    t0 = time.perf_counter()
    runner = Embedder(model, device=args.device, backend=args.backend)
    setup_s = time.perf_counter() - t0
    naive.encode(texts[:32], batch_size=32)  # warm-up both sides
    runner.embed(texts[:32])
    naive_s, runner_s = [], []
    for _ in range(args.repeats):  # interleaved: background load hits both sides alike
        naive_s.append(best(lambda: naive.encode(texts, batch_size=32), 1))
        runner_s.append(best(lambda: runner.embed(texts), 1))
    reference = naive.encode(texts, batch_size=32, normalize_embeddings=True)
    cosine = (runner.embed(texts) * reference).sum(axis=1)

    # Incremental refresh: full embed of a fresh store vs refresh after 1% of documents change.
    docs = [{"id": f"d{i}", "text": t} for i, t in enumerate(make_texts(n_docs, 2, vocab))]
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.jsonl"
        corpus.write_text("".join(json.dumps(d) + "\n" for d in docs))
        t = time.perf_counter()
        full = embed_corpus(corpus, store=Store(Path(tmp) / "s"), name="bench", embedder=runner)
        full_s = time.perf_counter() - t
        rng = random.Random(3)
        for d in rng.sample(docs, max(1, n_docs // 100)):
            d["text"] = d["text"] + " updated"
        corpus.write_text("".join(json.dumps(d) + "\n" for d in docs))
        t = time.perf_counter()
        inc = embed_corpus(corpus, store=Store(Path(tmp) / "s"), name="bench", embedder=runner)
        inc_s = time.perf_counter() - t
        t = time.perf_counter()
        noop = embed_corpus(corpus, store=Store(Path(tmp) / "s"), name="bench", embedder=runner)
        noop_s = time.perf_counter() - t

    result = {
        "machine": machine(), "model": runner.describe()["model"]["name"],
        "runner": {k: v for k, v in runner.describe().items() if k != "model"},
        "runner_setup_s": round(setup_s, 2),
        "throughput": {
            "texts": n_texts, "naive_per_s": round(n_texts / min(naive_s), 1),
            "runner_per_s": round(n_texts / min(runner_s), 1),
            "ratio": round(min(naive_s) / min(runner_s), 2),
            "mean_cosine_vs_fp32": round(float(cosine.mean()), 5),
            "min_cosine_vs_fp32": round(float(cosine.min()), 5),
        },
        "incremental": {
            "documents": n_docs, "chunks": full["chunks"], "changed_documents": inc["updated"],
            "full_s": round(full_s, 2), "refresh_s": round(inc_s, 3),
            "speedup": round(full_s / inc_s, 1), "refresh_embedded": inc["embedded"],
            "noop_s": round(noop_s, 3), "noop_embedded": noop["embedded"],
        },
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    m, tp, inc_r = result["machine"], result["throughput"], result["incremental"]
    print(f"machine: {m['cpu']}, {m['cores']} cores" + (f", {m['gpus']}" if "gpus" in m else ""))
    print(f"runner: {result['runner']['backend']} / {result['runner']['precision']} on {result['runner']['device']}")
    print(f"{'measure':<34}{'baseline':>12}{'runner':>12}{'ratio':>8}")
    print(f"{'embeddings/s (' + str(n_texts) + ' texts)':<34}{tp['naive_per_s']:>12}{tp['runner_per_s']:>12}{tp['ratio']:>8}")
    print(f"{'mean / min cosine vs fp32':<34}{'1.0':>12}{tp['mean_cosine_vs_fp32']:>12}{tp['min_cosine_vs_fp32']:>8}")
    print(f"{'refresh after 1% change (s)':<34}{inc_r['full_s']:>12}{inc_r['refresh_s']:>12}{inc_r['speedup']:>8}")
    print(f"{'re-run unchanged: embedded':<34}{'':>12}{inc_r['noop_embedded']:>12}")
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
