"""`aegisctl mcp serve` driven by the official MCP client, over stdio and streamable HTTP.

A real daemon, real credentials, agents and grants made with aegisctl, a real local upstream:
the bridge's tools must reach it only through the gate, with the credential injected upstream
and never shown to the model, and every refusal must come back as a tool error with the gate's
code. The bridge refuses to start without a token the gate accepts.
"""

from __future__ import annotations

import base64
import contextlib
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
from mcp import ClientSession

from tests.e2e.gate_support import GateWorld, untouched
from tests.e2e.mcp_support import Bridge, error_of, value_of, write_token_file
from tests.harness import free_port
from tests.upstreams import Upstream, pattern

SECRET = "mcpBridgeSecret-0123456789abcdefABCDEF"
READ_SECRET = "mcpReadOnlySecret-0123456789abcdefABCD"
OTHER_SECRET = "mcpOtherSecret-0123456789abcdefABCDEF"
DOWN_SECRET = "mcpDownSecret-0123456789abcdefABCDEFG"
TOOLS = {"aegis_proxy_request", "aegis_list_services", "aegis_health"}
SERVICE_KEYS = {"name", "service", "allowed_hosts", "auth_type", "scopes", "expires_at", "expired"}
BODY_LIMIT = 100 * 1024


@pytest.fixture
def world() -> Iterator[GateWorld]:
    instance = GateWorld.start()
    yield instance
    instance.close()


def setup_bot(world: GateWorld) -> tuple[Upstream, str, Bridge]:
    """Credentials api (all scopes), readonly, other (not granted), down (nothing listening); agent bot."""
    up = world.upstream()
    world.credential("api", SECRET, up.entry(), "--ttl", "30d")
    world.credential("readonly", READ_SECRET, up.entry(), "--scopes", "read", "--auth-type", "header",
                     "--header-name", "X-Api-Key")
    world.credential("other", OTHER_SECRET, up.entry())
    world.credential("down", DOWN_SECRET, f"http://127.0.0.1:{free_port()}")
    token = world.agent("bot", "api", "readonly", "down")
    world.agent("intruder", "other")  # another agent's grant must never show up in bot's view
    token_file = write_token_file(world.aegis.root / "bot.token", token)
    bridge = Bridge(world.aegis.gate_url, token_file, world.aegis.root / "bridge.err")
    return up, token, bridge


