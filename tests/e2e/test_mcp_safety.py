"""The MCP bridge's own safety: what it refuses to send, and what it shows the model.

Found by a cold review: control characters in tool arguments crashed a tool with the SDK's
generic error; an upstream's C1 controls and bidi/zero-width characters reached the model raw.
One real aegisd serves every test here, each with its own agent and credential.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import anyio
import pytest

from tests.e2e.gate_support import GateWorld, untouched
from tests.e2e.mcp_support import Bridge, error_of, write_token_file
from tests.upstreams import Upstream

SECRET = "mcpSafetySecret-0123456789abcdefABCDEF"


@pytest.fixture(scope="module")
def world() -> Iterator[GateWorld]:
    instance = GateWorld.start()
    yield instance
    instance.close()


def agent_bridge(world: GateWorld, name: str, entry: str) -> Bridge:
    """Agent `name` granted its own credential `name` on `entry`, and a bridge holding its token."""
    world.credential(name, f"{SECRET}-{name}", entry)
    token = world.agent(name, name)
    token_file = write_token_file(world.aegis.root / f"{name}.token", token)
    return Bridge(world.aegis.gate_url, token_file, world.aegis.root / f"{name}.err")


def calls(bridge: Bridge, arguments: list[dict[str, Any]]) -> list[Any]:
    async def scenario() -> list[Any]:
        async with bridge.stdio() as session:
            return [await bridge.call(session, "aegis_proxy_request", **each) for each in arguments]

    return anyio.run(scenario)


def test_control_characters_in_headers_or_target_host_are_invalid_arguments(world: GateWorld) -> None:
    up: Upstream = world.upstream()
    bridge = agent_bridge(world, "ctl", up.entry())
    refused: list[dict[str, Any]] = [dict(headers={"X-Bad": f"a{c}b"}) for c in ("\x1b", "\x7f", "\x0b", "\x01")]
    refused += [dict(target_host=host) for host in ("\x1b]0;t\x07a.example", "a\x7f.example", "a\tb.example")]
    with untouched(up):
        results = calls(bridge, [dict(service="ctl", path="/echo/ctl", **each) for each in refused])
    for arguments, result in zip(refused, results, strict=True):
        error = error_of(result, "invalid_argument")
        assert "control character" in error["message"], (arguments, error)
    assert "Error executing tool" not in bridge.stderr() + json.dumps(bridge.results)
    # A tab is a legal character in a header value, and goes through.
    (tabbed,) = calls(bridge, [dict(service="ctl", path="/echo/tab", headers={"X-Tab": "a\tb"})])
    assert not tabbed.is_error and up.requests_to("/echo/tab")[-1].header("X-Tab") == ["a\tb"]
    world.assert_no_leaks(extra=bridge.outputs())
