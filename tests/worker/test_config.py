"""Settings: precedence flags > env > file, and clear errors for bad values."""

from __future__ import annotations

from pathlib import Path

import pytest

from airflow_outpost.worker.config import load_settings
from airflow_outpost.worker.errors import ConfigError
from airflow_outpost.worker.testing.worker_process import run_outpost


def test_precedence_flags_over_env_over_file(tmp_path: Path) -> None:
    cfg = tmp_path / "outpost.toml"
    cfg.write_text('[worker]\napi_url = "http://file:8080"\nconcurrency = 3\nqueues = ["a", "b"]\nname = "from-file"\n')
    env = {"OUTPOST_CONCURRENCY": "5", "OUTPOST_NAME": "from-env"}
    s = load_settings({"name": "from-flag", "config": str(cfg)}, env=env)
    assert s.api_url == "http://file:8080"
    assert s.concurrency == 5          # env beats file
    assert s.name == "from-flag"       # flag beats env
    assert s.queues == ("a", "b")      # file value kept


def test_everyday_form_and_derived_urls() -> None:
    s = load_settings({"api_url": "http://host:8080/", "queues": "default,gpu", "concurrency": "4", "name": "w1"}, env={})
    assert s.queues == ("default", "gpu")
    assert s.execution_api == "http://host:8080/execution/"
    assert s.edge_api == "http://host:8080/edge_worker/v1/"


def test_stock_edge_api_url_form_is_accepted() -> None:
    s = load_settings({"api_url": "https://af.example.com/edge_worker/v1/rpcapi"}, env={})
    assert s.api_url == "https://af.example.com"


@pytest.mark.parametrize(
    ("flags", "setting", "fragment"),
    [
        ({"concurrency": "0"}, "concurrency", "integer from 1"),
        ({"concurrency": "four"}, "concurrency", "an integer"),
        ({"poll_interval_s": "-1"}, "poll_interval_s", "> 0"),
        ({"api_url": "ftp://x"}, "api_url", "http(s) URL"),
        ({"name": "bad name!"}, "name", "letters, digits"),
        ({"queues": ",,"}, "queues", "at least one queue"),
        ({"queues": "ok,bad queue"}, "queues", "queue names"),
        ({"push_logs": "maybe"}, "push_logs", "true or false"),
        ({"poll_min_interval_s": "5", "poll_interval_s": "1"}, "poll_min_interval_s", "must not exceed"),
        ({"jwt_secret_file": "/nonexistent/secret"}, "jwt_secret_file", "readable file"),
        ({"crash_policy": "keep"}, "crash_policy", "stop (task processes die with a crashed worker"),
        ({"crash_policy": "Adopt"}, "crash_policy", "or adopt"),
        ({"ray": "remote"}, "ray", "local (the worker starts and owns a Ray head)"),
        ({"ray": "head:99999"}, "ray", "host:port or ray://host:port"),
        ({"ray": "ray://head"}, "ray", "host:port"),
        ({"ray": "local", "ray_num_cpus": "0"}, "ray_num_cpus", "integer from 1"),
        ({"ray": "10.0.0.5:6379", "ray_num_cpus": "2"}, "ray_num_cpus", "only applies with ray = local"),
        ({"ray_num_gpus": "1"}, "ray_num_gpus", "only applies with ray = local"),
        ({"ray": "local", "ray_num_gpus": "-1"}, "ray_num_gpus", "integer from 0"),
        ({"ray": "local", "ray_auth_token_file": __file__}, "ray_auth_token_file", "only for an existing cluster"),
        ({"ray_auth_token_file": __file__}, "ray_auth_token_file", "only for an existing cluster"),
        ({"ray": "auto", "ray_auth_token_file": "/nonexistent/token"}, "ray_auth_token_file", "readable file"),
        ({"ray_keep_warm_s": "60"}, "ray_keep_warm_s", "only applies with ray set"),
        ({"ray": "local", "ray_keep_warm_s": "-5"}, "ray_keep_warm_s", "from 0 to 7 days"),
        ({"ray": "local", "ray_keep_warm_s": "soon"}, "ray_keep_warm_s", "duration such as 15m"),
        ({"ray_node_ip_address": "127.0.0.1"}, "ray_node_ip_address", "only applies with ray = local"),
        ({"ray": "auto", "ray_node_ip_address": "127.0.0.1"}, "ray_node_ip_address", "only applies with ray = local"),
        ({"ray": "local", "ray_node_ip_address": "head.internal"}, "ray_node_ip_address", "an IPv4 address of this host"),
        ({"ray": "local", "ray_node_ip_address": "::1"}, "ray_node_ip_address", "an IPv4 address of this host"),
        ({"ray": "local", "ray_node_ip_address": "0.0.0.0"}, "ray_node_ip_address", "not 0.0.0.0"),
        # TEST-NET-3: no interface of this host has it, so Ray's head could never listen there.
        ({"ray": "local", "ray_node_ip_address": "203.0.113.77"}, "ray_node_ip_address", "this host has no interface"),
        ({"preload": "pyarrow,os.path;rm -rf"}, "preload", "dotted Python module names"),
    ],
)
def test_bad_values_name_setting_value_and_allowed(flags: dict, setting: str, fragment: str) -> None:
    flags = {"api_url": "http://h:8080", **flags}
    with pytest.raises(ConfigError) as err:
        load_settings(flags, env={})
    assert err.value.setting == setting
    assert setting in str(err.value) and fragment in str(err.value)


