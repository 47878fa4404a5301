"""The operations settings in the config file: [gate] metrics/health switches and [webhooks] tuning."""

from __future__ import annotations

from pathlib import Path

import pytest

from aegisd.config import Config, ConfigError, load_config


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
