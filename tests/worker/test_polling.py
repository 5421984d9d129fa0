"""How often a real in-process Worker asks the Edge API for work (a fake Edge API counts)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest

from airflow_outpost.worker.config import load_settings
from airflow_outpost.worker.runtime.worker import QUICK_POLL_WINDOW_S, Worker, quick_poll_s
from tests.egress.test_hostile_jobs import FakeEdgeApi


def _between(times: list[float], start: float, end: float) -> list[float]:
    return [t for t in times if start <= t < end]


def test_a_final_state_brings_quick_polls_for_half_a_second_and_idle_polling_stays_slow(tmp_path: Path) -> None:
    fake = FakeEdgeApi([])
    s = load_settings({"api_url": "http://cp.invalid:8080", "name": "poll-w", "state_folder": str(tmp_path / "state"),
                       "log_folder": str(tmp_path / "logs"), "prewarm": "0", "metrics_port": "0", "gpus": "none",
                       "model_service": "false", "poll_interval_s": "1", "poll_min_interval_s": "0.1"},
                      env={"OUTPOST_JWT_SECRET": "s" * 32})

    async def main() -> dict[str, list[float]]:
        worker = Worker(s, transport=httpx.MockTransport(fake))
        run = asyncio.create_task(worker.run())
        while fake.fetches == 0:
            assert not run.done(), run
            await asyncio.sleep(0.02)
        await asyncio.sleep(3)  # backed off to poll_interval_s by now
        idle_from = time.monotonic()
        await asyncio.sleep(2)
        assert worker.egress.on_task_state is not None
        worker.egress.on_task_state("ti-deferred", "deferred")  # not final: nothing queued downstream
        await asyncio.sleep(1.2)
        reported = time.monotonic()
        worker.egress.on_task_state("ti-1", "success")  # as the gateway calls it once the server accepted it
        await asyncio.sleep(QUICK_POLL_WINDOW_S + 2)
        # A fetch that returns work ends the window (this "work" is refused unread, which counts).
        fake.replies.append(httpx.Response(200, json=[1, 2, 3]))
        answered = time.monotonic()
        worker.egress.on_task_state("ti-2", "success")
        await asyncio.sleep(QUICK_POLL_WINDOW_S + 0.5)
        worker.shutdown()
        assert await asyncio.wait_for(run, 30) == 0
        return {"idle": _between(fake.fetched_at, idle_from, reported),
                "quick": _between(fake.fetched_at, reported, reported + QUICK_POLL_WINDOW_S),
                "after": _between(fake.fetched_at, reported + QUICK_POLL_WINDOW_S + 0.5, reported + QUICK_POLL_WINDOW_S + 2),
                "after_window": _between(fake.fetched_at, reported + QUICK_POLL_WINDOW_S, reported + QUICK_POLL_WINDOW_S + 0.7),
                "answered": _between(fake.fetched_at, answered, answered + QUICK_POLL_WINDOW_S)}

    polls = asyncio.run(main())
    # Idle (a deferral included): at most one fetch per poll_interval_s, as before.
    assert len(polls["idle"]) <= 5, polls["idle"]
    # After a final state: every 40 ms (0.4 x poll_min_interval_s) for the window, about 12 fetches.
    assert len(polls["quick"]) >= 8, polls["quick"]
    gaps = sorted(b - a for a, b in zip(polls["quick"], polls["quick"][1:], strict=False))
    assert gaps[len(gaps) // 2] < 0.07, gaps  # the median: one stall on a loaded machine is no failure
    # Then it backs off again, from poll_min_interval_s (not from where the quick polls left the back-off).
    after = polls["after"]
    assert len(after) <= 6, after
    # (0.1, 0.15, 0.225 s with jitter: three fetches in the 0.7 s after the window, not one a second)
    assert len(polls["after_window"]) >= 3, polls
    # Work came at the first quick fetch: the back-off (0.1, 0.15, 0.225 s) instead of 40 ms polls.
    assert 2 <= len(polls["answered"]) <= 7, polls["answered"]


def test_the_quick_poll_interval_follows_poll_min_interval_s_within_bounds() -> None:
    assert quick_poll_s(0.1) == pytest.approx(0.04)  # the default
    assert quick_poll_s(0.5) == pytest.approx(0.2)
    assert quick_poll_s(0.01) == 0.02  # never faster than every 20 ms
    assert quick_poll_s(0.03) == 0.02
