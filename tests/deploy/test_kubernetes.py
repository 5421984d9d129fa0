"""images/kubernetes/: the manifests are valid Kubernetes objects and fit the worker they run.

There is no cluster here: every document is validated strictly against the schemas
kubernetes-validate bundles for a fixed Kubernetes version (the PodMonitor against the validator
generated from the Prometheus operator's CRD), each kustomization is built by the real `kubectl
kustomize` (tests/deploy/k8s-tools, installed by make setup), and each StatefulSet's worker
settings are rebuilt with ``load_settings(env=...)`` from what its container would see (the image's
``ENV``, then the ConfigMap, then the container's own ``env``), so the grace period, probe port and
paths are checked against the real settings code.
"""

from __future__ import annotations

import fnmatch
import re
import shlex
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import kubernetes_validate
import pytest
import yaml

from airflow_outpost.worker.config import _FIELDS, Settings, load_settings
from tests.deploy.k8s_tools import KUBECTL, crd_check, run_tool
from tests.helpers import REPO

IMAGES = REPO / "images"
KUBE = IMAGES / "kubernetes"
K8S_VERSION = "1.37.0"
KUSTOMIZE_API = "kustomize.config.k8s.io/v1beta1"
# Custom resources: kubernetes-validate has no schema for them; their operators' CRDs do (crd_check).
CRD_GROUPS = ("monitoring.coreos.com",)
VARIANTS = {"cpu": "airflow-outpost:cpu", "gpu": "airflow-outpost:cuda"}
DOCKERFILE_OF = {"airflow-outpost:cpu": "cpu", "airflow-outpost:cuda": "cuda"}
STATE_MOUNT = PurePosixPath("/var/lib/outpost")
GPU = "nvidia.com/gpu"
# OUTPOST_* variables read outside Settings: the CLI's log level, the config file, the home folder.
NON_SETTING_ENV = {"OUTPOST_LOG_LEVEL", "OUTPOST_CONFIG", "OUTPOST_HOME"}

Doc = dict[str, Any]


def _load(path: Path) -> list[Doc]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _all_documents() -> list[tuple[Path, int, Doc]]:
    return [(path, i, doc) for path in sorted(KUBE.rglob("*.yaml")) for i, doc in enumerate(_load(path))]


DOCUMENTS = _all_documents()
OBJECTS = [(p, i, d) for p, i, d in DOCUMENTS if d.get("apiVersion") != KUSTOMIZE_API]
STATEFULSETS = [(p, d) for p, _, d in OBJECTS if d.get("kind") == "StatefulSet"]


def _id(path: Path, doc: Doc) -> str:
    return f"{path.relative_to(KUBE)}:{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


def _folder_docs(path: Path) -> list[Doc]:
    """Every object in the folder of ``path``: a StatefulSet's ConfigMap and Service live beside it."""
    return [d for p, _, d in OBJECTS if p.parent == path.parent]


def _one(docs: list[Doc], kind: str, name: str) -> Doc:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} named {name} in the same folder, found {len(found)}"
    return found[0]


def _pod(sts: Doc) -> Doc:
    return sts["spec"]["template"]["spec"]


def _worker(sts: Doc) -> Doc:
    workers = [c for c in _pod(sts)["containers"] if c["image"].startswith("airflow-outpost:")]
    assert len(workers) == 1, "one airflow-outpost container per pod: one pod = one worker name"
    return workers[0]


def _all_containers(sts: Doc) -> Iterator[Doc]:
    yield from _pod(sts).get("initContainers", [])
    yield from _pod(sts)["containers"]


def _volume(sts: Doc, name: str) -> Doc:
    found = [v for v in _pod(sts).get("volumes", []) if v["name"] == name]
    assert len(found) == 1, f"volume {name} is mounted but not defined exactly once"
    return found[0]


def _mount(container: Doc, path: str) -> Doc:
    found = [m for m in container.get("volumeMounts", []) if m["mountPath"] == path]
    assert len(found) == 1, f"{container['name']} has no (or several) mounts at {path}"
    return found[0]


def _metrics_port(container: Doc) -> int:
    ports = [p for p in container.get("ports", []) if p.get("name") == "metrics"]
    assert len(ports) == 1, "the worker container declares one port named metrics"
    return int(ports[0]["containerPort"])