async def exercise(world: GateWorld, up: Upstream, bridge: Bridge, session: ClientSession) -> None:
    """Every tool, the proxied happy paths, and a tool error for each refusal the gate makes today."""
    listed = (await session.list_tools()).tools
    assert {tool.name for tool in listed} == TOOLS
    proxy = next(tool for tool in listed if tool.name == "aegis_proxy_request")
    assert set(proxy.input_schema["properties"]) == {"service", "path", "method", "headers", "body", "target_host"}
    assert sorted(proxy.input_schema["required"]) == ["path", "service"]

    health = value_of(await bridge.call(session, "aegis_health"))
    assert health == {"gate": "reachable", "gate_url": world.aegis.gate_url, "vault": "unlocked", "ledger": "ok",
                      "agent": "bot", "agent_token": "valid"}

    services = value_of(await bridge.call(session, "aegis_list_services"))
    assert services["agent"] == "bot"
    assert [s["name"] for s in services["services"]] == ["api", "down", "readonly"]
    by_name = {s["name"]: s for s in services["services"]}
    assert all(set(s) == SERVICE_KEYS for s in services["services"])
    assert by_name["api"]["allowed_hosts"] == [up.entry()] and by_name["api"]["scopes"] == ["*"]
    assert by_name["api"]["auth_type"] == "bearer" and by_name["api"]["expires_at"].endswith("Z")
    assert by_name["api"]["expired"] is False
    assert by_name["readonly"]["scopes"] == ["read"] and by_name["readonly"]["auth_type"] == "header"
    assert by_name["readonly"]["expires_at"] is None

    # A GET reaches the upstream with the real credential; the model sees the answer, not the key.
    got = value_of(await bridge.call(session, "aegis_proxy_request", service="api", path="/echo/hello?x=1"))
    assert got["status"] == 200 and got["body_encoding"] == "text" and got["truncated"] is False
    assert json.loads(got["body"])["path"] == "/echo/hello"
    assert got["headers"]["X-Aegis-Request-Id"] == got["request_id"]
    seen = up.requests_to("/echo/hello")[-1]
    assert seen.header("Authorization") == [f"Bearer {SECRET}"] and seen.query == "x=1"
    assert seen.header("X-Aegis-Agent") == []

    # A POST with a body and headers; a path without its leading slash; a header-type credential.
    posted = value_of(await bridge.call(session, "aegis_proxy_request", service="api", path="echo/post",
                                        method="post", headers={"Content-Type": "application/json",
                                                                "X-Custom": "yes"}, body='{"a": 1}'))
    assert posted["status"] == 200 and json.loads(posted["body"])["body"] == '{"a": 1}'
    seen = up.requests_to("/echo/post")[-1]
    assert (seen.method, seen.body, seen.header("X-Custom")) == ("POST", b'{"a": 1}', ["yes"])
    value_of(await bridge.call(session, "aegis_proxy_request", service="readonly", path="/echo/ro"))
    assert up.requests_to("/echo/ro")[-1].header("X-Api-Key") == [READ_SECRET]

    # An upstream's own error status is its answer, not a refusal.
    missing = value_of(await bridge.call(session, "aegis_proxy_request", service="api", path="/status/404"))
    assert missing["status"] == 404 and missing["body"] == "status 404"

    # Binary comes back as base64; big bodies are cut with a note, text and binary alike.
    binary = value_of(await bridge.call(session, "aegis_proxy_request", service="api",
                                        path="/stream?bytes=1000&length=1"))
    assert binary["body_encoding"] == "base64" and base64.b64decode(binary["body"]) == pattern(1000)
    big_binary = value_of(await bridge.call(session, "aegis_proxy_request", service="api",
                                            path="/stream?bytes=300000"))
    assert big_binary["truncated"] is True and "note" in big_binary
    assert base64.b64decode(big_binary["body"]) == pattern(BODY_LIMIT)
    big_text = value_of(await bridge.call(session, "aegis_proxy_request", service="api", path="/echo/big",
                                          method="POST", body="x" * 150_000))
    assert big_text["truncated"] is True and big_text["body_encoding"] == "text"
    assert len(big_text["body"]) == BODY_LIMIT and big_text["body"].startswith('{"n": ')

    # Each refusal: a tool error with the gate's code and message, and the ledger's denied row.
    refused = [
        (dict(service="other", path="/echo/x"), "not_granted", 403),
        (dict(service="api", path="/echo/x", target_host="evil.example.com"), "domain_not_allowed", 403),
        (dict(service="readonly", path="/echo/x", method="DELETE"), "scope_denied", 403),
    ]
    errors = []
    for arguments, code, status in refused:
        with untouched(up):
            error = error_of(await bridge.call(session, "aegis_proxy_request", **arguments), code)
        assert error["status"] == status
        errors.append(error)
    not_granted = error_of(await bridge.call(session, "aegis_proxy_request", service="other", path="/"),
                           "not_granted")
    assert not_granted["message"] == "agent 'bot' has no grant for service 'other'"
    down = error_of(await bridge.call(session, "aegis_proxy_request", service="down", path="/"), "upstream_error")
    assert down["status"] == 502

    # Arguments that cannot go on the wire as given are refused before anything is sent.
    bad_arguments: list[dict[str, Any]] = [dict(service="api", path="/", method="GE T"), dict(service="a/b", path="/"),
                     dict(service="api", path="/", headers={"X-Aegis-Agent": "aegis_other"}),
                     dict(service="api", path="/", headers={"X-Bad": "a\r\nInjected: 1"}),
                     dict(service="api", path="/#frag")]
    with untouched(up):
        for arguments in bad_arguments:
            error_of(await bridge.call(session, "aegis_proxy_request", **arguments), "invalid_argument")

    # Each call has its ledger row, the services view included.
    rows = world.ledger("--agent", "bot")
    assert world.row(got["request_id"], rows)["decision"] == "allowed"
    for error in errors:
        row = world.row(error["request_id"], rows)
        assert (row["decision"], row["reason"], row["status"]) == ("denied", error["code"], error["status"])
    services_rows = [r for r in rows if r["service"] == "_aegis"]
    assert services_rows and all((r["path"], r["decision"], r["status"]) == ("/services", "allowed", 200)
                                 for r in services_rows)


