"""Idle exit and preemption-notice drain, driven by a fake clock."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from airflow_outpost.worker.config import load_settings
from airflow_outpost.worker.runtime.lifecycle import Lifecycle


class Host:
    """What a Lifecycle is given: a running-jobs count to read and a shutdown to call."""

    def __init__(self, tmp: Path, **flags) -> None:
        self.settings = load_settings({"api_url": "http://h:1", "drain_timeout_s": "300", **flags}, env={})
        self.running = 0
        self.shutdowns = 0

    def shutdown(self) -> None:
        self.shutdowns += 1

    def lifecycle(self, **kw) -> Lifecycle:
        return Lifecycle(self.settings, running=lambda: self.running, shutdown=self.shutdown,
                         task_env=lambda: dict(os.environ), **kw)


class Clock:
    t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_exits_after_idle_period_but_not_while_busy(tmp_path: Path) -> None:
    w, clock = Host(tmp_path, exit_when_idle_s="15m"), Clock()
    life = w.lifecycle(clock=clock)
    clock.t += 899
    life.tick()
    assert w.shutdowns == 0
    w.running = 1
    clock.t += 3600
    life.tick()  # busy for an hour: not idle
    assert w.shutdowns == 0
    w.running = 0
    clock.t += 899
    life.tick()
    assert w.shutdowns == 0
    clock.t += 1
    life.tick()
    assert w.shutdowns == 1 and life.exited_idle
    assert life.drain_timeout_s() == 300


def test_never_exits_when_off(tmp_path: Path) -> None:
    w, clock = Host(tmp_path), Clock()
    life = w.lifecycle(clock=clock)
    clock.t += 10**6
    life.tick()
    assert w.shutdowns == 0


def test_preemption_notice_drains_with_short_timeout(tmp_path: Path) -> None:
    notice = tmp_path / "preempt"
    w = Host(tmp_path, preemption_notice_file=str(notice), preemption_drain_timeout_s="20s")
    life = w.lifecycle()
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


def test_warm_models_calls_the_runners_warm_in_a_child_process(tmp_path: Path, monkeypatch) -> None:
    import asyncio

    # A stand-in for airflow_outpost.runners.embeddings.embedder: records what was warmed and with which env.
    fake = tmp_path / "fake"
    fake.mkdir(parents=True)
    (fake / "fake_embedder.py").write_text(
        "import os\n"
        "def warm(model):\n"
        f"    open({str(tmp_path / 'warmed')!r}, 'a').write(f'{{model}} {{os.environ.get(\"OUTPOST_JWT_SECRET\")}}\\n')\n")
    monkeypatch.setenv("PYTHONPATH", str(fake))
    monkeypatch.setattr(Lifecycle, "warm_module", "fake_embedder")
    monkeypatch.setenv("OUTPOST_JWT_SECRET", "s3cret")
    w = Host(tmp_path, warm_models="default,/models/e5")
    life = w.lifecycle()

    async def scenario() -> None:
        life.start_warming()
        await life.warmed()
        await life.aclose()

    asyncio.run(scenario())
    assert (tmp_path / "warmed").read_text() == "None None\n/models/e5 None\n"  # no credentials either
    assert life.warm_result == {"default": "warm", "/models/e5": "warm"}


@pytest.mark.slow
def test_warm_the_packaged_model_for_real(tmp_path: Path) -> None:
    import asyncio

    w = Host(tmp_path, warm_models="default,/no/such/model")
    life = w.lifecycle()

    async def scenario() -> None:
        life.start_warming()
        await life.warmed()

    asyncio.run(scenario())
    assert life.warm_result == {"default": "warm", "/no/such/model": "failed"}
