from __future__ import annotations

import time

from airflow_outpost.worker.edge.request_counter import RequestCounter


def test_requests_are_split_between_idle_and_busy_time() -> None:
    c = RequestCounter()
    c._since -= 10  # 10 s idle so far
    for _ in range(5):
        c.record()
    c.set_busy(True)
    c._since -= 2   # 2 s busy
    for _ in range(8):
        c.record()
    rates = c.rates()
    assert rates["total"] == 13
    assert 0.4 <= rates["idle"] <= 0.5
    assert 3.5 <= rates["busy"] <= 4.0
    assert rates["recent"] == round(13 / 60, 3)
    assert time.monotonic() > 0
