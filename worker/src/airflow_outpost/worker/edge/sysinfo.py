"""System information sent with every heartbeat: versions the server checks, CPU, memory, GPUs."""

from __future__ import annotations

import logging
import os
import platform
import sys
from datetime import datetime
from functools import cache
from importlib.metadata import PackageNotFoundError, version

import psutil

# Edge provider version of the server this release was tested against; used only when the
# provider is not installed on the worker and no edge_provider_version is configured.
TESTED_EDGE_PROVIDER_VERSION = "5.1.0"


@cache
def _pkg(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def airflow_version() -> str:
    """The Airflow core version the task processes run (the server compares it with its own)."""
    return _pkg("apache-airflow-core") or _pkg("apache-airflow") or "unknown"


def task_sdk_version() -> str:
    return _pkg("apache-airflow-task-sdk") or "unknown"


def edge_provider_version(configured: str | None) -> str:
    return configured or _pkg("apache-airflow-providers-edge3") or TESTED_EDGE_PROVIDER_VERSION


@cache
def gpus() -> list[dict[str, str | int]]:
    """GPUs visible to this host via NVML (``nvidia-ml-py``) if installed; empty otherwise."""
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
        out: list[dict[str, str | int]] = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
            name = pynvml.nvmlDeviceGetName(handle)
            out.append({"index": i, "name": name.decode() if isinstance(name, bytes) else str(name),
                        "memory_mb": int(mem.total // 2**20)})
        return out
    except Exception as exc:  # NVML present but no driver/GPU: report none, say why once
        logging.getLogger(__name__).info("no GPUs via NVML: %s", exc)
        return []


def sysinfo(*, concurrency: int, free_concurrency: int, started: datetime, edge_version: str | None,
            status: int = logging.INFO, status_text: str | None = None) -> dict[str, str | int | float | datetime]:
    mem = psutil.virtual_memory()
    info: dict[str, str | int | float | datetime] = {
        "status": status,
        "airflow_version": airflow_version(),
        "edge_provider_version": edge_provider_version(edge_version),
        "outpost_version": _pkg("airflow-outpost") or "dev",
        "task_sdk_version": task_sdk_version(),
        "python_version": sys.version.split()[0],
        "platform": platform.platform(),
        "worker_start_time": started,
        "concurrency": concurrency,
        "free_concurrency": free_concurrency,
        "cpu_count": os.cpu_count() or 0,
        # An int: edge3 before 4.x takes only str and int values in sysinfo (HTTP 422 on a float).
        "cpu_percent": round(psutil.cpu_percent(interval=None)),
        "memory_total_mb": int(mem.total // 2**20),
        "memory_available_mb": int(mem.available // 2**20),
        "gpu_count": len(gpus()),
    }
    for g in gpus():
        info[f"gpu{g['index']}"] = f"{g['name']} {g['memory_mb']}MB"
    if status_text:
        info["status_text"] = status_text
    return info
