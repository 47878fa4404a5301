"""The front door's words: the address a refusal tells an agent to call is the gate's own."""

from __future__ import annotations

import pytest

from aegisd.gate.front_door import gate_url


@pytest.mark.parametrize(("host", "port", "url"), [
    ("127.0.0.1", 3100, "http://127.0.0.1:3100"),
    ("127.0.0.5", 8080, "http://127.0.0.5:8080"),
    ("::1", 3100, "http://[::1]:3100"),
    ("localhost", 4000, "http://localhost:4000"),
    ("0.0.0.0", 3100, "http://127.0.0.1:3100"),  # listening on every address: called on loopback
    ("::", 3101, "http://[::1]:3101"),
    ("192.168.1.20", 3100, "http://192.168.1.20:3100"),
])
def test_the_gate_url_is_the_one_an_agent_on_this_machine_calls(host: str, port: int, url: str) -> None:
    assert gate_url(host, port) == url
