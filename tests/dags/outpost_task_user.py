"""Run as the worker's task_user: probes what the worker keeps to itself, then uses the control
plane (Variables, XCom), a Connection from the worker's environment, the worker's model service and
region store, and a local trigger, as a task normally does."""
import datetime
import json
import os

from airflow.sdk import BaseHook, BaseOperator, Variable, dag, get_current_context, task


class WaitAsUser(BaseOperator):
    """Defers on a 2 s TimeDeltaTrigger (run by the worker's local trigger runner); on resume
    returns the uid of both halves."""

    def execute(self, context):
        from airflow.providers.standard.triggers.temporal import TimeDeltaTrigger

        self.defer(trigger=TimeDeltaTrigger(datetime.timedelta(seconds=2)), method_name="resume",
                   kwargs={"deferred_uid": os.getuid()})

    def resume(self, context, event=None, deferred_uid=None):
        return {"deferred_uid": deferred_uid, "resumed_uid": os.getuid(), "event": str(event)}


@dag(schedule=None, start_date=datetime.datetime(2024, 1, 1), catchup=False,
     default_args={"queue": "q_task_user"})
def outpost_task_user():
    @task
    def probe() -> dict:
        conf = get_current_context()["dag_run"].conf
        seen: dict = {"uid": os.getuid()}
        targets = {"secret": conf["secret"], "config": conf["config"], "environ": f"/proc/{conf['worker_pid']}/environ",
                   "ledger_key": conf["ledger_key"]}
        for name, path in targets.items():
            try:
                with open(path, "rb") as fh:
                    fh.read(1)
                seen[name] = "read"
            except OSError as exc:
                seen[name] = type(exc).__name__
        Variable.set("outpost_task_user_var", "set-by-task-user")
        seen["variable"] = Variable.get("outpost_task_user_var")
        seen["conn_host"] = BaseHook.get_connection("outpost_task_user_db").host
        return seen

    @task
    def big() -> str:
        return "x" * 100_000  # over xcom_threshold_bytes: kept in the region store

    @task
    def check(seen: dict, value: str) -> dict:
        return {**seen, "big_len": len(value), "check_uid": os.getuid()}

    @task
    def embed() -> dict:
        """Embeds a small corpus through the worker's model service into the region store."""
        from airflow_outpost.runners import Store, embed_corpus
        from airflow_outpost.runners.model_service.client import ModelClient

        store = Store()  # OUTPOST_STORE_ROOT, the worker's region store
        corpus = store.path("corpora", "task_user", "documents.jsonl")
        corpus.parent.mkdir(parents=True, exist_ok=True)
        with open(corpus, "w", encoding="utf-8") as fh:
            for i in range(12):
                fh.write(json.dumps({"id": f"doc-{i}", "text": f"Document {i} about region {i % 3}."}) + "\n")
        summary = embed_corpus(corpus, store=store, name="task_user", encoder="service")
        stats = ModelClient(autostart=False).stats()  # the worker's service, over its socket
        manifest = store.manifest_path("embeddings", "task_user")
        return {"uid": os.getuid(), "encoder": summary["backend"].get("encoder"), "embedded": summary["embedded"],
                "dim": summary["dim"], "version": summary["version"], "manifest_uid": manifest.stat().st_uid,
                "service_pid": stats.get("pid"), "models": len(stats.get("models", []))}

    check(probe(), big())
    embed()
    WaitAsUser(task_id="wait")


outpost_task_user()