def _resolve_port(container: Doc, port: int | str) -> int:
    if isinstance(port, int):
        return port
    named = [p["containerPort"] for p in container.get("ports", []) if p.get("name") == port]
    assert named, f"probe port {port!r} names no container port"
    return int(named[0])


def _configmaps(docs: list[Doc]) -> dict[str, dict[str, str]]:
    return {d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "ConfigMap"}


def _pod_name(sts: Doc) -> str:
    return f"{sts['metadata']['name']}-{max(sts['spec'].get('replicas', 1) - 1, 0)}"


def _container_env(path: Path, sts: Doc, container: Doc) -> dict[str, str]:
    """The container's environment as Kubernetes builds it: envFrom first, then env (which wins).

    ConfigMap references resolve from the ConfigMaps in the StatefulSet's folder; downward-API
    fields get stand-ins (metadata.name: the pod name of the last ordinal).
    """
    configmaps = _configmaps(_folder_docs(path))
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        assert "secretRef" not in source, "no Secret as environment: credentials come from mounted files"
        ref = source["configMapRef"]["name"]
        assert ref in configmaps, f"envFrom names ConfigMap {ref}, which is not in {path.parent.name}/"
        env.update({source.get("prefix", "") + k: v for k, v in configmaps[ref].items()})
    stand_ins = {"metadata.name": _pod_name(sts), "metadata.namespace": "outpost", "status.podIP": "10.0.0.7"}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
            continue
        source = item["valueFrom"]
        if "configMapKeyRef" in source:
            ref = source["configMapKeyRef"]
            env[item["name"]] = configmaps[ref["name"]][ref["key"]]
        elif "fieldRef" in source:
            env[item["name"]] = stand_ins[source["fieldRef"]["fieldPath"]]
        elif "secretKeyRef" in source:
            env[item["name"]] = "<from a Secret>"
        else:
            env[item["name"]] = "1"  # resourceFieldRef
    return env


def _image_env(image: str) -> dict[str, str]:
    """``ENV`` of the image's final stage, read from its Dockerfile."""
    assert image in DOCKERFILE_OF, f"{image} is not an image built from images/*/Dockerfile"
    text = (IMAGES / DOCKERFILE_OF[image] / "Dockerfile").read_text()
    final_stage = re.split(r"^FROM ", text, flags=re.M)[-1]
    env: dict[str, str] = {}
    for line in re.sub(r"\\\n\s*", " ", final_stage).splitlines():
        if line.startswith("ENV "):
            for token in shlex.split(line[4:]):
                key, sep, value = token.partition("=")
                if sep:
                    env[key] = value
    return env


def _settings(path: Path, sts: Doc, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Settings, dict[str, str]]:
    """The worker's Settings for this StatefulSet, built as the container would build them."""
    worker = _worker(sts)
    env = {**_image_env(worker["image"]), **_container_env(path, sts, worker)}
    given = dict(env)
    secret = tmp_path / "jwt_secret"  # the mounted Secret exists only in the pod
    secret.write_text("not-the-real-secret\n")
    if "OUTPOST_JWT_SECRET_FILE" in env:
        env["OUTPOST_JWT_SECRET_FILE"] = str(secret)
    # Default log and state folders derive from OUTPOST_HOME in the process environment.
    monkeypatch.setenv("OUTPOST_HOME", env.get("OUTPOST_HOME", str(Path.home() / ".outpost")))
    return load_settings(env=env), given


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


# -- every document ------------------------------------------------------------------------------

def test_the_manifest_tree_is_complete() -> None:
    for variant in VARIANTS:
        assert (KUBE / variant / "kustomization.yaml").is_file()
    for name in ("README.md", "secret.example.yaml", "podmonitor.yaml", "examples/git-sync-statefulset.yaml"):
        assert (KUBE / name).is_file(), name
    kinds = sorted(d["kind"] for _, _, d in OBJECTS)
    assert "PodMonitor" in kinds and "Secret" in kinds, kinds
    images = sorted(_worker(d)["image"] for _, d in STATEFULSETS)
    assert images == [VARIANTS["cpu"], VARIANTS["cpu"], VARIANTS["gpu"]], "cpu/, examples/ (cpu) and gpu/"