def test_missing_api_url_says_how_to_set_it() -> None:
    with pytest.raises(ConfigError, match="OUTPOST_API_URL"):
        load_settings({}, env={})


def test_unknown_key_in_file_is_refused(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('api_url = "http://h"\nconcurency = 3\n')
    with pytest.raises(ConfigError, match="concurency=3: unknown setting"):
        load_settings({"config": str(cfg)}, env={})


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("api_url = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings({"config": str(cfg)}, env={})


def test_secret_file_is_read_fresh(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("s3cr3t-one\n")
    s = load_settings({"api_url": "http://h", "jwt_secret_file": str(secret)}, env={})
    assert s.secret() == "s3cr3t-one"
    secret.write_text("two\n")  # rotated by an agent: picked up without restart
    assert s.secret() == "two"
    assert "s3cr3t" not in repr(s) and "jwt_secret=" not in repr(s)


def test_crash_policy_defaults_to_stop_and_is_set_like_every_setting(tmp_path: Path) -> None:
    assert load_settings({"api_url": "http://h"}, env={}).crash_policy == "stop"
    cfg = tmp_path / "c.toml"
    cfg.write_text('api_url = "http://h"\ncrash_policy = "adopt"\n')
    assert load_settings({"config": str(cfg)}, env={}).crash_policy == "adopt"
    assert load_settings({"api_url": "http://h"}, env={"OUTPOST_CRASH_POLICY": "adopt"}).crash_policy == "adopt"
    # The flag wins over the environment, which wins over the file.
    assert load_settings({"config": str(cfg), "crash_policy": "stop"}, env={}).crash_policy == "stop"
    assert load_settings({"config": str(cfg)}, env={"OUTPOST_CRASH_POLICY": "stop"}).crash_policy == "stop"


def test_bad_crash_policy_flag_stops_the_cli_with_exit_code_2() -> None:
    result = run_outpost("worker", "--api-url", "http://127.0.0.1:9", "--crash-policy", "resume")
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert "crash_policy='resume'" in last and "adopt" in last and "Traceback" not in result.stderr


def test_ray_defaults_to_a_ray_per_task_and_is_set_like_every_setting(tmp_path: Path) -> None:
    s = load_settings({"api_url": "http://h", "model_idle_s": "120"}, env={})
    assert (s.ray, s.ray_num_cpus, s.ray_num_gpus, s.ray_auth_token_file) == (None, None, None, None)
    assert s.ray_keep_warm_s == 120  # follows model_idle_s unless given
    token = tmp_path / "token"
    token.write_text("t\n")
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'api_url = "http://h"\nray = "ray://head:10001"\nray_auth_token_file = "{token}"\nray_keep_warm_s = "10m"\n')
    s = load_settings({"config": str(cfg)}, env={})
    assert (s.ray, s.ray_auth_token_file, s.ray_keep_warm_s) == ("ray://head:10001", token, 600)
    env = {"OUTPOST_RAY": "local", "OUTPOST_RAY_NUM_CPUS": "2", "OUTPOST_RAY_NUM_GPUS": "1", "OUTPOST_RAY_KEEP_WARM_S": "0"}
    s = load_settings({"api_url": "http://h"}, env=env)
    assert (s.ray, s.ray_num_cpus, s.ray_num_gpus, s.ray_keep_warm_s) == ("local", 2, 1, 0)
    for address in ("auto", "10.0.0.5:6379", "[::1]:6379", "ray-head.internal:6379"):
        assert load_settings({"api_url": "http://h", "ray": address}, env={}).ray == address
    # The flag wins over the environment.
    assert load_settings({"api_url": "http://h", "ray": "auto"}, env={"OUTPOST_RAY": "local"}).ray == "auto"


def test_ray_node_ip_address_defaults_to_loopback_and_is_set_like_every_setting(tmp_path: Path) -> None:
    assert load_settings({"api_url": "http://h", "ray": "local"}, env={}).ray_node_ip_address is None  # 127.0.0.1
    cfg = tmp_path / "c.toml"
    cfg.write_text('api_url = "http://h"\nray = "local"\nray_node_ip_address = "127.0.0.1"\n')
    assert load_settings({"config": str(cfg)}, env={}).ray_node_ip_address == "127.0.0.1"
    env = {"OUTPOST_RAY": "local", "OUTPOST_RAY_NODE_IP_ADDRESS": " 127.0.0.1 "}
    assert load_settings({"api_url": "http://h"}, env=env).ray_node_ip_address == "127.0.0.1"
    # The flag wins over the environment (and is checked, not the environment's value).
    with pytest.raises(ConfigError, match="ray_node_ip_address='203.0.113.77'"):
        load_settings({"api_url": "http://h", "ray_node_ip_address": "203.0.113.77"}, env=env)


def test_bad_ray_node_ip_address_stops_the_cli_with_exit_code_2() -> None:
    result = run_outpost("worker", "--api-url", "http://127.0.0.1:9", "--ray", "local",
                         "--ray-node-ip-address", "203.0.113.77")
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert "ray_node_ip_address='203.0.113.77'" in last and "no interface" in last and "Traceback" not in result.stderr


def test_bad_ray_flag_stops_the_cli_with_exit_code_2() -> None:
    result = run_outpost("worker", "--api-url", "http://127.0.0.1:9", "--ray", "everywhere")
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert "ray='everywhere'" in last and "host:port" in last and "Traceback" not in result.stderr


def test_preload_modules_are_imported_by_the_zygote_and_a_broken_one_is_skipped() -> None:
    """The zygote imports ``preload`` before it forks (tasks then share those pages); a module that
    does not import is said on stderr and skipped, never stopping the zygote."""
    import subprocess
    import sys

    assert load_settings({"api_url": "http://h:8080", "preload": "json.tool, xml.dom"}, env={}).preload == (
        "json.tool", "xml.dom")
    script = ("import sys; from airflow_outpost.worker.processes import task_main as t; t._preload(); "
              "print('json.tool' in sys.modules, 'no_such_module_xyz' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={"OUTPOST_PRELOAD": "json.tool,no_such_module_xyz", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "False"]
    assert "preload 'no_such_module_xyz' failed, tasks import it themselves: ModuleNotFoundError" in done.stderr
