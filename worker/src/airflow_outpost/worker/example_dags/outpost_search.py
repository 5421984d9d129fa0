"""Embed a few documents, index them with FAISS and answer a question, all on the outpost worker."""

from __future__ import annotations

import json

import pendulum
from airflow.sdk import dag, task

NAME = "outpost_search"


@dag(schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False, tags=["outpost"])
def outpost_search():
    # The runners are imported inside the tasks: the control plane's dag-processor parses this
    # file without them installed. What crosses into XCom is each runner's small summary dict.

    @task
    def write_documents() -> str:
        from airflow_outpost.runners import Store

        store = Store()  # the region-local store root the worker gives its tasks (OUTPOST_STORE_ROOT)
        path = store.path("corpora", NAME, "documents.jsonl")
        path.parent.mkdir(parents=True, exist_ok=True)
        topics = ["GPU scheduling", "FAISS indexes", "Airflow deferral", "data residency", "Ray actors"]
        rows = [{"id": f"doc-{i}", "text": f"Note {i} on {topics[i % 5]}: how {topics[i % 5].lower()} works."}
                for i in range(40)]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        return str(path)

    @task
    def embed(corpus: str) -> int:
        from airflow_outpost.runners import Store, embed_corpus

        summary = embed_corpus(corpus, store=Store(), name=NAME)  # EmbedSummary; incremental on reruns
        return summary["version"]

    @task
    def index(embeddings_version: int) -> str | None:
        from airflow_outpost.runners import IndexConfig, Store, build_index

        store = Store()
        built = build_index(store.path("embeddings", NAME), store.path("indexes", NAME),
                            IndexConfig(min_recall=0.9))  # IndexSummary; promoted if recall passes
        return built["current"]

    @task
    def search(current: str | None) -> dict[str, str]:
        import numpy as np

        from airflow_outpost.runners import QueryRetriever, Store, read_catalog

        store = Store()
        retriever = QueryRetriever(store.path("indexes", NAME), k=3)
        found = retriever({"text": np.array(["which notes are about FAISS indexes?"])})
        texts = {row["chunk_id"]: row["text"] for row in read_catalog(store, NAME)}
        top = str(found["top_id"][0])
        return {"version": str(current), "top_id": top, "top_text": texts.get(top, "")}

    search(index(embed(write_documents())))


outpost_search()