def run_scenario(world: GateWorld, transport: str) -> None:
    up, token, bridge = setup_bot(world)

    async def scenario() -> None:
        opened = bridge.stdio() if transport == "stdio" else bridge.http()
        async with opened as session:
            await exercise(world, up, bridge, session)
            if transport == "http":
                await check_bearer_required(bridge, token)
                world.secrets.append(bridge.bearer())  # in no output either
            world.assert_no_leaks(extra=bridge.outputs())
            # The gate goes away: every tool says so, with its own code.
            assert world.aegis.stop() == 0
            error_of(await bridge.call(session, "aegis_health"), "gate_unreachable")
            error_of(await bridge.call(session, "aegis_proxy_request", service="api", path="/"), "gate_unreachable")

    anyio.run(scenario)
    world.aegis.assert_no_leaks([*world.secrets, *world.tokens.values()],
                                extra_text=[*world.received, *bridge.outputs()])


async def check_bearer_required(bridge: Bridge, token: str) -> None:
    """The HTTP endpoint answers nobody without the bridge's own MCP bearer; the agent token is not it."""
    ping = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
    async with httpx2.AsyncClient() as client:
        attempts = [({}, "agent_auth_required"), ({"Authorization": "Bearer aegis_wrong"}, "agent_auth_invalid"),
                    ({"Authorization": token}, "agent_auth_invalid"),
                    ({"Authorization": f"Bearer {token}"}, "agent_auth_invalid"),
                    ({"Authorization": bridge.bearer()}, "agent_auth_invalid")]
        for headers, code in attempts:
            reply = await client.post(bridge.http_url, json=ping, headers=headers)
            assert reply.status_code == 401 and reply.json()["error"]["code"] == code, reply.text
            bridge.results.append(reply.text)


@pytest.mark.parametrize("transport", ["stdio", "http"])
def test_bridge_tools_end_to_end(world: GateWorld, transport: str) -> None:
    run_scenario(world, transport)


# -- refusals from policies, rate limits and body inspection (issue 4) ------------------------------

FAKE_GITHUB_KEY = "ghp_" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8"  # well-known format, not any vault secret


def calls_over_stdio(world: GateWorld, calls: list[dict[str, Any]]) -> list[Any]:
    """Run `aegis_proxy_request` calls as agent bot (granted credential api) over stdio; leak-check all."""
    token = world.tokens["bot"]
    bridge = Bridge(world.aegis.gate_url, write_token_file(world.aegis.root / "bot.token", token),
                    world.aegis.root / "bridge.err")

    async def scenario() -> list[Any]:
        async with bridge.stdio() as session:
            return [await bridge.call(session, "aegis_proxy_request", **arguments) for arguments in calls]

    results = anyio.run(scenario)
    world.assert_no_leaks(extra=bridge.outputs())
    return results


def test_policy_refusal_is_a_tool_error(world: GateWorld) -> None:
    up = world.upstream()
    world.credential("api", SECRET, up.entry())
    world.agent("bot", "api")
    policies = world.aegis.root / "policies"
    policies.mkdir()
    (policies / "bot.yaml").write_text(
        'agent: bot\nrules:\n  - service: api\n    methods: [GET]\n    paths: ["/echo/allowed"]\n')
    assert world.aegis.stop() == 0
    world.aegis.env["AEGIS_POLICIES_DIR"] = str(policies)
    world.aegis.start()
    world.unlock()
    allowed, denied = calls_over_stdio(world, [dict(service="api", path="/echo/allowed"),
                                               dict(service="api", path="/echo/other")])
    assert value_of(allowed)["status"] == 200
    error = error_of(denied, "policy_denied")
    assert error["status"] == 403 and world.row(error["request_id"])["reason"] == "policy_denied"
    assert up.requests_to("/echo/other") == []