@pytest.mark.parametrize(("path", "doc"), [(p, d) for p, _, d in OBJECTS], ids=[_id(p, d) for p, _, d in OBJECTS])
def test_document_validates_strictly(path: Path, doc: Doc) -> None:
    group = doc.get("apiVersion", "").partition("/")[0]
    if group in CRD_GROUPS:
        [result] = crd_check([doc])
        assert result["model"] and not result["errors"], result
        return
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = ".".join(str(p) for p in exc.path)
        pytest.fail(f"{_id(path, doc)} is not a valid Kubernetes {K8S_VERSION} object at {where}: {exc.message}")


# Not the bare id "gpu": conftest skips tests with a "gpu" keyword on machines without CUDA.
@pytest.mark.parametrize("variant", VARIANTS, ids=[f"{v}/kustomization.yaml" for v in VARIANTS])
def test_kustomization_lists_only_plain_resources(variant: str) -> None:
    folder = KUBE / variant
    (kustomization,) = _load(folder / "kustomization.yaml")
    assert kustomization["apiVersion"] == KUSTOMIZE_API and kustomization["kind"] == "Kustomization"
    # Nothing kustomize-only (namePrefix, commonLabels, patches...): `kubectl apply -f` of the files
    # must create exactly what `kubectl apply -k` does.
    assert set(kustomization) == {"apiVersion", "kind", "resources"}
    resources = kustomization["resources"]
    assert len(set(resources)) == len(resources)
    docs = []
    for name in resources:
        assert "/" not in name, f"{name}: resources stay inside {variant}/"
        assert not name.endswith(".example.yaml") and "podmonitor" not in name, f"{name} must not be applied by default"
        assert (folder / name).is_file(), f"{variant}/kustomization.yaml lists missing {name}"
        docs += _load(folder / name)
    assert not {d["kind"] for d in docs} & {"Secret", "PodMonitor"}, "no Secret or CRD object among the default resources"
    assert sorted(d["kind"] for d in docs) == ["ConfigMap", "Service", "StatefulSet"]
    unlisted = {p.name for p in folder.glob("*.yaml")} - set(resources) - {"kustomization.yaml"}
    assert all(n.endswith(".example.yaml") or n.startswith("podmonitor") for n in unlisted), f"forgotten: {unlisted}"


@pytest.mark.parametrize("variant", VARIANTS, ids=[f"{v}/kustomize" for v in VARIANTS])
def test_kubectl_apply_k_creates_what_the_plain_files_hold(variant: str) -> None:
    built = [d for d in yaml.safe_load_all(run_tool(KUBECTL, "kustomize", str(KUBE / variant))) if d]
    (kustomization,) = _load(KUBE / variant / "kustomization.yaml")
    plain = [d for name in kustomization["resources"] for d in _load(KUBE / variant / name)]

    def key(d: Doc) -> str:
        return f"{d['kind']}/{d['metadata']['name']}"

    assert sorted(built, key=key) == sorted(plain, key=key)


def test_variants_and_example_can_share_a_namespace() -> None:
    keys = [(d["kind"], d["metadata"]["name"]) for p, _, d in OBJECTS if p.parent != KUBE]
    assert len(keys) == len(set(keys)), "object names collide between cpu/, gpu/ and examples/"
    for path, sts in STATEFULSETS:
        for other_path, other in STATEFULSETS:
            if other is not sts:
                assert not _selects(sts["spec"]["selector"]["matchLabels"], other["spec"]["template"]["metadata"]["labels"]), \
                    f"{_id(path, sts)} would adopt the pods of {_id(other_path, other)}"


def test_podmonitor_selects_every_worker_and_its_metrics_port() -> None:
    (monitor,) = [d for _, _, d in OBJECTS if d["kind"] == "PodMonitor"]
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["path"] == "/metrics"
    for _path, sts in STATEFULSETS:
        assert _selects(monitor["spec"]["selector"]["matchLabels"], sts["spec"]["template"]["metadata"]["labels"])
        assert endpoint["port"] in {p.get("name") for p in _worker(sts)["ports"]}


# -- every StatefulSet -----------------------------------------------------------------------------

sts_params = pytest.mark.parametrize(("path", "sts"), STATEFULSETS, ids=[_id(p, d) for p, d in STATEFULSETS])


