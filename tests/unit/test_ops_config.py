"""The operations settings in the config file: [gate] metrics/health switches and [webhooks] tuning."""

from __future__ import annotations

from pathlib import Path

import pytest

from aegisd.config import Config, ConfigError, load_config, startup_warnings


def _load(tmp_path: Path, text: str) -> Config:
    path = tmp_path / "aegisd.toml"
    path.write_text(text)
    return load_config({"config": str(path)}, env={"AEGIS_DATA_DIR": str(tmp_path)})


def test_defaults_keep_both_endpoints_on(tmp_path: Path) -> None:
    config = load_config({}, env={"AEGIS_DATA_DIR": str(tmp_path)})
    assert (config.metrics_enabled, config.health_enabled) == (True, True)
    assert (config.webhook_queue_size, config.webhook_workers, config.webhook_max_attempts) == (1000, 4, 5)
    assert (config.webhook_timeout, config.webhook_retry_delay) == (10.0, 1.0)


def test_switches_and_webhook_settings_are_read(tmp_path: Path) -> None:
    config = _load(tmp_path, "[gate]\nmetrics = false\nhealth = false\n[webhooks]\nqueue_size = 3\n"
                             "workers = 1\ntimeout = 0.5\nmax_attempts = 2\nretry_delay = 0.05\n")
    assert config.metrics_enabled is False
    assert config.health_enabled is False
    assert config.webhook_queue_size == 3
    assert config.webhook_workers == 1
    assert config.webhook_timeout == 0.5
    assert config.webhook_max_attempts == 2
    assert config.webhook_retry_delay == 0.05


@pytest.mark.parametrize(("text", "needle"), [
    ('[gate]\nmetrics = "no"\n', "[gate] metrics must be true or false"),
    ("[gate]\nhealth = 0\n", "[gate] health must be true or false"),
    ("[webhooks]\nqueue_size = 0\n", "[webhooks] queue_size 0"),
    ("[webhooks]\nworkers = true\n", "[webhooks] workers must be a number"),
    ("[webhooks]\nworkers = 1000\n", "[webhooks] workers 1000 (from"),
    ("[webhooks]\nsecret = 'x'\n", "unknown setting [webhooks] secret"),
    ("[gate]\nlisten = 3100\n", "[gate] listen must be a string"),  # named as the file spells it
    ("[policy]\ndir = 5\n", "[policy] dir must be a string"),
    ("[gate]\nlisten = '127.0.0.1:0'\n", "needs a fixed port"),
])
def test_bad_values_are_refused_by_name(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, text)
    assert needle in str(caught.value)


def test_max_connections_is_read_and_bounded(tmp_path: Path) -> None:
    assert load_config({}, env={"AEGIS_DATA_DIR": str(tmp_path)}).max_connections == 1024
    assert _load(tmp_path, "[gate]\nmax_connections = 16\n").max_connections == 16
    for bad in ("0", "2000000", '"many"'):
        with pytest.raises(ConfigError, match=r"\[gate\] max_connections"):
            _load(tmp_path, f"[gate]\nmax_connections = {bad}\n")


@pytest.mark.parametrize("size", [1, 3, 4, 8])
def test_events_without_a_token_always_have_a_place_in_the_webhook_queue(tmp_path: Path, size: int) -> None:
    """Found by a cold review: their share was queue_size // 4, so under 4 (1 is allowed) every
    agent_auth_failure for a missing or bad token was dropped, even into an empty queue."""
    from aegisd.webhooks.dispatcher import Delivery, Dispatcher
    from aegisd.webhooks.registry import Target

    dispatcher = Dispatcher(_load(tmp_path, f"[webhooks]\nqueue_size = {size}\n"))
    target = Target("w1", "https://hooks.example.com/x", frozenset({"agent_auth_failure"}), b"k" * 32)
    assert dispatcher._hold(Delivery(target, "agent_auth_failure", {}, unauthenticated=True))


