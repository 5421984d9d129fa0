"""Client side of the worker-local model service, and an ``Embedder`` that uses it.

``ServiceEmbedder`` has the interface ``embed_corpus`` and batch models use from ``Embedder``
(``embed``, ``__call__``, ``tokenizer``, ``dim``, ``max_seq_length``, ``record``, ``describe``,
``model_calls``, ``texts_encoded``) but the model lives in the service, so constructing it in a
new task process costs a socket round trip once the service holds the model. It never imports
torch: the tokenizer (needed for chunking only) is read from the model's ``tokenizer.json``.
Vectors are those of a local ``Embedder`` with the same model, device and backend (the service
runs that ``Embedder``; only float rounding from how texts share a batch can differ).

``make_embedder(model, encoder=...)`` picks: ``"local"`` (an in-process ``Embedder``),
``"service"`` (``ServiceEmbedder``; starts the service if needed) or ``"auto"``: the service
inside an outpost worker task (``OUTPOST_WORKER_NAME`` set) unless ``OUTPOST_MODEL_SERVICE=0``
or in-process tuning arguments are given, local otherwise. If the service cannot be started,
``auto`` logs why and loads the model locally.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airflow_outpost.runners.embeddings.embedder import PACKAGED_MODEL_NAME, resolve_model_path
from airflow_outpost.runners.model_service.protocol import (
    ENV_IDLE,
    PEERCRED,
    ModelServiceError,
    array_from,
    error_for,
    idle_seconds,
    recv_message,
    send_message,
    socket_path,
    trusted_uids,
)

if TYPE_CHECKING:
    import numpy as np

__all__ = ["ENCODERS", "ModelClient", "ServiceEmbedder", "make_embedder", "ping"]

log = logging.getLogger(__name__)
ENCODERS = ("auto", "local", "service")
ENV_SERVICE = "OUTPOST_MODEL_SERVICE"
_SERVICE_KWARGS = {"device", "backend", "normalize", "model_name", "model_revision"}
# Environment a long-lived service must not inherit from the task that happens to start it.
_SECRET_MARKERS = ("SECRET", "TOKEN", "PASSWORD", "CREDENTIAL", "PRIVATE_KEY")


def _connect(path: Path, timeout_s: float | None) -> socket.socket:
    """Connect to the service on ``path``; ModelServiceError if another user's process listens there.

    The server refuses clients of another uid; the client checks the server the same way, so a
    socket another local user bound first (a squatted path) never receives our texts.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout_s)
    try:
        sock.connect(str(path))
        pid, uid, _ = PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, PEERCRED.size))
    except OSError:
        sock.close()
        raise
    if uid not in trusted_uids():
        sock.close()
        raise ModelServiceError(f"the model service socket {path} is served by another user (uid {uid}, pid {pid}), "
                                f"not this one (uid {os.getuid()}) nor the worker's: refusing to send it data")
    return sock


def ping(path: str | os.PathLike[str] | None = None, timeout_s: float = 2.0) -> dict[str, Any] | None:
    """The service's ping answer on ``path``, or None if nothing answers there."""
    try:
        with _connect(socket_path(path), timeout_s) as sock:
            send_message(sock, {"op": "ping"})
            header, _ = recv_message(sock)
    except (OSError, ValueError):
        return None
    return header if header.get("ok") else None


def _service_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("AIRFLOW") and not any(m in k.upper() for m in _SECRET_MARKERS)}
    env["HF_HUB_OFFLINE"] = "1"  # the service never downloads: local model directories only
    return env


