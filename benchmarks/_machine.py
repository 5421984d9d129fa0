"""What a benchmark ran on, written next to every figure: CPU model, cores, Python, GPUs."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def describe() -> dict:
    """``{"cpu", "cores", "python", "gpus"?}`` for the machine running this process."""
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict = {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version()}
    try:
        import torch

        if torch.cuda.is_available():
            info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except ImportError:
        pass
    return info


def summary() -> str:
    """One line: ``"<cpu>, <n> cores, Python x.y[, GPUs: ...]"``."""
    info = describe()
    gpus = f", GPUs: {', '.join(info['gpus'])}" if info.get("gpus") else ""
    return f"{info['cpu']}, {info['cores']} cores, Python {info['python']}{gpus}"