@pytest.mark.parametrize(("section", "key", "field", "whole"), [
    ("gate", "max_body_bytes", "max_body_bytes", 2048), ("gate", "agent_max_concurrency", "agent_max_concurrency", 2),
    ("gate", "max_connections", "max_connections", 2), ("webhooks", "queue_size", "webhook_queue_size", 2),
    ("webhooks", "workers", "webhook_workers", 2), ("webhooks", "max_attempts", "webhook_max_attempts", 2),
])
def test_a_fraction_for_a_count_is_refused(tmp_path: Path, section: str, key: str, field: str, whole: int) -> None:
    """Found by a review: `max_connections = 1.9` became 1 without a word."""
    with pytest.raises(ConfigError, match=rf"\[{section}\] {key} {whole - 0.1} \(from .*\) must be a whole number"):
        _load(tmp_path, f"[{section}]\n{key} = {whole - 0.1}\n")
    assert getattr(_load(tmp_path, f"[{section}]\n{key} = {whole}\n"), field) == whole
    assert getattr(_load(tmp_path, f"[{section}]\n{key} = {whole}.0\n"), field) == whole  # 2.0 is a whole number


@pytest.mark.parametrize("mode", ["7600", "4660", "1600", "2600", "-600", "10600"])
def test_socket_mode_is_permission_bits_only(tmp_path: Path, mode: str) -> None:
    with pytest.raises(ConfigError, match=f"socket mode '{mode}' .* at most 0777"):
        _load(tmp_path, f'socket_mode = "{mode}"\n')


def test_socket_group_without_group_read_write_is_warned_about(tmp_path: Path) -> None:
    group = '\nsocket_group = "users"\n'
    assert startup_warnings(_load(tmp_path, group)) == []  # 0660 by default with a group
    assert startup_warnings(_load(tmp_path, 'socket_mode = "0660"' + group)) == []
    assert startup_warnings(_load(tmp_path, 'socket_mode = "0640"\n')) == []  # no group: nothing to warn about
    for mode in ("0600", "0640"):
        (warning,) = startup_warnings(_load(tmp_path, f'socket_mode = "{mode}"' + group))
        assert f"socket_group users is set but socket mode {mode}" in warning and "0660" in warning


@pytest.mark.parametrize("listen", ["0.0.0.0:3100", "[::]:3100", "192.168.1.10:3100", "example.com:3100",
                                    "localhost.:3100", "[::ffff:127.0.0.1]:3100"])
def test_a_gate_address_off_loopback_needs_the_opt_in(tmp_path: Path, listen: str) -> None:
    """Found by a review: AEGIS_GATE_LISTEN=0.0.0.0:PORT was accepted without a word."""
    env = {"AEGIS_DATA_DIR": str(tmp_path), "AEGIS_GATE_LISTEN": listen}
    with pytest.raises(ConfigError) as caught:
        load_config({}, env=env)
    message = str(caught.value)
    assert f"{listen!r} (from AEGIS_GATE_LISTEN) is not a loopback address" in message
    assert "[gate] allow_non_loopback = true" in message and "AEGIS_GATE_ALLOW_NON_LOOPBACK=1" in message
    for opt_in in ({"AEGIS_GATE_ALLOW_NON_LOOPBACK": "1"}, {"AEGIS_GATE_ALLOW_NON_LOOPBACK": "TRUE"}):
        config = load_config({}, env={**env, **opt_in})
        assert config.gate_allow_non_loopback is True
        (warning,) = startup_warnings(config)
        assert "not loopback" in warning and config.gate_address in warning
    path = tmp_path / "aegisd.toml"
    path.write_text("[gate]\nallow_non_loopback = true\n")
    assert load_config({"config": str(path)}, env=env).gate_allow_non_loopback is True
    with pytest.raises(ConfigError, match="must be true or false"):  # no opt-in by a typo
        load_config({}, env={**env, "AEGIS_GATE_ALLOW_NON_LOOPBACK": "sure"})
    with pytest.raises(ConfigError, match="not a loopback address"):  # "0" is no opt-in
        load_config({}, env={**env, "AEGIS_GATE_ALLOW_NON_LOOPBACK": "0"})


@pytest.mark.parametrize("listen", ["127.0.0.1:3100", "127.1.2.3:3100", "[::1]:3100", "localhost:3100",
                                    "LocalHost:3100"])
def test_loopback_gate_addresses_need_no_opt_in(tmp_path: Path, listen: str) -> None:
    config = load_config({}, env={"AEGIS_DATA_DIR": str(tmp_path), "AEGIS_GATE_LISTEN": listen})
    assert config.gate_allow_non_loopback is False and startup_warnings(config) == []


