"""Settings on pydantic-settings: the secret is never shown, nan and inf are refused for every
duration, and flags > environment > file > defaults holds for every kind of value."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError

from airflow_outpost.worker.config import _FIELDS, Settings, collect_settings, load_settings
from airflow_outpost.worker.errors import ConfigError

API = {"api_url": "http://h:8080"}
SECRET = "s3cr3t-value-xyz"
FLOAT_SETTINGS = [name for name, field in _FIELDS.items() if field.annotation in (float, float | None)]


def test_the_float_settings_are_the_durations() -> None:
    assert len(FLOAT_SETTINGS) >= 13 and all(name.endswith("_s") for name in FLOAT_SETTINGS)


# -- the secret --------------------------------------------------------------------------------
def test_secret_is_a_secretstr_never_in_repr_or_str() -> None:
    s = load_settings(API, env={"OUTPOST_JWT_SECRET": SECRET})
    assert isinstance(s.jwt_secret, SecretStr) and s.secret() == SECRET
    assert s.jwt_secret.get_secret_value() == SECRET
    for text in (repr(s), str(s), repr(s.jwt_secret), str(s.jwt_secret), repr(s.model_dump())):
        assert SECRET not in text
    assert "jwt_secret=" not in repr(s)


def test_secret_from_airflow_config_is_hidden_too() -> None:
    s = load_settings(API, env={"AIRFLOW__API_AUTH__JWT_SECRET": SECRET})
    assert s.secret() == SECRET and SECRET not in repr(s) and SECRET not in str(s)


@pytest.mark.parametrize(("flags", "setting"), [
    ({"concurrency": "four"}, "concurrency"),
    ({"poll_interval_s": "nan"}, "poll_interval_s"),
    ({"crash_policy": "keep"}, "crash_policy"),
    ({"api_url": "ftp://x"}, "api_url"),
    ({"budgets": "queue:a=soon", "queues": "a"}, "budgets"),
])
def test_a_bad_value_next_to_the_secret_does_not_show_it(tmp_path: Path, flags: dict, setting: str) -> None:
    for env, file in (({"OUTPOST_JWT_SECRET": SECRET}, None), ({}, f'jwt_secret = "{SECRET}"\n')):
        cfg = None
        if file is not None:
            cfg = tmp_path / "c.toml"
            cfg.write_text(file)
        with pytest.raises(ConfigError) as err:
            load_settings({**API, **flags}, env=env, config_file=cfg)
        assert err.value.setting == setting
        assert SECRET not in str(err.value) and SECRET not in repr(err.value.value)


def test_a_bad_secret_itself_is_named_but_not_shown(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'jwt_secret = ["{SECRET}"]\n')
    with pytest.raises(ConfigError) as err:
        load_settings(API, env={}, config_file=cfg)
    assert err.value.setting == "jwt_secret" and SECRET not in str(err.value)


def test_the_secret_is_never_a_flag() -> None:
    import argparse

    from airflow_outpost.worker.cli.main import add_settings_flags

    parser = argparse.ArgumentParser(add_help=False)
    add_settings_flags(parser)
    assert "jwt_secret" not in {action.dest for action in parser._actions}


# -- nan and inf ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", FLOAT_SETTINGS)
@pytest.mark.parametrize("raw", ["nan", "inf", "-inf", "NaN", "Infinity"])
def test_nan_and_inf_are_refused_for_every_float_setting_from_a_flag_or_env(name: str, raw: str) -> None:
    extra = {"ray": "local"} if name == "ray_keep_warm_s" else {}
    for flags, env in (({name: raw}, {}), ({}, {"OUTPOST_" + name.upper(): raw})):
        with pytest.raises(ConfigError) as err:
            load_settings({**API, **extra, **flags}, env=env)
        assert err.value.setting == name and "finite number" in str(err.value), str(err.value)


@pytest.mark.parametrize("name", FLOAT_SETTINGS)
@pytest.mark.parametrize("raw", ["nan", "inf", "-inf"])
def test_nan_and_inf_are_refused_for_every_float_setting_from_the_file(tmp_path: Path, name: str, raw: str) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'api_url = "http://h"\nray = "local"\n{name} = {raw}\n')  # TOML's own nan/inf floats
    with pytest.raises(ConfigError) as err:
        load_settings(env={}, config_file=cfg)
    assert err.value.setting == name and "finite number" in str(err.value)
    with pytest.raises(ConfigError, match=name):
        collect_settings({name: raw}, env={})


@pytest.mark.parametrize("raw", ["queue:a=nan", "queue:a=inf"])
def test_nan_and_inf_budgets_are_refused(raw: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings({**API, "queues": "a", "budgets": raw}, env={})
    assert err.value.setting == "budgets queue:a" and "finite number" in str(err.value)


# -- precedence ----------------------------------------------------------------------------------
CASES = [  # setting, file (TOML), env, flag, and what each gives
    ("concurrency", "3", "5", "7", (3, 5, 7)),
    ("poll_interval_s", '"1m"', "30", "2h", (60.0, 30.0, 7200.0)),
    ("push_logs", "true", "false", "true", (True, False, True)),
    ("queues", '["a"]', "b,c", "d", (("a",), ("b", "c"), ("d",))),
    ("log_folder", '"/f"', "/e", "/g", (Path("/f"), Path("/e"), Path("/g"))),
    ("crash_policy", '"adopt"', "stop", "adopt", ("adopt", "stop", "adopt")),
    ("ray", '"auto"', "local", "ray://head:10001", ("auto", "local", "ray://head:10001")),
]


@pytest.mark.parametrize(("name", "file", "env", "flag", "expect"), CASES, ids=[c[0] for c in CASES])
def test_precedence_flags_over_env_over_file_over_default(tmp_path: Path, name: str, file: str, env: str,
                                                          flag: str, expect: tuple) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[worker]\napi_url = "http://file:1"\n{name} = {file}\n')
    variable = "OUTPOST_" + name.upper()
    default = Settings.model_fields[name].get_default(call_default_factory=True)
    assert getattr(load_settings(API, env={}), name) == default
    assert getattr(load_settings({"config": str(cfg)}, env={}), name) == expect[0]
    assert getattr(load_settings({"config": str(cfg)}, env={variable: env}), name) == expect[1]
    assert getattr(load_settings({"config": str(cfg), name: flag}, env={variable: env}), name) == expect[2]
    # The file named by the environment, an empty variable (unset) and a flag left out (None).
    s = load_settings({name: None}, env={"OUTPOST_CONFIG": str(cfg), variable: ""})
    assert getattr(s, name) == expect[0] and s.api_url == "http://file:1"
    assert collect_settings({"config": str(cfg), name: flag}, env={variable: env})[name] == expect[2]


def test_budgets_precedence_replaces_not_merges(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('api_url = "http://h"\nqueues = ["a", "b"]\n[budgets]\n"queue:a" = "2h"\n')
    assert load_settings(env={}, config_file=cfg).budgets == (("queue:a", 7200.0),)
    env = {"OUTPOST_BUDGETS": "queue:b=30m"}
    assert load_settings(env=env, config_file=cfg).budgets == (("queue:b", 1800.0),)
    assert load_settings({"budgets": "dag:x=1h"}, env=env, config_file=cfg).budgets == (("dag:x", 3600.0),)


def test_settings_are_frozen() -> None:
    s = load_settings(API, env={})
    with pytest.raises(ValidationError, match="frozen"):
        s.concurrency = 9


def test_a_secret_given_as_a_flag_is_refused_without_being_echoed() -> None:
    import subprocess
    import sys

    for argv in (["--jwt-secret", "s3cr3t-value"], ["--jwt-secret=s3cr3t-value"], ["--jwt-sec", "s3cr3t-value"]):
        out = subprocess.run([sys.executable, "-m", "airflow_outpost", "worker", *argv], capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 2, out.stderr
        assert "s3cr3t-value" not in out.stderr + out.stdout, out.stderr
        assert "OUTPOST_JWT_SECRET" in out.stderr or "unrecognized" in out.stderr, out.stderr
