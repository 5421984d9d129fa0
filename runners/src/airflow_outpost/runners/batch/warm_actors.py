"""Warm model actors: named, detached Ray actors that keep a batch model loaded between runs.

Ray Data builds a new actor pool for every dataset, so every ``run_batch_inference`` call pays
an actor process start, the model's imports and its load again: about 10 s of a 4k-row run on
two cores, more than the whole run takes once the model is loaded. With
``BatchConfig(keep_warm_s > 0)`` the model lives in detached actors named after what built them
(model class and its source, constructor arguments, CPUs and GPUs per actor, code version) in the
``outpost`` namespace. The next run on the same Ray cluster (the worker's persistent Ray, or an
existing cluster) finds them by name and sends its batches straight to them.

Lifetime: an actor unused for ``keep_warm_s`` kills itself, which gives its CPUs and GPUs back to
Ray. A run holds its actors from start to end (reading may take longer than ``keep_warm_s``);
a hold not refreshed for ``HOLD_TTL_S`` is ignored, so a crashed driver cannot pin them forever.
Before creating actors that do not fit in what the cluster has free, idle warm actors of
other models are released, so warm actors never keep a new model off the GPU. A batch whose
actor died under it (idle expiry racing a new run, OOM) is sent once more to a fresh actor;
models are deterministic per batch, so a resend gives the same rows.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from airflow_outpost.runners.store.region_store import code_version

log = logging.getLogger(__name__)

NAMESPACE = "outpost"
PREFIX = "outpost-batch-"
HOLD_TTL_S = 120.0
_THIS_FILE_SHA = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]


def actor_key(model_cls: type, model_kwargs: Mapping[str, Any], cpus: float, gpus: float) -> str:
    """A stable 16-hex key for (model class + source, kwargs, resources, code version)."""
    try:
        source = inspect.getsource(model_cls)
    except (OSError, TypeError):
        source = ""
    payload = json.dumps({
        "class": f"{model_cls.__module__}.{model_cls.__qualname__}",
        "source": hashlib.sha256(source.encode()).hexdigest(),
        "kwargs": dict(model_kwargs), "cpus": cpus, "gpus": gpus,
        "code": code_version(), "wrapper": _THIS_FILE_SHA,
    }, sort_keys=True, default=repr)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


class WarmModel:
    """Actor body: builds ``wrapper_cls(model_cls, model_kwargs)`` once and serves ``infer`` calls.

    ``status`` runs in its own concurrency group so it answers while a batch is running.
    """

    def __init__(self, wrapper_cls: type, model_cls: type, model_kwargs: Mapping[str, Any], idle_s: float) -> None:
        # A failed constructor is kept and raised by status(): Ray would otherwise only report
        # the actor dead, with the model's exception flattened into a message string.
        self.error: BaseException | None = None
        try:
            self.model = wrapper_cls(model_cls, model_kwargs)
        except Exception as exc:  # noqa: BLE001 - re-raised to the driver by status()
            self.error = exc
        self.idle_s = idle_s
        self.calls = 0
        self.busy = 0
        self.last = time.monotonic()
        self.holds: dict[str, float] = {}
        self._lock = threading.Lock()
        if self.error is None:
            threading.Thread(target=self._expire_when_idle, name="outpost-warm-expiry", daemon=True).start()

    def infer(self, batch: dict[str, Any], run: str) -> dict[str, Any]:
        with self._lock:
            self.busy += 1
            self.holds[run] = time.monotonic()
        try:
            return self.model(batch)
        finally:
            with self._lock:
                self.busy -= 1
                self.calls += 1
                self.last = time.monotonic()

    def status(self, idle_s: float | None = None, hold: str | None = None, release: str | None = None) -> dict[str, Any]:
        """Counters and idle time. ``idle_s`` (a new run's ``keep_warm_s``) replaces the expiry
        time; ``hold``/``release`` take and drop run ``hold``'s claim that keeps the actor alive.
        Raises the model constructor's exception if it failed."""
        if self.error is not None:
            raise self.error
        with self._lock:
            if idle_s is not None:
                self.idle_s = idle_s
            if hold is not None:
                self.holds[hold] = time.monotonic()
            if release is not None and self.holds.pop(release, None) is not None:
                self.last = time.monotonic()
            busy = self.busy or bool(self.holds)
            return {"pid": os.getpid(), "calls": self.calls, "busy": self.busy, "held": len(self.holds),
                    "idle_s": 0.0 if busy else time.monotonic() - self.last}

    def _expire_when_idle(self) -> None:
        import ray

        while True:
            time.sleep(max(0.05, min(self.idle_s / 4, 5.0)))
            with self._lock:
                now = time.monotonic()
                self.holds = {run: t for run, t in self.holds.items() if now - t < HOLD_TTL_S}
                if not self.busy and not self.holds and now - self.last >= self.idle_s:
                    break
        log.info("warm model actor idle for %.0fs: releasing it", self.idle_s)
        ray.kill(ray.get_runtime_context().current_actor, no_restart=True)


def _remote_class() -> Any:
    import ray

    # concurrency_groups is a real option of ray.remote for actor classes; its typed overloads lack it.
    return ray.remote(concurrency_groups={"status": 1})(  # type: ignore[call-overload]
        type("WarmModel", (WarmModel,), {"status": ray.method(concurrency_group="status")(WarmModel.status)})
    )


class WarmPool:
    """The ``n`` warm actors of one model: found by name, created when missing, resent on death."""

    def __init__(self, wrapper_cls: type, model_cls: type, model_kwargs: Mapping[str, Any], *,
                 n: int, cpus: float, gpus: float, keep_warm_s: float, read_cpus: float = 0.0,
                 start_timeout_s: float = 600.0) -> None:
        self.args = (wrapper_cls, model_cls, dict(model_kwargs), keep_warm_s)
        self.n, self.cpus, self.gpus, self.start_timeout_s = n, cpus, gpus, start_timeout_s
        self.read_cpus = read_cpus
        self.key = actor_key(model_cls, model_kwargs, cpus, gpus)
        self.actors: list[Any] = [None] * n
        # Bumped when a slot's actor is replaced, so one death triggers one replacement.
        self.generation = [0] * n
        self.reused = 0
        self.run = os.urandom(8).hex()

    def name(self, i: int) -> str:
        return f"{PREFIX}{self.key}-{i}"

    def start(self) -> WarmPool:
        """Look up or create every actor and wait until each has built its model.

        A model constructor that raises is re-raised here as that exception type (Ray's
        ``RayTaskError`` subclass of it); the actor is killed so the next run starts fresh.
        """
        import ray

        missing = []
        for i in range(self.n):
            try:
                self.actors[i] = ray.get_actor(self.name(i), namespace=NAMESPACE)
                self.reused += 1
            except ValueError:
                missing.append(i)
        if missing:
            # The read tasks need their share next to the new actors, or reading starves.
            release_idle(need_cpus=len(missing) * self.cpus + self.read_cpus, need_gpus=len(missing) * self.gpus,
                         keep=self.key)
            for i in missing:
                self.actors[i] = self._create(i)
        self._wait_ready(range(self.n))
        log.info("batch inference: %d warm model actor(s) reused, %d started (key %s)",
                 self.reused, len(missing), self.key)
        return self

    def _create(self, i: int) -> Any:
        # get_if_exists: two runs starting the same model at once share one actor per slot.
        return _remote_class().options(
            name=self.name(i), namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
            num_cpus=self.cpus, num_gpus=self.gpus, max_restarts=0,
        ).remote(*self.args)

    def _wait_ready(self, slots: Iterable[int]) -> None:
        import ray

        refs = {self.actors[i].status.remote(self.args[3], hold=self.run): i for i in slots}
        ready, pending = ray.wait(list(refs), num_returns=len(refs), timeout=self.start_timeout_s)
        if pending:
            # Not placed yet: a detached actor left pending would start later and idle for nothing.
            for ref in pending:
                kill(self.actors[refs[ref]])
            raise TimeoutError(
                f"{len(pending)} warm model actor(s) did not start within {self.start_timeout_s:g}s; the cluster "
                f"may lack {self.cpus:g} CPU / {self.gpus:g} GPU per actor (free now: {ray.available_resources()})"
            )
        errors = []
        for ref in ready:
            try:
                ray.get(ref)
            except Exception as exc:  # noqa: BLE001 - every failed slot is killed, the first error raised
                kill(self.actors[refs[ref]])
                errors.append(exc)
        if errors:
            raise errors[0]

    def submit(self, i: int, batch: Any) -> Any:
        return self.actors[i].infer.remote(batch, self.run)

    def close(self) -> None:
        """Drop this run's hold; the actors then expire ``keep_warm_s`` after their last batch."""
        for actor in self.actors:
            if actor is not None:
                actor.status.remote(release=self.run)

    def replace(self, i: int) -> None:
        """The actor in slot ``i`` died: start a new one there (same name) and wait for it."""
        import ray

        kill(self.actors[i])
        self.generation[i] += 1
        # The name is freed asynchronously; until then get_if_exists would hand back the dead actor.
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            try:
                ray.get_actor(self.name(i), namespace=NAMESPACE)
            except ValueError:
                break
            time.sleep(0.1)
        self.actors[i] = self._create(i)
        self._wait_ready([i])


def kill(actor: Any) -> None:
    import ray

    try:
        ray.kill(actor, no_restart=True)
    except Exception as exc:  # noqa: BLE001 - already gone is fine
        log.debug("warm actor already gone: %s", exc)


def list_warm() -> list[dict[str, Any]]:
    """Every warm model actor on the cluster: ``{"name", "status"}`` (status None if it did not answer)."""
    import ray

    out = []
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry.get("namespace") != NAMESPACE or not entry.get("name", "").startswith(PREFIX):
            continue
        try:
            actor = ray.get_actor(entry["name"], namespace=NAMESPACE)
            status: Any = ray.get(actor.status.remote(), timeout=2.0)
        except Exception:  # noqa: BLE001 - dying or unreachable: report it without status
            actor, status = None, None
        out.append({"name": entry["name"], "actor": actor, "status": status})
    return out


def release_idle(*, need_cpus: float = 0.0, need_gpus: float = 0.0, keep: str | None = None,
                 min_idle_s: float = 0.0) -> list[str]:
    """Kill idle warm actors (not of model ``keep``) until ``need_cpus``/``need_gpus`` are free.

    ``need_*=0`` with no shortfall releases nothing; ``release_idle(need_cpus=float("inf"))``
    releases every idle warm actor. Returns the names released, longest idle first.
    """
    import ray

    def short() -> bool:
        free = ray.available_resources()
        return free.get("CPU", 0.0) + 1e-9 < need_cpus or free.get("GPU", 0.0) + 1e-9 < need_gpus

    released: list[str] = []
    if not short():
        return released
    idle = [w for w in list_warm() if w["status"] and not w["status"]["busy"] and not w["status"]["held"]
            and w["status"]["idle_s"] >= min_idle_s
            and (keep is None or not w["name"].startswith(f"{PREFIX}{keep}-"))]
    for w in sorted(idle, key=lambda w: -w["status"]["idle_s"]):
        if not short():
            break
        before = ray.available_resources()
        kill(w["actor"])
        released.append(w["name"])
        # Ray frees the resources asynchronously once the process is gone.
        deadline = time.monotonic() + 10.0
        while ray.available_resources() == before and time.monotonic() < deadline:
            time.sleep(0.1)
    if released:
        log.info("released %d idle warm model actor(s) to make room: %s", len(released), ", ".join(released))
    return released