def start_service(path: Path, *, idle_s: float, timeout_s: float = 120.0) -> None:
    """Start the service on ``path`` unless one answers there. Concurrent callers (threads or
    processes) start exactly one: the check-and-start runs under an exclusive lock file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if ping(path) is not None:
                return
            proc = subprocess.run(
                [sys.executable, "-m", "airflow_outpost.runners.model_service.service", "--spawn", "--socket", str(path),
                 "--idle-s", str(idle_s), "--spawn-timeout-s", str(timeout_s)],
                env=_service_env(), capture_output=True, text=True, timeout=timeout_s + 30, cwd="/", check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise ModelServiceError(f"starting the model service on {path} timed out") from exc
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    if proc.returncode != 0:
        raise ModelServiceError(f"could not start the model service on {path}: {proc.stderr.strip()[-2000:]}")
    log.info("started the model service on %s (pid %s)", path, proc.stdout.strip())


class ModelClient:
    """One connection to the service (started on first use when ``autostart``). Thread-safe.

    Requests that fail because the service went away (idle exit, crash) are retried once after
    starting it again; errors the service reports are raised as runner exceptions
    (``ModelNotFoundError``, ``GpuMemoryError``...). ``close()`` is safe twice.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None, *, idle_s: float | None = None,
                 autostart: bool = True, timeout_s: float | None = 600.0) -> None:
        self.path = socket_path(path)
        self.idle_s = idle_seconds(idle_s)
        self.autostart = autostart
        self.timeout_s = timeout_s
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()

    def __enter__(self) -> ModelClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def _ensure(self) -> socket.socket:
        if self._sock is None:
            try:
                self._sock = _connect(self.path, self.timeout_s)
            except OSError as exc:
                if not self.autostart:
                    raise ModelServiceError(f"no model service answers on {self.path}: {exc}") from exc
                start_service(self.path, idle_s=self.idle_s)
                self._sock = _connect(self.path, self.timeout_s)
        return self._sock

    def request(self, header: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
        """Send one request; return the ``ok`` response or raise what the service reported."""
        with self._lock:
            for attempt in (1, 2):
                try:
                    sock = self._ensure()
                    send_message(sock, header)
                    resp, payload = recv_message(sock)
                    break
                except (OSError, ValueError) as exc:
                    self.close()
                    if attempt == 2 or not self.autostart or isinstance(exc, (TimeoutError, ValueError)):
                        raise ModelServiceError(f"model service on {self.path} failed: {exc}") from exc
                    log.info("model service connection lost (%s); reconnecting", exc)
        if not resp.get("ok"):
            raise error_for(resp)
        return resp, payload

    def stats(self) -> dict[str, Any]:
        """Loads, requests and the models held, with per-model call counts and idle times."""
        return self.request({"op": "stats"})[0]

    def load(self, model: str | os.PathLike[str] | None = None, *, device: str = "auto",
             backend: str = "auto") -> dict[str, Any]:
        """Make sure the model is loaded; returns its description (``loaded_now`` says if this call loaded it)."""
        return self.request({"op": "load", "model": _model_arg(model), "device": device, "backend": backend})[0]

    def encode(self, texts: list[str], model: str | os.PathLike[str] | None = None, *, device: str = "auto",
               backend: str = "auto", dtype: str = "float32") -> tuple[np.ndarray, dict[str, Any]]:
        """Raw (not normalised) vectors for ``texts`` as ``dtype`` (float32/float16), and the response header."""
        resp, payload = self.request({"op": "encode", "model": _model_arg(model), "device": device,
                                      "backend": backend, "texts": list(texts), "dtype": dtype})
        return array_from(resp, payload), resp

    def release(self) -> int:
        """Release every model not in use now; returns how many were released."""
        return int(self.request({"op": "release"})[0]["released"])

    def shutdown_service(self) -> None:
        """Ask the service to exit (it finishes requests in flight). No-op if none is running."""
        if ping(self.path) is None:
            return
        with contextlib.suppress(ModelServiceError):
            self.request({"op": "shutdown"})
        self.close()


def _model_arg(model: str | os.PathLike[str] | None) -> str | None:
    return None if model is None else str(resolve_model_path(model))


class _FastTokenizer:
    """The subset of a Hugging Face fast tokenizer that chunking uses, straight from ``tokenizer.json``
    (importing transformers would import torch, which is what the service saves a task)."""

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(str(path))
        self._tok.no_truncation()
        self._tok.no_padding()

    def __call__(self, text: str, *, add_special_tokens: bool = True, return_offsets_mapping: bool = False,
                 truncation: bool = False, verbose: bool = True, **_: Any) -> dict[str, Any]:
        if truncation:
            raise ValueError("this tokenizer is for chunking only; truncation happens in the model service")
        enc = self._tok.encode(text, add_special_tokens=add_special_tokens)
        out: dict[str, Any] = {"input_ids": enc.ids, "attention_mask": enc.attention_mask}
        if return_offsets_mapping:
            out["offset_mapping"] = enc.offsets
        return out


class ServiceEmbedder:
    """An ``Embedder`` whose model is held by the worker-local model service.

    Same arguments as ``Embedder`` for what decides the vectors (``model``, ``device``,
    ``backend``, ``normalize``, ``model_name``, ``model_revision``); batching and threads are the
    service's. Raises ``ModelNotFoundError`` for a bad path before contacting the service,
    ``ModelServiceError`` when the service cannot be reached or started, and whatever the
    service reports for a failed load (e.g. ``GpuMemoryError``). ``loaded_now`` says whether
    this object's construction made the service load the model (False: it was warm).
    """

    encoder = "service"

    def __init__(self, model: str | os.PathLike[str] | None = None, *, device: str = "auto", backend: str = "auto",
                 normalize: bool = True, model_name: str | None = None, model_revision: str | None = None,
                 client: ModelClient | None = None, service_socket: str | os.PathLike[str] | None = None) -> None:
        self.model_path = resolve_model_path(model)
        if model is None and model_name is None:
            model_name = PACKAGED_MODEL_NAME
        self.client = client or ModelClient(service_socket)
        info = self.client.load(self.model_path, device=device, backend=backend)
        self.device, self.backend, self.normalize = info["device"], info["backend"], normalize
        self.dim, self.max_seq_length = int(info["dim"]), int(info["max_seq_length"])
        self.precision = info["precision"]
        self.loaded_now, self.service_pid = bool(info["loaded_now"]), info["service_pid"]
        self.record = dict(info["record"], name=model_name or info["record"]["name"], revision=model_revision)
        self._remote = info["describe"]
        self._request = {"device": self.device, "backend": info.get("key_backend", self.backend)}
        self.model_calls = 0
        self.texts_encoded = 0
        self._tokenizer: Any = None

    @property
    def tokenizer(self) -> Any:
        """The model's tokenizer (fast, from ``tokenizer.json``; transformers' otherwise), loaded on first use."""
        if self._tokenizer is None:
            if (self.model_path / "tokenizer.json").is_file():
                self._tokenizer = _FastTokenizer(self.model_path / "tokenizer.json")
            else:
                from transformers import AutoTokenizer

                self._tokenizer = AutoTokenizer.from_pretrained(str(self.model_path), local_files_only=True)
        return self._tokenizer

    def describe(self) -> dict[str, Any]:
        """Like ``Embedder.describe``, plus ``encoder: "service"``."""
        out = dict(self._remote, normalize=self.normalize, encoder=self.encoder)
        out["model"] = {k: self.record[k] for k in ("name", "path", "revision", "weights_sha256")}
        return out

    def embed(self, texts: list[str]) -> np.ndarray:
        """Float32 (n, dim) vectors, L2-normalised when ``normalize``; as ``Embedder.embed`` returns them."""
        import numpy as np

        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        out, resp = self.client.encode(list(texts), self.model_path, **self._request)
        out = np.array(out, dtype=np.float32)  # writable copy, as Embedder returns
        self.model_calls += int(resp.get("batches", 1))
        self.texts_encoded += len(texts)
        if self.normalize:
            norms = np.linalg.norm(out, axis=1, keepdims=True)
            out /= np.maximum(norms, 1e-12)
        return out

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Ray-style batch: the input columns plus ``embedding`` (n x dim float32)."""
        out = dict(batch)
        out["embedding"] = self.embed([str(t) for t in batch["text"]])
        return out


def make_embedder(model: str | os.PathLike[str] | None = None, *, encoder: str = "auto", **kwargs: Any) -> Any:
    """An ``Embedder`` (``encoder="local"``) or ``ServiceEmbedder`` (``"service"``); see the module doc for ``"auto"``."""
    from airflow_outpost.runners.embeddings.embedder import Embedder

    if encoder not in ENCODERS:
        raise ValueError(f"encoder={encoder!r} is not allowed; use one of {', '.join(ENCODERS)}")
    tuning = sorted(set(kwargs) - _SERVICE_KWARGS)
    if encoder == "service" and tuning:
        raise ValueError(f"encoder='service' does not take {', '.join(tuning)}: the service owns batching "
                         "and threads; use encoder='local' to tune them")
    if encoder == "auto":
        off = os.environ.get(ENV_SERVICE, "").strip().lower() in ("0", "false", "no", "off")
        if tuning or off or not os.environ.get("OUTPOST_WORKER_NAME"):
            return Embedder(model, **kwargs)
        resolve_model_path(model)  # a bad path is the caller's error, not a reason to fall back
        try:
            return ServiceEmbedder(model, **kwargs)
        except ModelServiceError as exc:
            log.warning("model service unavailable (%s); loading the model in this task instead "
                        "(set %s=0 to skip the service, or %s to tune its idle time)", exc, ENV_SERVICE, ENV_IDLE)
            return Embedder(model, **kwargs)
    if encoder == "service":
        return ServiceEmbedder(model, **kwargs)
    return Embedder(model, **kwargs)
