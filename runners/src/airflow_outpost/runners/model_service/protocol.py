"""Wire format of the worker-local model service, shared by ``model_service`` and ``model_client``.

One message = a 4-byte big-endian header length, a JSON header (UTF-8), then ``header["nbytes"]``
raw bytes (0 when absent). Vectors travel as raw little-endian float32/float16 rows described by
``shape`` and ``dtype`` in the header; nothing is ever pickled, so a peer can only send data.

A request names an ``op``; a response has ``ok``. A failed response carries ``error`` (the
exception class name) and ``message``; ``error_for`` turns it back into a runner exception.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import struct
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airflow_outpost.runners.errors import (
    BackendUnavailableError,
    GpuMemoryError,
    ModelError,
    ModelNotFoundError,
    ModelServiceError,
    RunnerError,
)

if TYPE_CHECKING:
    import numpy as np

ENV_SOCKET = "OUTPOST_MODEL_SOCKET"
# The uid of the worker that serves OUTPOST_MODEL_SOCKET, when tasks run as another user (the
# worker's task_user): the client accepts a server of that uid as well as its own.
ENV_SERVICE_UID = "OUTPOST_MODEL_SERVICE_UID"


def trusted_uids() -> set[int]:
    """This process's uid, and the worker's (``OUTPOST_MODEL_SERVICE_UID``) when one is given."""
    uids = {os.getuid()}
    if (worker := os.environ.get(ENV_SERVICE_UID, "")).isdigit():
        uids.add(int(worker))
    return uids
ENV_IDLE = "OUTPOST_MODEL_IDLE_S"
DEFAULT_IDLE_S = 600.0
SOCKET_NAME = ".model-service.sock"
PROTOCOL = 1
MAX_HEADER = 64 * 1024 * 1024
MAX_PAYLOAD = 2 * 1024 * 1024 * 1024
WIRE_DTYPES = ("float32", "float16")
_LEN = struct.Struct(">I")
# The longest path a UNIX socket address can hold on Linux (sun_path is 108 bytes, NUL included).
_MAX_SOCKET_PATH = 107
# struct ucred (pid, uid, gid) as SO_PEERCRED returns it: both ends check the other's uid.
PEERCRED = struct.Struct("3i")


_ERRORS: dict[str, type[RunnerError]] = {
    cls.__name__: cls
    for cls in (ModelError, ModelNotFoundError, BackendUnavailableError, ModelServiceError, GpuMemoryError)
}


def socket_path(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The service socket: ``explicit``, else ``$OUTPOST_MODEL_SOCKET``, else
    ``$OUTPOST_STORE_ROOT/.model-service.sock``, else one per user in the temp folder."""
    if explicit:
        path = Path(explicit)
    elif os.environ.get(ENV_SOCKET):
        path = Path(os.environ[ENV_SOCKET])
    elif os.environ.get("OUTPOST_STORE_ROOT"):
        path = Path(os.environ["OUTPOST_STORE_ROOT"]) / SOCKET_NAME
    else:
        path = private_dir(Path(tempfile.gettempdir()) / f"outpost-model-service-{os.getuid()}") / "service.sock"
    path = path.expanduser().absolute()
    if len(os.fsencode(path)) > _MAX_SOCKET_PATH:
        raise ModelServiceError(
            f"model service socket path {path} is {len(os.fsencode(path))} bytes; UNIX sockets allow "
            f"{_MAX_SOCKET_PATH}: set {ENV_SOCKET} to a shorter path"
        )
    return path


def private_dir(path: Path) -> Path:
    """``path`` as a folder only this user can enter: created 0700, or checked to be this user's and
    closed to others (a folder in the shared temp folder that another user made first is refused)."""
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        pass
    st = path.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise ModelServiceError(
            f"{path} must be a folder of this user (uid {os.getuid()}) closed to others (0700), but it is "
            f"owned by uid {st.st_uid} with mode {stat.S_IMODE(st.st_mode):o}: remove it, or set {ENV_SOCKET}"
        )
    return path


def idle_seconds(value: str | float | None = None) -> float:
    """``OUTPOST_MODEL_IDLE_S`` (or ``value``) as seconds > 0; a bad value names the setting."""
    raw = os.environ.get(ENV_IDLE) if value is None else value
    if raw is None or raw == "":
        return DEFAULT_IDLE_S
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ValueError(f"{ENV_IDLE}={raw!r} is invalid: must be a number of seconds > 0")
    return seconds


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ConnectionError(f"peer closed the connection after {got} of {n} bytes")
        got += k
    return bytes(buf)


def send_message(sock: socket.socket, header: dict[str, Any], payload: bytes | memoryview = b"") -> None:
    """Send one framed message (header gets ``nbytes`` set from ``payload``)."""
    header = dict(header, nbytes=len(payload))
    data = json.dumps(header, separators=(",", ":")).encode()
    sock.sendall(_LEN.pack(len(data)) + data)
    if len(payload):
        sock.sendall(payload)


def recv_message(sock: socket.socket) -> tuple[dict[str, Any], bytes]:
    """Receive one framed message; raises ConnectionError on EOF, ValueError on a bad frame."""
    (size,) = _LEN.unpack(_recv_exact(sock, _LEN.size))
    if size > MAX_HEADER:
        raise ValueError(f"message header of {size} bytes exceeds the {MAX_HEADER} byte limit")
    header = json.loads(_recv_exact(sock, size))
    if not isinstance(header, dict):
        raise ValueError("message header is not a JSON object")
    nbytes = int(header.get("nbytes", 0))
    if not 0 <= nbytes <= MAX_PAYLOAD:
        raise ValueError(f"payload of {nbytes} bytes is out of range")
    return header, _recv_exact(sock, nbytes) if nbytes else b""


def array_payload(vectors: np.ndarray, dtype: str) -> tuple[dict[str, Any], bytes]:
    """Header fields and little-endian bytes for a 2-D array sent as ``dtype``."""
    import numpy as np

    arr = np.ascontiguousarray(vectors, dtype=np.dtype(dtype).newbyteorder("<"))
    return {"shape": list(arr.shape), "dtype": dtype}, arr.tobytes()


def array_from(header: dict[str, Any], payload: bytes) -> np.ndarray:
    """Rebuild the array described by ``header`` from ``payload`` (checked against the shape)."""
    import numpy as np

    dtype = header.get("dtype")
    if dtype not in WIRE_DTYPES:
        raise ModelServiceError(f"model service sent vectors of dtype {dtype!r}; expected one of {WIRE_DTYPES}")
    shape = tuple(int(x) for x in header["shape"])
    arr = np.frombuffer(payload, dtype=np.dtype(dtype).newbyteorder("<"))
    if arr.size != int(np.prod(shape)):
        raise ModelServiceError(f"model service sent {arr.size} values for shape {shape}")
    return arr.reshape(shape).astype(dtype, copy=False)


def error_header(exc: BaseException) -> dict[str, Any]:
    """A failed response for ``exc`` (runner errors keep their class; others become ModelError)."""
    name = type(exc).__name__ if type(exc).__name__ in _ERRORS else "ModelError"
    return {"ok": False, "error": name, "message": str(exc) or type(exc).__name__}


def error_for(header: dict[str, Any]) -> RunnerError:
    """The exception a failed response stands for."""
    cls = _ERRORS.get(str(header.get("error")), ModelError)
    return cls(f"model service: {header.get('message', 'unknown error')}")
