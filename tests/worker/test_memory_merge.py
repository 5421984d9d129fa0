"""The ``memory_merge`` setting's checks at start and its opt-in, on the real kernel."""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from airflow_outpost.worker.config import load_settings
from airflow_outpost.worker.errors import ConfigError
from airflow_outpost.worker.preflight import check_memory_merge
from airflow_outpost.worker.processes import memory_merge


def _settings(merge: bool):
    return load_settings({"api_url": "http://h:8080", "memory_merge": "true" if merge else "false"}, env={})


def test_setting_parses_from_flag_env_and_rejects_garbage() -> None:
    assert _settings(True).memory_merge is True
    assert load_settings({"api_url": "http://h"}, env={}).memory_merge is False
    assert load_settings({"api_url": "http://h"}, env={"OUTPOST_MEMORY_MERGE": "yes"}).memory_merge is True
    with pytest.raises(ConfigError, match="memory_merge='maybe'.*true or false"):
        load_settings({"api_url": "http://h", "memory_merge": "maybe"}, env={})


def test_a_kernel_without_it_stops_the_worker_at_start_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory_merge, "_prctl", lambda option, arg=0: (-1, errno.EINVAL))
    with pytest.raises(ConfigError, match=r"memory_merge=True: the kernel refused PR_GET_MEMORY_MERGE .*Linux 6\.4"):
        check_memory_merge(_settings(True))
    check_memory_merge(_settings(False))  # off: the kernel is never asked
    monkeypatch.setattr(memory_merge, "_prctl", lambda option, arg=0: (-1, errno.EPERM))
    with pytest.raises(ConfigError, match=r"not permitted .*seccomp profile"):
        check_memory_merge(_settings(True))


def test_ksm_not_running_on_the_host_is_a_warning_not_a_refusal(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "run").write_text("0\n")
    monkeypatch.setattr(memory_merge, "KSM_SYSFS", tmp_path)
    with caplog.at_level(logging.WARNING):
        check_memory_merge(_settings(True))
    assert "KSM is not running on this host" in caplog.text and f"echo 1 > {tmp_path}/run" in caplog.text
    caplog.clear()
    (tmp_path / "run").write_text("1\n")
    with caplog.at_level(logging.WARNING):
        check_memory_merge(_settings(True))
    assert caplog.text == ""


def test_each_task_child_is_opted_in_and_its_task_process_inherits_it_but_not_the_zygote() -> None:
    """The zygote's steps with OUTPOST_MEMORY_MERGE=1: it reads the setting and stays out (ksmd has
    nothing of ours to scan while no task runs); a task child opts in, and the task process the
    Task SDK forks from it inherits that. With 0 nothing is opted in."""
    script = (
        "import os, sys, time\n"
        "from airflow_outpost.worker.processes import task_main as t, memory_merge as m\n"
        "t._read_memory_merge()\n"
        "assert 'OUTPOST_MEMORY_MERGE' not in os.environ  # tasks do not see it\n"
        "r, w = os.pipe()\n"
        "child = os.fork()\n"
        "if child == 0:\n"
        "    t._merge_memory()\n"
        "    grandchild = os.fork()\n"
        "    if grandchild == 0:\n"
        "        time.sleep(10); os._exit(0)\n"
        "    os.write(w, f'{m.merge_any(os.getpid())} {m.merge_any(grandchild)}'.encode())\n"
        "    os.kill(grandchild, 9); os._exit(0)\n"
        "got = os.read(r, 100).decode(); os.waitpid(child, 0)\n"
        "print(m.merge_any(os.getpid()), got)\n"
    )
    for flag, expected in (("1", ["False", "True", "True"]), ("0", ["False", "False", "False"])):
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                              env={**os.environ, "OUTPOST_MEMORY_MERGE": flag})
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == expected, (flag, done.stdout, done.stderr)
