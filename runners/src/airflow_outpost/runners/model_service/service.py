"""Worker-local model service: keeps embedding models loaded between task processes.

The stock worker runs every task in a new process, so every task would load its model again.
The first task that asks for a model (``airflow_outpost.runners.model_service.client``) starts this service (one per
socket, i.e. per worker store; a file lock makes concurrent first clients start exactly one);
later tasks on the same worker get vectors from the already loaded model.

* Models are keyed by (model path, device, backend), ``device``/``backend`` ``auto`` resolved
  here the same way ``Embedder`` resolves them. Loaded once, shared by every client; encodes on
  one model are serialised (they would only compete for the same cores or GPU).
* A model unused for ``idle_s`` (``OUTPOST_MODEL_IDLE_S``, default 600) is released; when the
  service holds no model and no client is connected, it removes its socket and exits.
* GPU memory is never oversubscribed: before a CUDA load the service asks the driver for the
  free memory (``torch.cuda.mem_get_info``), releases idle models on that GPU if that is not
  enough, and otherwise refuses with ``GpuMemoryError`` naming what is needed and what is free.
  Loads on GPUs are serialised so two loads cannot both pass the check.
* The socket is created 0600 and a peer with another uid is refused (``SO_PEERCRED``); a worker
  whose tasks run as another user (``task_user``) starts it with ``--allow-uid`` (that user) and
  ``--socket-group`` (a group both share): the socket is then 0660 to that group. The wire
  format is JSON headers plus raw float bytes (``airflow_outpost.runners.model_service.protocol``), never pickle.

Where task processes cannot leave a process behind (the worker's pre-forked task launcher kills
processes a finished task left), start the service next to the worker instead and give tasks
its socket: ``python -m airflow_outpost.runners.model_service.service --persistent --socket PATH`` with
``OUTPOST_MODEL_SOCKET=PATH`` in the worker's environment. ``--persistent`` keeps it serving
when it holds no model; it still exits when its socket file is removed.

``ModelService(socket_path).run()`` serves until ``shutdown()`` or idle exit (``shutdown`` is safe
before ``run`` and twice). ``python -m airflow_outpost.runners.model_service.service --socket PATH`` runs it; with
``--spawn`` it starts a detached service and exits once that answers (what clients use).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from airflow_outpost.runners.errors import ModelError, RunnerError
from airflow_outpost.runners.model_service.protocol import (
    PEERCRED,
    PROTOCOL,
    GpuMemoryError,
    array_payload,
    error_header,
    idle_seconds,
    recv_message,
    send_message,
    socket_path,
)

__all__ = ["ModelService", "main"]

log = logging.getLogger("airflow_outpost.runners.model_service.service")
# Memory a CUDA load needs beyond the weights: CUDA context, allocator slack, activations of
# the embedder's token-budget batches. Overridable for larger models or tighter GPUs.
ENV_GPU_RESERVE = "OUTPOST_MODEL_GPU_RESERVE_MB"
DEFAULT_GPU_RESERVE_MB = 1024


@dataclass
class _Loaded:
    key: tuple[str, str, str]
    embedder: Any
    load_s: float
    weights_bytes: int
    lock: threading.Lock = field(default_factory=threading.Lock)
    calls: int = 0
    texts: int = 0
    in_use: int = 0
    last_used: float = field(default_factory=time.monotonic)


def _weights_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*")
               if p.is_file() and p.suffix in (".safetensors", ".bin", ".pt", ".onnx"))


class ModelService:
    """Serves ``load``/``encode``/``stats``/``release``/``shutdown`` requests on a UNIX socket."""

    def __init__(self, path: str | os.PathLike[str] | None = None, *, idle_s: float | None = None,
                 gpu_reserve_mb: int | None = None, threads: int | None = None, persistent: bool = False,
                 clock: Callable[[], float] = time.monotonic, allow_uids: tuple[int, ...] = (),
                 socket_group: int | None = None) -> None:
        self.path = socket_path(path)
        self.allowed_uids = {os.getuid(), *allow_uids}
        self.socket_group = socket_group
        self.idle_s = idle_seconds(idle_s)
        self.gpu_reserve_mb = int(os.environ.get(ENV_GPU_RESERVE, DEFAULT_GPU_RESERVE_MB)
                                  if gpu_reserve_mb is None else gpu_reserve_mb)
        self.threads = threads
        self.persistent = persistent
        self.clock = clock
        self.loads = 0
        self.requests = 0
        self.started = clock()
        self.last_activity = self.started
        self._models: dict[tuple[str, str, str], _Loaded] = {}
        self._key_locks: dict[tuple[str, str, str], threading.Lock] = {}
        self._lock = threading.Lock()
        self._gpu_lock = threading.Lock()
        # Connections that asked for a model (load/encode): they keep the service up while open.
        # Pings and stats do not, or a health check every fraction of a second would keep an
        # idle service alive forever.
        self._clients = 0
        self._stop = threading.Event()
        self._sock: socket.socket | None = None
        self._inode: int | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    def bind(self) -> None:
        """Create the socket (0600). Replaces a stale socket file nobody answers on."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            sock.bind(str(self.path))
        finally:
            os.umask(old)
        if self.socket_group is not None:
            os.chown(self.path, -1, self.socket_group)
            os.chmod(self.path, 0o660)
        else:
            os.chmod(self.path, 0o600)
        sock.listen(64)
        sock.settimeout(0.5)
        self._sock, self._inode = sock, self.path.stat().st_ino

    def run(self) -> int:
        """Serve until ``shutdown()`` or until idle with no model and no client; returns 0."""
        if self._stop.is_set():
            return 0
        if self._sock is None:
            self.bind()
        log.info("model service pid %d on %s (idle release after %.0fs)", os.getpid(), self.path, self.idle_s)
        assert self._sock is not None
        last_reap = self.clock()
        try:
            while not self._stop.is_set():
                # Reap on a clock, not only when accept() times out: steady pings must not keep
                # idle models loaded.
                if self.clock() - last_reap >= 0.5:
                    last_reap = self.clock()
                    self._reap()
                    if self._stop.is_set():
                        break
                try:
                    conn, _ = self._sock.accept()
                except TimeoutError:
                    continue
                threading.Thread(target=self._serve, args=(conn,), daemon=True, name="model-client").start()
        finally:
            self._close_socket()
            for key in list(self._models):
                self._release(key)
            log.info("model service exits (%d load(s), %d request(s))", self.loads, self.requests)
        return 0

    def shutdown(self) -> None:
        """Stop accepting and make ``run()`` return. Safe before ``run()`` and twice."""
        self._stop.set()

    def _close_socket(self) -> None:
        sock, self._sock = self._sock, None
        if sock is None:
            return
        # Remove the socket file before closing, so that nobody ever sees a refused connection with
        # the file still there (a client would take that for a crashed service); remove it only if
        # it is still ours (a successor may have replaced it).
        with contextlib.suppress(FileNotFoundError):
            if self.path.stat().st_ino == self._inode:
                self.path.unlink()
        sock.close()

    def _reap(self) -> None:
        now = self.clock()
        with self._lock:
            idle = [k for k, m in self._models.items() if m.in_use == 0 and now - m.last_used >= self.idle_s]
        for key in idle:
            log.info("releasing %s on %s/%s: unused for %.0fs", *key, now - self._models[key].last_used)
            self._release(key)
        try:
            gone = self.path.stat().st_ino != self._inode
        except FileNotFoundError:
            gone = True
        if gone:  # the socket was removed or taken over: nobody can reach this service any more
            log.info("socket %s is gone: exiting", self.path)
            self.shutdown()
            return
        with self._lock:
            empty = not self._models and not self._clients
            quiet = now - self.last_activity >= self.idle_s
        # Exit once the last model is released, or when nothing was ever loaded for idle_s.
        if empty and (idle or quiet) and not self.persistent:
            log.info("no models held and no clients: exiting")
            self.shutdown()

    # -- models ------------------------------------------------------------------------------
    def resolve_key(self, model: str | None, device: str, backend: str) -> tuple[str, str, str]:
        """(absolute model path, device, backend) with ``auto`` resolved; checks the path."""
        from airflow_outpost.runners.embeddings.embedder import BACKENDS, resolve_model_path

        path = resolve_model_path(model)
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r} is not allowed; use one of {', '.join(BACKENDS)}")
        if device == "auto" or backend == "auto":
            import torch

            if device == "auto":
                device = "cuda:0" if torch.cuda.is_available() else "cpu"
            if backend == "auto":
                # On CPU the embedder picks among its fast backends itself (with fallbacks).
                backend = "torch" if device.startswith("cuda") else "auto"
        if device == "cuda":
            device = "cuda:0"  # one replica on one GPU per key; ask for cuda:N for another GPU
        return str(path), device, backend

    def acquire(self, key: tuple[str, str, str]) -> tuple[_Loaded, bool]:
        """The loaded model for ``key`` (loading it if needed), marked in use; and whether it loaded now."""
        with self._lock:
            lock = self._key_locks.setdefault(key, threading.Lock())
        with lock:
            with self._lock:
                entry = self._models.get(key)
                if entry is not None:
                    entry.in_use += 1
                    return entry, False
            entry = self._load(key)
            with self._lock:
                self._models[key] = entry
                entry.in_use += 1
            return entry, True

    def _load(self, key: tuple[str, str, str]) -> _Loaded:
        from airflow_outpost.runners.embeddings.embedder import Embedder

        path, device, backend = key
        weights = _weights_bytes(Path(path))
        started = time.perf_counter()
        gpu = device.startswith("cuda")
        with self._gpu_lock if gpu else contextlib.nullcontext():
            if gpu:
                self._check_gpu_memory(device, weights)
            embedder = Embedder(path, device=device, backend=backend, normalize=False, multi_gpu=False,
                                threads=self.threads)
        self.loads += 1
        load_s = time.perf_counter() - started
        log.info("loaded %s on %s/%s in %.1fs", path, device, embedder.backend, load_s)
        return _Loaded(key, embedder, load_s, weights)

    def _check_gpu_memory(self, device: str, weights: int) -> None:
        import torch

        index = torch.device(device).index or 0
        # bf16/fp16 weights are half the fp32 file; count them whole as margin for the load itself.
        need = weights + self.gpu_reserve_mb * 2**20
        free, total = torch.cuda.mem_get_info(index)
        if free < need:
            with self._lock:
                idle = [k for k, m in self._models.items() if k[1] == device and m.in_use == 0]
            for key in idle:
                log.info("releasing idle %s on %s to make room on the GPU", key[0], device)
                self._release(key)
            free, total = torch.cuda.mem_get_info(index)
        if free < need:
            raise GpuMemoryError(
                f"not loading a model of {weights / 2**20:.0f} MiB on {device}: it needs about "
                f"{need / 2**20:.0f} MiB (weights + {ENV_GPU_RESERVE}={self.gpu_reserve_mb}) but only "
                f"{free / 2**20:.0f} of {total / 2**20:.0f} MiB are free; wait for other models to be "
                f"released (OUTPOST_MODEL_IDLE_S) or use another device"
            )

    def _release(self, key: tuple[str, str, str]) -> bool:
        with self._lock:
            entry = self._models.get(key)
            if entry is None or entry.in_use:
                return False
            del self._models[key]
        device = key[1]
        del entry
        gc.collect()
        if device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()
        return True

    def stats(self) -> dict[str, Any]:
        """What the service holds: counts per model and in total (JSON-able)."""
        now = self.clock()
        with self._lock:
            models = [{"model": m.key[0], "device": m.key[1], "backend": m.key[2], "calls": m.calls,
                       "texts": m.texts, "load_s": round(m.load_s, 3), "idle_s": round(now - m.last_used, 3),
                       "in_use": m.in_use} for m in self._models.values()]
        return {"pid": os.getpid(), "protocol": PROTOCOL, "loads": self.loads, "requests": self.requests,
                "models": models, "idle_release_s": self.idle_s, "uptime_s": round(now - self.started, 3)}

    # -- requests ----------------------------------------------------------------------------
    def _serve(self, conn: socket.socket) -> None:
        client = False
        try:
            with conn:
                pid, uid, _ = PEERCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, PEERCRED.size))
                if uid not in self.allowed_uids:
                    log.warning("refusing a client with uid %d (pid %d): the service serves uid %s only",
                                uid, pid, ", ".join(map(str, sorted(self.allowed_uids))))
                    return
                while not self._stop.is_set():
                    try:
                        header, _ = recv_message(conn)
                    except (ConnectionError, ValueError) as exc:
                        if not isinstance(exc, ConnectionError):
                            log.warning("dropping client pid %d: %s", pid, exc)
                        return
                    if not client and header.get("op") in ("load", "encode"):
                        client = True
                        with self._lock:
                            self._clients += 1
                    head, payload = self._handle(header)
                    send_message(conn, head, payload)
        except OSError as exc:
            log.warning("client connection failed: %s", exc)
        finally:
            if client:
                with self._lock:
                    self._clients -= 1

    def _handle(self, req: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
        self.requests += 1
        op = req.get("op")
        try:
            if op == "ping":
                return {"ok": True, "pid": os.getpid(), "protocol": PROTOCOL}, b""
            if op == "stats":
                return {"ok": True, **self.stats()}, b""
            if op == "shutdown":
                self.shutdown()
                return {"ok": True}, b""
            if op == "release":
                with self._lock:
                    keys = list(self._models)
                return {"ok": True, "released": sum(self._release(k) for k in keys)}, b""
            if op in ("load", "encode"):
                return self._model_op(op, req)
            return {"ok": False, "error": "ModelServiceError", "message": f"unknown op {op!r}"}, b""
        except (RunnerError, ValueError, OSError, RuntimeError) as exc:
            # Reported to the client, which raises it in the task; the service keeps serving.
            log.warning("%s request failed: %s", op, exc)
            return error_header(exc), b""

    def _model_op(self, op: str, req: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
        key = self.resolve_key(req.get("model"), str(req.get("device", "auto")), str(req.get("backend", "auto")))
        try:
            entry, loaded_now = self.acquire(key)
        except (OSError, RuntimeError) as exc:
            raise ModelError(f"cannot load {key[0]} on {key[1]}/{key[2]}: {exc}") from exc
        try:
            emb = entry.embedder
            # key_backend is what the client must send to reach this same entry again: on CPU
            # "auto" stays "auto" in the key while the embedder reports the backend it chose.
            info = {"ok": True, "model": key[0], "device": emb.device, "backend": emb.backend, "key_backend": key[2],
                    "loaded_now": loaded_now, "load_s": round(entry.load_s, 3), "service_pid": os.getpid()}
            if op == "load":
                return {**info, "dim": emb.dim, "max_seq_length": emb.max_seq_length, "record": emb.record,
                        "describe": emb.describe(), "precision": emb.precision}, b""
            texts = req.get("texts")
            if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
                raise ValueError("encode needs 'texts': a list of strings")
            with entry.lock:
                calls_before = emb.model_calls
                vectors = emb.embed(texts)
                batches = emb.model_calls - calls_before
                entry.calls += 1
                entry.texts += len(texts)
            head, payload = array_payload(vectors, str(req.get("dtype", "float32")))
            return {**info, **head, "batches": batches}, payload
        finally:
            with self._lock:
                entry.in_use -= 1
                entry.last_used = self.clock()
                self.last_activity = entry.last_used


def _spawn(path: Path, idle_s: float, timeout_s: float) -> int:
    """Start a detached service on ``path`` and return 0 once it answers (1 with its log if not)."""
    from airflow_outpost.runners.model_service.client import ping

    log_path = path.with_name(path.name + ".log")
    with open(log_path, "ab") as out:
        child = subprocess.Popen(
            [sys.executable, "-m", "airflow_outpost.runners.model_service.service", "--socket", str(path), "--idle-s", str(idle_s)],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            close_fds=True, cwd="/",
        )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if child.poll() is not None:
            break
        if ping(path, timeout_s=1.0) is not None:
            print(child.pid, flush=True)
            return 0
        time.sleep(0.05)
    tail = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
    print(f"model service on {path} did not answer within {timeout_s:.0f}s "
          f"(exit {child.poll()}); log {log_path}:\n{tail}", file=sys.stderr, flush=True)
    return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m airflow_outpost.runners.model_service.service", description=__doc__.splitlines()[0])
    parser.add_argument("--socket", help="socket path (default: OUTPOST_MODEL_SOCKET, then the store root)")
    parser.add_argument("--idle-s", type=float, default=None, help="release models unused this long (seconds)")
    parser.add_argument("--threads", type=int, default=None, help="torch/ONNX threads for CPU models")
    parser.add_argument("--persistent", action="store_true",
                        help="release idle models but keep serving (for a service started next to the worker)")
    parser.add_argument("--allow-uid", type=int, action="append", default=[],
                        help="serve this uid too (the worker's task_user; repeatable)")
    parser.add_argument("--socket-group", type=int, default=None,
                        help="give the socket to this gid, mode 0660 (a group the allowed users share)")
    parser.add_argument("--spawn", action="store_true", help="start a detached service and wait until it answers")
    parser.add_argument("--spawn-timeout-s", type=float, default=60.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        path = socket_path(args.socket)
        idle_s = idle_seconds(args.idle_s)
    except (RunnerError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.spawn:
        return _spawn(path, idle_s, args.spawn_timeout_s)
    service = ModelService(path, idle_s=idle_s, threads=args.threads, persistent=args.persistent,
                           allow_uids=tuple(args.allow_uid), socket_group=args.socket_group)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: service.shutdown())
    return service.run()


if __name__ == "__main__":
    sys.exit(main())
