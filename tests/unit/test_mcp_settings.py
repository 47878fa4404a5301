"""The MCP bridge's settings: how long it waits for the gate, and which gate it will talk to."""

from __future__ import annotations

from pathlib import Path

import pytest

from aegisctl.mcp.settings import SettingsError, Timeouts, _reachable, gate_url, timeouts


def test_the_read_timeout_follows_the_gates_own_timeouts(tmp_path: Path) -> None:
    assert timeouts({}) == Timeouts(gate=10.0, read=150.0)  # aegisd's defaults: 10 + 120, plus 20
    config = tmp_path / "aegisd.toml"
    config.write_text("[gate]\nread_timeout = 300\nconnect_timeout = 5\n")
    assert timeouts({"AEGIS_CONFIG": str(config)}) == Timeouts(gate=10.0, read=325.0)
    assert timeouts({}, str(config)).read == 325.0
    chosen = {"AEGIS_CONFIG": str(config), "AEGIS_MCP_GATE_TIMEOUT": "2.5", "AEGIS_MCP_READ_TIMEOUT": "40"}
    assert timeouts(chosen) == Timeouts(gate=2.5, read=40.0)
    assert timeouts({"AEGIS_CONFIG": str(tmp_path / "missing.toml")}) == Timeouts()  # gate_url reports the file


@pytest.mark.parametrize("value", ["0", "-1", "soon", "nan", "1e9"])
def test_a_timeout_that_is_no_duration_is_refused_by_name(value: str) -> None:
    with pytest.raises(SettingsError) as caught:
        timeouts({"AEGIS_MCP_READ_TIMEOUT": value})
    assert "AEGIS_MCP_READ_TIMEOUT" in caught.value.message and caught.value.usage


@pytest.mark.parametrize("host", ["localhost.", "localhost..", "LOCALHOST.", "localhost.localdomain",
                                  "localhost.example.com", "127.0.0.1.nip.io"])
def test_only_localhost_itself_is_a_loopback_name(host: str) -> None:
    """glibc answers `localhost` from /etc/hosts but sends `localhost.` (fully qualified) to DNS, which may answer
    with any address: the agent token would leave the machine."""
    with pytest.raises(SettingsError) as caught:
        gate_url(f"http://{host}:3100", {})
    assert caught.value.usage and "is not a loopback address" in caught.value.message
    if host.endswith("."):
        assert "looked up in DNS" in caught.value.message and "without the dot" in caught.value.message


@pytest.mark.parametrize("url", ["http://localhost:3100", "http://LocalHost:3100", "https://127.0.0.2:3100",
                                 "http://[::1]:3100", "http://[::ffff:127.0.0.1]:3100"])
def test_localhost_and_loopback_addresses_are_gates(url: str) -> None:
    assert gate_url(url, {}) == url


@pytest.mark.parametrize(("listen", "reached"), [
    ("0.0.0.0:3100", "127.0.0.1:3100"), ("[::]:3100", "[::1]:3100"), ("[0::0]:3100", "[::1]:3100"),
    ("0.0.0.000:3100", "0.0.0.000:3100"),  # not an address ipaddress reads: left for the loopback check to refuse
    ("127.0.0.1:3100", "127.0.0.1:3100"), ("[::1]:3100", "[::1]:3100"), ("localhost:3100", "localhost:3100"),
])
def test_a_gate_on_every_address_is_reached_on_loopback_however_it_is_written(listen: str, reached: str) -> None:
    assert _reachable(listen) == reached
