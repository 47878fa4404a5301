"""`GET /_aegis/services`: an agent's own grants, authenticated and ledgered like any gate request."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.e2e.gate_support import GateWorld

GH_SECRET = "servicesGithubSecret-0123456789abcdefAB"
OA_SECRET = "servicesOpenaiSecret-0123456789abcdefAB"


@pytest.fixture
def world() -> Iterator[GateWorld]:
    instance = GateWorld.start()
    yield instance
    instance.close()


def test_services_lists_only_the_callers_grants(world: GateWorld) -> None:
    world.credential("github", GH_SECRET, ["api.github.com", "uploads.github.com"], "--scopes", "read",
                     "--ttl", "30d")
    world.credential("openai", OA_SECRET, "api.openai.com", "--auth-type", "header", "--header-name", "X-Api-Key")
    world.agent("reader", "github")
    world.agent("writer", "openai", "github")
    world.agent("nobody")

    reader = world.call("GET", "/_aegis/services", agent="reader")
    assert reader.status == 200 and "application/json" in (reader.header("Content-Type") or "")
    body = reader.json()
    assert body["agent"] == "reader" and [s["name"] for s in body["services"]] == ["github"]
    github = body["services"][0]
    assert github["allowed_hosts"] == ["api.github.com", "uploads.github.com"]
    assert (github["service"], github["auth_type"], github["scopes"], github["expired"]) == (
        "github", "bearer", ["read"], False)
    assert github["expires_at"].endswith("Z")
    writer = world.call("GET", "/_aegis/services", agent="writer").json()
    assert [(s["name"], s["auth_type"], s["scopes"], s["expires_at"]) for s in writer["services"]] == [
        ("github", "bearer", ["read"], github["expires_at"]), ("openai", "header", ["*"], None)]
    assert world.call("GET", "/_aegis/services", agent="nobody").json() == {"agent": "nobody", "services": []}

    # Refused exactly as a proxied request would be, each with its ledger row.
    rows = world.ledger()
    assert world.row(reader.request_id, rows)["agent"] == "reader"
    world.assert_refused(world.call("GET", "/_aegis/services"), 401, "agent_auth_required", service="_aegis",
                         path="/services")
    world.assert_refused(world.call("GET", "/_aegis/services", [("X-Aegis-Agent", "aegis_" + "x" * 43)]), 401,
                         "agent_auth_invalid")
    posted = world.call("POST", "/_aegis/services", agent="reader", body=b"{}")
    world.assert_refused(posted, 405, "method_not_allowed")
    assert posted.all("Allow") == ["GET"]  # RFC 9110: a 405 says what is allowed
    world.aegis.ctl("lock").ok()
    world.assert_refused(world.call("GET", "/_aegis/services", agent="reader"), 503, "vault_locked")
    world.unlock()
    allowed = [r for r in world.ledger() if r["service"] == "_aegis" and r["decision"] == "allowed"]
    assert sorted(r["agent"] for r in allowed) == ["nobody", "reader", "writer"]
    assert all((r["path"], r["method"], r["status"]) == ("/services", "GET", 200) for r in allowed)
    world.assert_no_leaks()


def test_services_counts_against_the_agents_own_rate_limit(world: GateWorld) -> None:
    """Found by a cold review: /_aegis/services is ledgered like any call, but skipped the agent's own limit,
    so an agent could write rows without bound there. It now counts like any call, refusals using none."""
    world.credential("github", GH_SECRET, "api.github.com")
    world.agent("limited", "github")
    world.aegis.ctl("agent", "set-rate-limit", "limited", "2/min").ok()
    assert [world.call("GET", "/_aegis/services", agent="limited").status for _ in range(2)] == [200, 200]
    refused = world.call("GET", "/_aegis/services", agent="limited")
    world.assert_refused(refused, 429, "rate_limited", agent="limited", service="_aegis")
    assert refused.header("Retry-After")
    world.assert_no_leaks()
