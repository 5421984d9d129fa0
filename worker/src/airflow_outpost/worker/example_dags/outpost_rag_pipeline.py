"""A retrieval pipeline that keeps its data on the worker: the DAG ``outpost demo`` runs.

documents_arrive -> embed (incremental) -> build_index -> recall_gate -> promote -> batch_inference

* ``documents_arrive`` writes a small JSONL corpus into the worker's region-local store
  (``OUTPOST_STORE_ROOT``); on later runs a few documents change, so ``embed`` re-embeds only those.
* ``engine`` (param): where the runners run. ``"ray"`` (default): ``embed`` and ``build_index`` with
  ``engine="ray"`` and ``batch_inference`` with ``run_batch_inference``, on the worker's Ray
  (``outpost worker --ray``) or a local Ray of the task's own (2 CPUs). ``"local"``: all three in
  the task's process; ``embed`` then uses the worker's warm model service (the second embedding
  task on a worker loads no model).
* ``build_index`` builds (first run) or incrementally updates the FAISS index without promoting;
  ``recall_gate`` fails the run if recall@10 is below ``min_recall``; ``promote`` moves
  ``current`` and emits an event on ``Asset("outpost://index/rag_docs")`` whose extra is the
  promotion summary, which triggers ``outpost_rag_consumer`` (asset-aware scheduling).
* ``batch_inference`` retrieves the nearest chunks for a query set.

XCom and the asset event carry small metadata only (counts, versions, recall, ``file://`` URIs).
The model is the packaged all-MiniLM-L6-v2 unless the ``model`` param or ``OUTPOST_MODEL`` names
a local sentence-transformers directory. Heavy imports happen inside the tasks, so parsing is cheap.
"""

from __future__ import annotations

import datetime
import json
import os

from airflow.sdk import Asset, Param, dag, task

NAME = "rag_docs"
INDEX_ASSET = Asset("outpost://index/rag_docs")
START = datetime.datetime(2024, 1, 1)
TOPICS = {
    "billing": ["invoice", "refund", "payment card", "subscription fee", "tax receipt", "billing cycle"],
    "network": ["VPN tunnel", "DNS record", "firewall rule", "packet loss", "load balancer", "TLS certificate"],
    "garden": ["tomato seedlings", "compost heap", "pruning roses", "drip irrigation", "clay soil", "aphids"],
    "cooking": ["sourdough starter", "slow-cooked stew", "knife skills", "baking soda", "spice blend", "risotto"],
    "travel": ["train pass", "boarding gate", "hostel booking", "travel insurance", "jet lag", "visa application"],
}
TEMPLATES = [
    "This note explains how to deal with {a} when {b} is involved.",
    "Common questions about {a} usually come up together with {b}.",
    "A short checklist for {a}: first look at {b}, then write down what changed.",
    "Experienced people handle {a} differently from beginners, especially around {b}.",
]
QUERIES = {
    "billing": ["how do I get a refund for my invoice", "my payment card was charged twice for the subscription"],
    "network": ["the VPN tunnel drops packets", "how to add a firewall rule for the load balancer"],
    "garden": ["my tomato seedlings have aphids", "watering clay soil with drip irrigation"],
    "cooking": ["keeping a sourdough starter alive", "which spice blend goes with a slow-cooked stew"],
    "travel": ["do I need travel insurance for a visa application", "coping with jet lag after a long flight"],
}


def _model(params: dict) -> str:
    from airflow_outpost.runners import packaged_model_path

    return params.get("model") or os.environ.get("OUTPOST_MODEL") or str(packaged_model_path())


def _engine(params: dict) -> dict:
    """The runners' ``engine``/``ray_config`` arguments for the ``engine`` param."""
    if params["engine"] == "local":
        return {"engine": "local"}
    from airflow_outpost.runners import RayConfig

    # The worker's Ray when it has one (``outpost worker --ray``), else a Ray of this task's own.
    return {"engine": "ray", "ray_config": RayConfig.from_env(num_cpus=2)}