@sts_params
def test_statefulset_shape_and_headless_service(path: Path, sts: Doc) -> None:
    spec = sts["spec"]
    assert spec["replicas"] == 1 and spec["podManagementPolicy"] == "Parallel"
    labels = spec["template"]["metadata"]["labels"]
    assert _selects(spec["selector"]["matchLabels"], labels)
    service = _one(_folder_docs(path), "Service", spec["serviceName"])
    assert service["spec"]["clusterIP"] == "None", "the StatefulSet's governing Service is headless"
    assert _selects(service["spec"]["selector"], labels)
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert _resolve_port(_worker(sts), ports["metrics"]["targetPort"]) == _metrics_port(_worker(sts))
    # Service links would inject <SERVICE>_PORT=tcp://... variables, e.g. OUTPOST_METRICS_PORT.
    assert _pod(sts)["enableServiceLinks"] is False


@sts_params
def test_liveness_is_healthz_and_readiness_is_readyz(path: Path, sts: Doc) -> None:
    worker = _worker(sts)
    port = _metrics_port(worker)
    # Readiness fails during a control-plane outage; used as liveness it would restart the pod
    # and kill its running tasks.
    expected = {"livenessProbe": "/healthz", "readinessProbe": "/readyz", "startupProbe": "/healthz"}
    for probe, route in expected.items():
        if probe == "startupProbe" and probe not in worker:
            continue
        get = worker[probe]["httpGet"]
        assert get["path"] == route, f"{probe} must probe {route}"
        assert _resolve_port(worker, get["port"]) == port, f"{probe} must probe the metrics port"


@sts_params
def test_dev_shm_is_an_in_memory_emptydir(path: Path, sts: Doc) -> None:
    volume = _volume(sts, _mount(_worker(sts), "/dev/shm")["name"])
    assert volume["emptyDir"]["medium"] == "Memory"
    assert volume["emptyDir"].get("sizeLimit"), "a memory-backed volume without sizeLimit can take all the pod's memory"


@sts_params
def test_jwt_secret_is_a_mounted_secret_file(path: Path, sts: Doc) -> None:
    worker = _worker(sts)
    env = _container_env(path, sts, worker)
    for credential in ("OUTPOST_JWT_SECRET", "AIRFLOW__API_AUTH__JWT_SECRET"):
        assert credential not in env, f"{credential} puts the secret in the environment; use OUTPOST_JWT_SECRET_FILE"
    secret_file = PurePosixPath(env["OUTPOST_JWT_SECRET_FILE"])
    mount = _mount(worker, str(secret_file.parent))
    assert mount.get("readOnly") is True
    assert "subPath" not in mount, "a subPath mount is never refreshed: rotating the Secret would need a restart"
    source = _volume(sts, mount["name"])["secret"]
    # With items, only the listed keys appear (under their paths); without, every key as its own file.
    files = {i["path"]: i["key"] for i in source["items"]} if "items" in source else None
    key = secret_file.name if files is None else files.get(secret_file.name)
    assert key is not None, f"the Secret volume has no file {secret_file.name}"
    (example,) = [d for _, _, d in OBJECTS if d["kind"] == "Secret"]
    assert source["secretName"] == example["metadata"]["name"]
    assert key in {**example.get("data", {}), **example.get("stringData", {})}, "secret.example.yaml shows another key"


