"""Deploy settings: durations, budgets, GPU inventory, and the CLI aliases."""

from __future__ import annotations

from pathlib import Path

import pytest

from airflow_outpost.worker.cli.main import build_parser
from airflow_outpost.worker.config import load_settings
from airflow_outpost.worker.errors import ConfigError
from airflow_outpost.worker.units import format_duration, parse_duration

API = {"api_url": "http://h:8080"}


@pytest.mark.parametrize(("raw", "seconds"), [("15m", 900), ("900", 900), (900, 900), ("1h30m", 5400),
                                               ("2.5s", 2.5), ("1d", 86400), (" 2h ", 7200)])
def test_parse_duration(raw, seconds) -> None:
    assert parse_duration(raw) == seconds


@pytest.mark.parametrize("raw", ["", "m", "15x", "1h-5m", "-3", True, "5m5", "h1"])
def test_parse_duration_refuses(raw) -> None:
    with pytest.raises(ValueError):
        parse_duration(raw)


def test_format_duration() -> None:
    assert [format_duration(s) for s in (5, 60, 5400, 7200, 90)] == ["5s", "1m", "1h30m", "2h", "1m30s"]


def test_deploy_settings_from_env_and_toml(tmp_path: Path) -> None:
    cfg = tmp_path / "w.toml"
    cfg.write_text('queues = ["gpu", "cpu"]\nexit_when_idle_s = "15m"\n'
                   '[budgets]\n"queue:gpu" = "2h"\n"dag:train" = "30m"\n')
    s = load_settings({"config": str(cfg)}, env={"OUTPOST_API_URL": "http://h:1", "OUTPOST_GPUS": "0,1,2,3",
                                                 "OUTPOST_METRICS_PORT": "0"})
    assert s.exit_when_idle_s == 900
    assert s.budgets == (("dag:train", 1800.0), ("queue:gpu", 7200.0))
    assert s.gpus == ("0", "1", "2", "3") and s.metrics_port == 0 and s.gpu_queues == ("gpu*",)
    assert load_settings({**API, "gpus": "none"}, env={}).gpus == ()
    assert load_settings(API, env={}).gpus is None  # detect


def test_cli_aliases_exit_when_idle_and_repeated_budget(monkeypatch) -> None:
    args = build_parser().parse_args(["worker", "--exit-when-idle", "15m", "--budget", "queue:a=1h",
                                      "--budget", "dag:x=30m", "--budgets", "queue:b=2h"])
    assert args.exit_when_idle_s == "15m" and args.budget_items == ["queue:a=1h", "dag:x=30m"]
    seen: dict = {}

    def fake_load(flags: dict) -> None:
        seen.update(flags)
        raise ConfigError("api_url", None, "stop here")

    monkeypatch.setattr("airflow_outpost.worker.cli.main.load_settings", fake_load)
    with pytest.raises(ConfigError):
        args.func(args)
    assert seen["budgets"] == "queue:b=2h,queue:a=1h,dag:x=30m"


@pytest.mark.parametrize(("flags", "setting", "fragment"), [
    ({"metrics_port": "70000"}, "metrics_port", "0 to turn"),
    ({"gpus": "0,0"}, "gpus", "each device once"),
    ({"gpus": "zero"}, "gpus", "device indexes"),
    ({"exit_when_idle_s": "soon"}, "exit_when_idle_s", "duration such as 15m"),
    ({"budgets": "queue:a"}, "budgets", "queue:<name>=<duration>"),
    ({"budgets": "host:a=1h", "queues": "a"}, "budgets", "keys are queue:<queue> or dag:<dag_id>"),
    ({"budgets": "queue:a=later", "queues": "a"}, "budgets", "duration per UTC day"),
    ({"budgets": "queue:a=1h"}, "budgets", "explicit --queues"),
])
def test_bad_deploy_values_name_setting_and_allowed(flags, setting, fragment) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings({**API, **flags}, env={})
    assert err.value.setting == setting and fragment in str(err.value)
