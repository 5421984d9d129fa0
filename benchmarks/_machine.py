"""What a benchmark ran on, written next to every figure: CPU model, cores, memory, Python, GPUs.

The implementation ships with the package (``runners.bench``, also used by ``outpost bench``).
"""

from __future__ import annotations

from runners.bench import describe_machine as describe
from runners.bench import machine_summary as summary

__all__ = ["describe", "summary"]