def test_rate_limit_refusal_is_a_tool_error(world: GateWorld) -> None:
    up = world.upstream()
    world.credential("api", SECRET, up.entry(), "--rate-limit", "1/min")
    world.agent("bot", "api")
    first, second = calls_over_stdio(world, [dict(service="api", path="/echo/1"), dict(service="api", path="/echo/2")])
    assert value_of(first)["status"] == 200
    error = error_of(second, "rate_limited")
    assert error["status"] == 429 and int(error["retry_after"]) > 0
    assert up.requests_to("/echo/2") == []


def test_body_inspection_refusal_is_a_tool_error(world: GateWorld) -> None:
    up = world.upstream()
    world.credential("api", SECRET, up.entry(), "--body-inspection", "block")
    world.agent("bot", "api")
    clean, leaky = calls_over_stdio(world, [
        dict(service="api", path="/echo/clean", method="POST", body='{"text": "hello"}'),
        dict(service="api", path="/echo/leak", method="POST", body=f'{{"text": "my key is {FAKE_GITHUB_KEY}"}}')])
    assert value_of(clean)["status"] == 200
    error = error_of(leaky, "body_inspection")
    assert error["status"] == 403 and FAKE_GITHUB_KEY not in error["message"]
    assert up.requests_to("/echo/leak") == []


def test_health_reports_a_ledger_that_cannot_be_written(world: GateWorld) -> None:
    """While the ledger fails the gate forwards nothing; the bridge's health says why, not just 'unchecked'."""
    up, _, bridge = setup_bot(world)

    async def scenario() -> None:
        async with bridge.stdio() as session:
            with contextlib.closing(sqlite3.connect(world.aegis.data_dir / "ledger.db", isolation_level=None)) as db:
                db.execute("CREATE TRIGGER full BEFORE INSERT ON ledger BEGIN SELECT RAISE(ABORT, 'full'); END")
                error_of(await bridge.call(session, "aegis_proxy_request", service="api", path="/echo/x"),
                         "ledger_unavailable")  # forwarded, then its row failed
                with untouched(up):
                    error_of(await bridge.call(session, "aegis_proxy_request", service="api", path="/echo/y"),
                             "ledger_unavailable")
                health = value_of(await bridge.call(session, "aegis_health"))
                assert (health["ledger"], health["agent_token"]) == ("failing", "unchecked"), health
                assert health["detail"].startswith("ledger_unavailable: "), health
                db.execute("DROP TRIGGER full")

    anyio.run(scenario)
    world.aegis.assert_no_leaks([*world.secrets, *world.tokens.values()],
                                extra_text=[*world.received, *bridge.outputs()])


def test_health_without_the_gates_health_page(tmp_path: Path) -> None:
    """With aegisd's `[gate] health = false` its /_aegis/health answers 404, and aegis_health said vault and ledger
    `unknown`, values the documentation did not list, though the services answer shows both: the gate gives it
    only with the vault unlocked, and once its ledger row is written. `unknown` is left for what nothing shows."""
    config = tmp_path / "aegisd.toml"
    config.write_text("[gate]\nhealth = false\n")
    world = GateWorld.start(daemon_env={"AEGIS_CONFIG": str(config)})
    try:
        _, _, bridge = setup_bot(world)

        async def scenario() -> tuple[dict[str, Any], dict[str, Any]]:
            async with bridge.stdio() as session:
                unlocked = value_of(await bridge.call(session, "aegis_health"))
                world.aegis.ctl_in_process("lock").ok()
                try:
                    return unlocked, value_of(await bridge.call(session, "aegis_health"))
                finally:
                    world.unlock()

        unlocked, locked = anyio.run(scenario)
        assert world.call("GET", "/_aegis/health").status == 404  # the page is off indeed
        assert unlocked == {"gate": "reachable", "gate_url": world.aegis.gate_url, "vault": "unlocked",
                            "ledger": "ok", "agent": "bot", "agent_token": "valid"}, unlocked
        assert (locked["vault"], locked["ledger"], locked["agent_token"]) == ("locked", "unknown", "unchecked"), locked
        assert locked["detail"].startswith("vault_locked: "), locked
        world.assert_no_leaks(extra=bridge.outputs())
    finally:
        world.close()