def _document(i: int, revision: int = 0) -> dict:
    topic = sorted(TOPICS)[i % len(TOPICS)]
    words = TOPICS[topic]
    sentences = [TEMPLATES[(i + j) % len(TEMPLATES)].format(a=words[(i + j) % len(words)], b=words[(i + 2 * j + 1) % len(words)])
                 for j in range(3 + i % 4)]
    # A per-document detail keeps every text (and so every vector) distinct.
    sentences.append(f"Ticket {i}: reported by team {i * 7 % 13} in week {i % 52 + 1}.")
    if revision:
        sentences.append(f"Revision {revision}: updated guidance on {words[(i + revision) % len(words)]}.")
    return {"id": f"{topic}-{i:04d}", "text": " ".join(sentences), "topic": topic}


def _write_jsonl(path, rows) -> None:
    # Temp name, fsync, rename: a reader never sees a half corpus.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}.{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(row) + "\n" for row in rows)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


@dag(
    schedule=None, start_date=START, catchup=False, tags=["outpost", "example", "runners"],
    default_args={"queue": "default", "retries": 0},
    params={
        "documents": Param(200, type="integer", minimum=5, description="documents in the generated corpus"),
        "model": Param(None, type=["null", "string"], description="local sentence-transformers directory"),
        "backend": Param("auto", enum=["auto", "torch", "ct2", "ct2-int8", "onnx", "onnx-int8"],
                         description="embedding backend; auto = torch on GPU, verified CTranslate2 int8 on CPU"),
        "engine": Param("ray", enum=["ray", "local"],
                        description="where embed, build_index and batch_inference run: on Ray or in the task's process"),
        "min_recall": Param(0.9, type="number", minimum=0, maximum=1, description="promotion gate, recall@10"),
    },
)
def outpost_rag_pipeline():
    @task
    def documents_arrive(**context) -> dict:
        """Write the corpus; on later runs revise about 2% of the documents."""
        from airflow_outpost.runners import Store
        from airflow_outpost.runners.store.region_store import hash_file

        store = Store()
        path = store.path("corpora", NAME, "documents.jsonl")
        n = int(context["params"]["documents"])
        revised: list[int] = []
        if path.exists():
            old = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            revision = 1 + max((int(d.get("revision", 0)) for d in old), default=0)
            step = max(1, n // max(1, n // 50))
            revised = list(range(revision % step, n, step))
        else:
            revision = 0
        docs = []
        for i in range(n):
            doc = _document(i, revision if i in revised else 0)
            docs.append(doc | {"revision": revision} if i in revised else doc)
        _write_jsonl(path, docs)
        return {"corpus_uri": store.uri(path), "documents": n, "revised": len(revised), "sha256": hash_file(path)}

    @task
    def embed(arrival: dict, **context) -> dict:
        from airflow_outpost.runners import Store, embed_corpus

        params = context["params"]
        store = Store()
        summary = embed_corpus(store.path("corpora", NAME, "documents.jsonl"), store=store, name=NAME,
                               model=_model(params), backend=params["backend"], encoder="auto",
                               **_engine(params))
        return {k: summary[k] for k in ("name", "version", "changed", "documents", "chunks", "embedded", "reused",
                                        "added", "updated", "deleted", "dim", "manifest_uri")} | \
            {"encoder": summary["backend"].get("encoder", "local"), "backend": summary["backend"]["backend"],
             "engine": summary["engine"]}

    @task
    def build_index(embedded: dict, **context) -> dict:
        from airflow_outpost.runners import IndexConfig, Store, current_version, update_index
        from airflow_outpost.runners import build_index as build

        store = Store()
        emb_dir, index_dir = store.path("embeddings", NAME), store.path("indexes", NAME)
        config = IndexConfig(kind="flat", eval_queries=50, min_recall=float(context["params"]["min_recall"]))
        if current_version(index_dir) is None:
            summary = build(emb_dir, index_dir, config, auto_promote=False, **_engine(context["params"]))
        else:
            # An incremental update adds only the changed rows, in this process; a rebuild (when
            # the update cannot apply) runs on the param's engine.
            summary = update_index(emb_dir, index_dir, auto_promote=False, **_engine(context["params"]))
        return {k: summary[k] for k in ("version", "mode", "kind", "count", "recall", "k", "min_recall",
                                        "passed", "current", "index_dir", "engine")}

    @task
    def recall_gate(built: dict) -> dict:
        from airflow.sdk.exceptions import AirflowFailException

        if not built["passed"]:
            raise AirflowFailException(
                f"index {built['version']} has recall@{built['k']}={built['recall']} below the gate "
                f"{built['min_recall']}; not promoting, {built['current']} stays current")
        return built

    @task(outlets=[INDEX_ASSET])
    def promote(gated: dict) -> dict:
        from airflow_outpost.runners import Store, emit
        from airflow_outpost.runners import promote as promote_version

        result = promote_version(gated["index_dir"], gated["version"], min_recall=gated["min_recall"])
        summary = {"index": INDEX_ASSET.uri, "version": result["current"], "previous": result["previous"],
                   "recall": gated["recall"], "k": gated["k"], "count": gated["count"], "mode": gated["mode"],
                   "index_uri": Store().uri(gated["index_dir"]), "worker": os.environ.get("OUTPOST_WORKER_NAME")}
        return emit(INDEX_ASSET, summary)

    @task
    def batch_inference(promoted: dict, **context) -> dict:
        import pyarrow.parquet as pq

        from airflow_outpost.runners import BatchConfig, QueryRetriever, Store, run_batch_inference

        params = context["params"]
        store = Store()
        queries = [{"id": f"q-{topic}-{j}", "text": text, "topic": topic}
                   for topic, texts in sorted(QUERIES.items()) for j, text in enumerate(texts)]
        half = len(queries) // 2
        parts = [store.path("corpora", "rag_queries", f"part-{i:05d}.jsonl") for i in range(2)]
        _write_jsonl(parts[0], queries[:half])
        _write_jsonl(parts[1], queries[half:])
        run = "".join(c if c.isalnum() or c in "-_." else "_" for c in context["run_id"])
        out = store.path("results", NAME, f"{promoted['version']}-{run}")
        kwargs = {"index_dir": str(store.path("indexes", NAME)), "model_path": _model(params), "k": 5,
                  "backend": params["backend"], "encoder": "auto"}
        summary = run_batch_inference(parts, out, QueryRetriever, kwargs,
                                      config=BatchConfig(batch_size=16, actors=1, cpus_per_actor=1.0), **_engine(params))
        rows = [r for p in sorted(out.glob("part-*.parquet")) for r in pq.read_table(p).to_pylist()]
        topic_of = {q["id"]: q["topic"] for q in queries}
        hits = sum(r["top_id"].split("-")[0] == topic_of[r["id"]] for r in rows)
        return {"index_version": promoted["version"], "engine": summary["engine"], "rows": summary["rows"],
                "seconds": summary["seconds"], "top1_topic_accuracy": round(hits / max(1, len(rows)), 3),
                "results_uri": store.uri(out)}

    built = build_index(embed(documents_arrive()))
    batch_inference(promote(recall_gate(built)))


@dag(schedule=[INDEX_ASSET], start_date=START, catchup=False, tags=["outpost", "example", "runners"],
     default_args={"queue": "default", "retries": 0})
def outpost_rag_consumer():
    """Runs whenever a new index version is promoted; reads the promotion summary from the event."""

    @task
    def announce(**context) -> dict:
        events = context["triggering_asset_events"][INDEX_ASSET]
        latest = events[-1].extra
        return {"version": latest.get("version"), "recall": latest.get("recall"), "events": len(events)}

    announce()


outpost_rag_pipeline()
outpost_rag_consumer()
