"""What a benchmark ran on, written next to every figure: CPU model, cores, memory, Python, GPUs.

The implementation ships with the package (``airflow_outpost.runners.bench.run``, also used by ``outpost bench``).
"""

from __future__ import annotations

from airflow_outpost.runners.bench.run import describe_machine as describe
from airflow_outpost.runners.bench.run import machine_summary as summary

__all__ = ["describe", "summary"]
