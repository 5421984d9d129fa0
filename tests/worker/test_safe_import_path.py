"""The worker's working directory never shadows a module that the zygote or a task process imports.

``python -m`` puts the current directory first on ``sys.path``; a ``json.py`` there (a DAG author's
scratch file, or one planted by another user of a shared folder) would be imported by the zygote
and every task instead of the standard library's. Task processes are started with ``python -P``.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from airflow_outpost.worker.processes.launcher import TaskLauncher


@pytest.mark.parametrize("prewarm", [1, 0], ids=["zygote", "fresh-interpreter"])
def test_a_json_py_in_the_workers_cwd_is_not_imported_by_task_processes(tmp_path: Path, prewarm: int,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    marker = tmp_path / "shadowed"
    for name in ("json", "typing_extensions"):
        (cwd / f"{name}.py").write_text(f"open({str(marker)!r}, 'a').write({name!r} + '\\n')\n"
                                        "raise ImportError('shadowed')\n")
    monkeypatch.chdir(cwd)

    async def main() -> tuple[int, str]:
        launcher = TaskLauncher(output_dir=tmp_path / "out", prewarm=prewarm)
        await launcher.start({"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": os.environ.get("PYTHONPATH", "")})
        try:
            # Not a valid workload: the task process reads it and fails, after its imports.
            proc = await launcher.launch({"type": "NotAWorkload"}, "http://127.0.0.1:9/execution/")
            rc = await asyncio.wait_for(proc.wait(), 120)
            return rc, proc.output_tail()
        finally:
            await launcher.aclose()

    rc, output = asyncio.run(main())
    assert not marker.exists(), f"imported from the worker's cwd: {marker.read_text()}; task output:\n{output}"
    assert "shadowed" not in output
    assert rc != 0 and "NotAWorkload" in output, output  # it ran task_main and rejected the workload