@sts_params
def test_worker_name_is_the_pod_name(path: Path, sts: Doc) -> None:
    worker = _worker(sts)
    (item,) = [e for e in worker["env"] if e["name"] == "OUTPOST_NAME"]
    assert item["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    for ref in worker.get("envFrom", []):
        assert "OUTPOST_NAME" not in _configmaps(_folder_docs(path))[ref["configMapRef"]["name"]]


@sts_params
def test_state_lives_on_the_volume_claim(path: Path, sts: Doc, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    claims = {c["metadata"]["name"] for c in sts["spec"]["volumeClaimTemplates"]}
    mount = _mount(_worker(sts), str(STATE_MOUNT))
    assert mount["name"] in claims
    assert mount["name"] not in {v["name"] for v in _pod(sts).get("volumes", [])}, "a pod volume would shadow the claim"
    settings, _ = _settings(path, sts, tmp_path, monkeypatch)
    for what in (settings.state_folder, settings.log_folder, settings.region_store):
        assert PurePosixPath(what).is_relative_to(STATE_MOUNT), f"{what} is not on the pod's volume claim"


@sts_params
def test_runs_as_uid_10001_without_privilege_escalation(path: Path, sts: Doc) -> None:
    pod_sc = _pod(sts)["securityContext"]
    assert pod_sc["runAsNonRoot"] is True and pod_sc["fsGroup"] == 10001
    worker = _worker(sts)
    assert {**pod_sc, **worker.get("securityContext", {})}["runAsUser"] == 10001
    for container in _all_containers(sts):
        assert container["securityContext"]["allowPrivilegeEscalation"] is False, container["name"]


@sts_params
def test_prometheus_scrape_annotations_name_the_metrics_port(path: Path, sts: Doc) -> None:
    annotations = sts["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(_metrics_port(_worker(sts)))
    assert annotations["prometheus.io/path"] == "/metrics"


@sts_params
def test_configmap_holds_only_known_settings(path: Path, sts: Doc) -> None:
    for ref in _worker(sts).get("envFrom", []):
        for key in _configmaps(_folder_docs(path))[ref["configMapRef"]["name"]]:
            if key.startswith("OUTPOST_"):
                assert key in NON_SETTING_ENV or key.removeprefix("OUTPOST_").lower() in _FIELDS, \
                    f"{key} is no setting: the worker would ignore it"


@sts_params
def test_grace_period_outlasts_a_clean_stop(path: Path, sts: Doc, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings, _ = _settings(path, sts, tmp_path, monkeypatch)
    grace = _pod(sts)["terminationGracePeriodSeconds"]
    assert grace >= settings.stop_budget_s(), (
        f"terminationGracePeriodSeconds {grace} < stop budget {settings.stop_budget_s()} s "
        f"(drain {settings.drain_timeout_s} + kill grace {settings.kill_grace_s} + final reports): "
        "the kubelet would SIGKILL the worker before it reports its tasks")
    # The settings the container really gets: listening on the pod IP, on the probed port, named after the pod.
    assert settings.metrics_host == "0.0.0.0"
    assert settings.metrics_port == _metrics_port(_worker(sts))
    assert settings.name == _pod_name(sts)


# -- GPU and CPU variants ----------------------------------------------------------------------------

def _gpu_counts(container: Doc) -> set[int]:
    resources = container.get("resources", {})
    return {int(resources[kind][GPU]) for kind in ("requests", "limits") if GPU in resources.get(kind, {})}


def test_gpu_variant_requests_gpus_and_serves_a_gpu_queue(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = KUBE / "gpu" / "statefulset.yaml"
    (sts,) = _load(path)
    worker = _worker(sts)
    assert worker["image"] == VARIANTS["gpu"]
    assert int(worker["resources"]["limits"][GPU]) >= 1
    assert len(_gpu_counts(worker)) == 1, "GPU requests and limits must be equal"
    assert any(t["key"] == GPU and t["operator"] == "Exists" for t in _pod(sts)["tolerations"])
    settings, env = _settings(path, sts, tmp_path, monkeypatch)
    assert "OUTPOST_GPU_QUEUES" in env
    assert settings.queues and any(fnmatch.fnmatch(q, p) for q in settings.queues for p in settings.gpu_queues), \
        "no queue of the GPU worker is a GPU queue: its GPUs would sit idle"
    # The device plugin sets it to the allocated GPUs; the pod spec overriding it (e.g. "all")
    # would expose every GPU on the node.
    assert "NVIDIA_VISIBLE_DEVICES" not in _container_env(path, sts, worker)


@pytest.mark.parametrize(("path", "sts"), [(p, d) for p, d in STATEFULSETS if _worker(d)["image"] == VARIANTS["cpu"]],
                         ids=[_id(p, d) for p, d in STATEFULSETS if _worker(d)["image"] == VARIANTS["cpu"]])
def test_cpu_workers_neither_request_nor_see_gpus(path: Path, sts: Doc, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    for container in _all_containers(sts):
        assert not _gpu_counts(container), f"{container['name']} requests GPUs in a CPU pod"
    settings, env = _settings(path, sts, tmp_path, monkeypatch)
    assert env["NVIDIA_VISIBLE_DEVICES"] == "void", "on a node whose default runtime is NVIDIA's, the pod would see its GPUs"
    assert settings.queues is not None, "a CPU worker serving all queues would take GPU jobs too"
    assert not any(fnmatch.fnmatch(q, p) for q in settings.queues for p in settings.gpu_queues), \
        "a CPU worker serving a GPU queue would take jobs it cannot run"
