"""Data sovereignty on a real control plane: region-local XCom, the XCom size limit, the ledger
against what the control plane holds, local-only secrets and the log policy."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from airflow_outpost.worker.egress import ledger
from airflow_outpost.worker.testing.controlplane import ControlPlane

pytestmark = pytest.mark.controlplane

XCOM_DAG = "outpost_egress_xcom"
SECRETS_DAG = "outpost_egress_secrets"
N = 700_000


def _rows(state_folder: Path, where: str = "", params: tuple = ()) -> list[dict]:
    db = sqlite3.connect(state_folder / "egress.sqlite")
    db.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in db.execute(f"SELECT * FROM egress {where} ORDER BY id", params)]
    finally:
        db.close()


def _server_logs(cp: ControlPlane, dag_id: str, run_id: str) -> list[Path]:
    assert cp.home is not None
    return [p for p in (cp.home / "logs").rglob("*") if p.is_file() and f"dag_id={dag_id}" in str(p)
            and f"run_id={run_id}" in str(p)]


def test_big_xcom_stays_in_region_and_ledger_matches_control_plane(control_plane: ControlPlane, start_worker) -> None:
    w = start_worker(queues="q_egress_xcom", extra_args=["--region", "eu-west"])
    run_id = control_plane.trigger(XCOM_DAG)
    assert control_plane.wait_for_run(XCOM_DAG, run_id, timeout_s=240) == "success", \
        control_plane.task_states(XCOM_DAG, run_id)

    # The control plane holds a reference, not the 5 MB list ...
    ref = control_plane.xcom(XCOM_DAG, run_id, "produce")
    assert isinstance(ref, str) and ref.startswith("outpost://eu-west/xcom/outpost_egress_xcom/"), ref
    assert "sha256=" in ref and len(ref) < 500
    size = int(ref.split("size=")[1].split("&")[0])
    assert size > 4_000_000
    # ... the downstream task got the full value, and small values are stored centrally as usual.
    assert control_plane.xcom(XCOM_DAG, run_id, "consume") == {
        "count": N, "sum": N * (N - 1) // 2, "last": N - 1, "meta": {"rows": 3, "ok": True}}
    assert control_plane.xcom(XCOM_DAG, run_id, "small") == {"rows": 3, "ok": True}
    stored = list((w.state_folder / "store" / "eu-west").rglob("return_value"))
    assert len(stored) == 1 and stored[0].stat().st_size == size

    assert w.stop() == 0
    # Ledger vs control plane: the XCom bytes the gateway forwarded for this run are exactly the
    # JSON bodies of the values the control plane holds for it.
    xcom_rows = _rows(w.state_folder, "WHERE kind='xcom' AND method='POST' AND task LIKE ?", (f"%run={run_id}%",))
    entries = control_plane.api.get(f"/dags/{XCOM_DAG}/dagRuns/{run_id}/taskInstances/~/xcomEntries").json()
    keys = [(e["task_id"], e["key"]) for e in entries["xcom_entries"]]
    assert {r["outcome"] for r in xcom_rows} == {"sent"} and len(xcom_rows) == len(keys) >= 3
    held = sum(len(json.dumps(control_plane.xcom(XCOM_DAG, run_id, t, key=k), separators=(",", ":")))
               for t, k in keys)
    assert sum(r["bytes"] for r in xcom_rows) == held
    # Every task's state reports and heartbeats went through the gateway; the worker's own calls too.
    kinds = {r["kind"] for r in _rows(w.state_folder)}
    assert {"state", "xcom", "worker", "job-fetch"} <= kinds
    assert ledger.verify(w.state_folder / "egress.sqlite").ok
    # logs = none (the default): nothing of this run's logs reached the control plane.
    assert _server_logs(control_plane, XCOM_DAG, run_id) == []
    assert list(w.log_folder.rglob("*.log")), "the logs stay on the worker"


def test_xcom_over_the_limit_fails_the_task_naming_the_rule(control_plane: ControlPlane, start_worker) -> None:
    w = start_worker(queues="q_egress_xcom",
                     extra_args=["--region-local-xcom", "off", "--max-xcom-bytes", "65536"])
    run_id = control_plane.trigger(XCOM_DAG)
    assert control_plane.wait_for_run(XCOM_DAG, run_id, timeout_s=240) == "failed"
    states = control_plane.task_states(XCOM_DAG, run_id)
    assert states["produce"] == "failed" and states["small"] == "success", states
    log = next(p for p in w.log_folder.rglob("*.log") if "task_id=produce" in str(p) and run_id in str(p))
    text = log.read_text()
    assert "max_xcom_bytes" in text and "65,536" in text, text[-3000:]
    assert w.stop() == 0
    [refused] = _rows(w.state_folder, "WHERE outcome='refused'")
    assert refused["rule"] == "max_xcom_bytes" and refused["kind"] == "xcom" and refused["bytes"] > 4_000_000
    assert refused["status"] == 413


def test_local_only_secrets_and_redacted_logs(control_plane: ControlPlane, start_worker) -> None:
    env = {"AIRFLOW_CONN_OUTPOST_LOCAL_DB": "postgres://alice:pa55-region@db.region.local:5433/warehouse",
           "OUTPOST_REDACT_PATTERNS": "sk-[a-z0-9]{16}"}
    w = start_worker(queues="q_egress_secrets", env=env,
                     extra_args=["--secrets", "local-only", "--logs", "redacted"])
    run_id = control_plane.trigger(SECRETS_DAG)
    assert control_plane.wait_for_run(SECRETS_DAG, run_id, timeout_s=240) == "failed"
    states = control_plane.task_states(SECRETS_DAG, run_id)
    assert states == {"uses_local_connection": "success", "asks_central_connection": "failed"}, states
    assert control_plane.xcom(SECRETS_DAG, run_id, "uses_local_connection") == "db.region.local"
    assert w.stop() == 0

    # The worker-local connection was used without ever asking the control plane for it ...
    conn_rows = _rows(w.state_folder, "WHERE endpoint LIKE '%/connections/%'")
    assert [r for r in conn_rows if "outpost_local_db" in r["endpoint"]] == []
    # ... and the one it does not have was refused, not fetched centrally.
    [refused] = conn_rows
    assert refused["outcome"] == "refused" and refused["rule"] == "secrets=local-only"
    assert refused["endpoint"].endswith("/connections/outpost_central_only")

    # logs = redacted: the control plane has a copy, with the secrets masked.
    files = _server_logs(control_plane, SECRETS_DAG, run_id)
    text = "".join(p.read_text(errors="replace") for p in files if "uses_local_connection" in str(p))
    assert "db.region.local" in text, files
    assert "tok-999999999999" not in text and "sk-" + "a1" * 8 not in text
    assert "***" in text
    local = next(p for p in w.log_folder.rglob("*.log") if "uses_local_connection" in str(p)).read_text()
    assert "sk-" + "a1" * 8 in local, "the full log stays on the worker"
    assert _rows(w.state_folder, "WHERE kind='logs' AND outcome='sent'")