def test_every_problem_in_the_file_is_reported_at_once(tmp_path: Path) -> None:
    """A new user fixed `bogus` only to be told of `max_connections` next: one run names them all."""
    path = tmp_path / "aegisd.toml"
    text = ("surprise = 1\nsocket_mode = \"0606\"\n[gate]\nmax_connections = 1.5\nbogus = 1\nlisten = 3100\n"
            "metrics = \"no\"\n[log]\nlevel = \"loud\"\n")
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, text)
    assert str(caught.value).splitlines() == [
        "7 problems in the settings:",
        f"  - config file {path}: unknown setting surprise",
        f"  - config file {path}: unknown setting [gate] bogus",
        f"  - config file {path}: [gate] listen must be a string, got int",
        f"  - config file {path}: [gate] metrics must be true or false, got str",
        f"  - socket mode '0606' (from {path}) must not grant access to other users",
        f"  - log level 'loud' (from {path}) is not one of: debug, info, warning, error",
        f"  - [gate] max_connections 1.5 (from {path}) must be a whole number",
    ]


def test_environment_overrides_are_reported_with_the_file_s_problems(tmp_path: Path) -> None:
    path = tmp_path / "aegisd.toml"
    path.write_text("[gate]\nbogus = 1\n")
    env = {"AEGIS_DATA_DIR": str(tmp_path), "AEGIS_GATE_LISTEN": "nohost", "AEGIS_KDF_ITERATIONS": "1",
           "AEGIS_GATE_ALLOW_NON_LOOPBACK": "sure"}
    with pytest.raises(ConfigError) as caught:
        load_config({"config": str(path)}, env=env)
    message = str(caught.value)
    assert message.startswith("4 problems in the settings:\n"), message
    for needle in ("unknown setting [gate] bogus", "'nohost' (from AEGIS_GATE_LISTEN) must be HOST:PORT",
                   "[vault] kdf_iterations '1' (from AEGIS_KDF_ITERATIONS) must be between 2 and 64",
                   "[gate] allow_non_loopback 'sure' (from AEGIS_GATE_ALLOW_NON_LOOPBACK) must be true or false"):
        assert needle in message, message
    assert "loopback address" not in message  # not judged on an address that is itself malformed


def test_a_single_problem_is_reported_as_before(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, "[gate]\nbogus = 1\n")
    assert str(caught.value) == f"config file {tmp_path / 'aegisd.toml'}: unknown setting [gate] bogus"


def test_a_home_of_no_such_user_is_a_setting_problem_not_a_crash(tmp_path: Path) -> None:
    """Found by a review: `~nosuchuser/x` raised RuntimeError from expanduser, a traceback at start and on SIGHUP."""
    env = {"AEGIS_DATA_DIR": "~no-such-user-aegis/data", "AEGIS_SOCKET": "~no-such-user-aegis/s.sock"}
    with pytest.raises(ConfigError) as caught:
        load_config({}, env=env)
    message = str(caught.value)
    assert message.startswith("2 problems in the settings:\n"), message
    assert "data directory '~no-such-user-aegis/data' (from AEGIS_DATA_DIR) starts with the home of a user" in message
    with pytest.raises(ConfigError, match=r"config file .~no-such-user-aegis/a\.toml. \(from AEGIS_CONFIG\)"):
        load_config({}, env={"AEGIS_CONFIG": "~no-such-user-aegis/a.toml", "AEGIS_DATA_DIR": str(tmp_path)})


def test_a_file_that_is_not_utf8_or_a_nul_in_a_path_is_a_setting_problem(tmp_path: Path) -> None:
    """Found by a cold review: each was a traceback at start (and the first left systemd `reloading` on SIGHUP)."""
    path = tmp_path / "aegisd.toml"
    path.write_bytes(b'[log]\nlevel = "caf\xe9"\n')
    with pytest.raises(ConfigError, match="is not UTF-8 text, which TOML must be"):
        load_config({"config": str(path)}, env={"AEGIS_DATA_DIR": str(tmp_path)})
    with pytest.raises(ConfigError, match=r"socket path '/tmp/a\\x00b' \(from .*\) contains a NUL character"):
        _load(tmp_path, 'socket = "/tmp/a\\u0000b"\n')


def test_a_large_bound_is_shown_as_the_file_would_spell_it(tmp_path: Path) -> None:
    """Found by a cold review: limits were printed with %g, as `1.07374e+09`."""
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, "[gate]\nmax_body_bytes = 1\n")
    assert str(caught.value).endswith("must be between 1024 and 1073741824"), str(caught.value)
