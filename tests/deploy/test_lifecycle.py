"""Idle exit and preemption-notice drain, driven by a fake clock."""

from __future__ import annotations

from pathlib import Path

import pytest
from types import SimpleNamespace

from worker.config import load_settings
from worker.lifecycle import Lifecycle


class FakeWorker:
    def __init__(self, tmp: Path, **flags) -> None:
        self.settings = load_settings({"api_url": "http://h:1", "drain_timeout_s": "300", **flags}, env={})
        self.jobs = SimpleNamespace(running={})
        self.shutdowns = 0

    def shutdown(self) -> None:
        self.shutdowns += 1


class Clock:
    t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_exits_after_idle_period_but_not_while_busy(tmp_path: Path) -> None:
    w, clock = FakeWorker(tmp_path, exit_when_idle_s="15m"), Clock()
    life = Lifecycle(w, clock=clock)
    clock.t += 899
    life.tick()
    assert w.shutdowns == 0
    w.jobs.running = {"job": object()}
    clock.t += 3600
    life.tick()  # busy for an hour: not idle
    assert w.shutdowns == 0
    w.jobs.running = {}
    clock.t += 899
    life.tick()
    assert w.shutdowns == 0
    clock.t += 1
    life.tick()
    assert w.shutdowns == 1 and life.exited_idle
    assert life.drain_timeout_s() == 300


def test_never_exits_when_off(tmp_path: Path) -> None:
    w, clock = FakeWorker(tmp_path), Clock()
    life = Lifecycle(w, clock=clock)
    clock.t += 10**6
    life.tick()
    assert w.shutdowns == 0


def test_preemption_notice_drains_with_short_timeout(tmp_path: Path) -> None:
    notice = tmp_path / "preempt"
    w = FakeWorker(tmp_path, preemption_notice_file=str(notice), preemption_drain_timeout_s="20s")
    life = Lifecycle(w)
    life.tick()
    assert w.shutdowns == 0 and life.drain_timeout_s() == 300
    notice.write_text("terminating at 12:00")
    # A plain SIGTERM arriving while the notice exists already gets the short timeout.
    assert life.drain_timeout_s() == 20
    life.tick()
    life.tick()
    assert w.shutdowns == 1 and life.preempted
    notice.unlink()
    assert life.drain_timeout_s() == 20


def test_warm_models_calls_the_runners_hook_in_a_child_process(tmp_path: Path, monkeypatch) -> None:
    import asyncio
    import os

    # A stand-in for runners.embedder: records what was warmed and with which env.
    fake = tmp_path / "fake"
    fake.mkdir(parents=True)
    (fake / "fake_embedder.py").write_text(
        "import os\n"
        "def warm(model):\n"
        f"    open({str(tmp_path / 'warmed')!r}, 'a').write(f'{{model}} {{os.environ.get(\"OUTPOST_JWT_SECRET\")}}\\n')\n")
    monkeypatch.setenv("PYTHONPATH", str(fake))
    monkeypatch.setattr(Lifecycle, "warm_module", "fake_embedder")
    monkeypatch.setenv("OUTPOST_JWT_SECRET", "s3cret")
    w = FakeWorker(tmp_path, warm_models="default,/models/e5")
    w._task_env = lambda: dict(os.environ)
    life = Lifecycle(w)

    async def scenario() -> None:
        life.start_warming()
        await life._warm
        await life.aclose()

    asyncio.run(scenario())
    assert (tmp_path / "warmed").read_text() == "None None\n/models/e5 None\n"  # no credentials either
    assert life.warm_result == {"default": "warm", "/models/e5": "warm"}


@pytest.mark.slow
def test_warm_the_packaged_model_for_real(tmp_path: Path) -> None:
    import asyncio
    import os

    w = FakeWorker(tmp_path, warm_models="default,/no/such/model")
    w._task_env = lambda: dict(os.environ)
    life = Lifecycle(w)

    async def scenario() -> None:
        life.start_warming()
        await life._warm

    asyncio.run(scenario())
    assert life.warm_result == {"default": "warm", "/no/such/model": "failed"}
