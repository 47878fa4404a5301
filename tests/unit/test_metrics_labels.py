"""The metrics' labels stay bounded and tell nobody what they may not know: statuses outside the standard ones
are "other", a service is named only for a request that got past the grant check, and an Accept header
prometheus_client cannot parse still gets an exposition."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from aegisd.gate.routing import AgentEntry
from aegisd.ledger import LedgerEntry
from aegisd.metrics import GateMetrics, service_label
from aegisd.outcomes import OutcomeSink


def metrics() -> GateMetrics:
    stub: Any = SimpleNamespace(state="uninitialized", queue_depth=0, last_commit_seconds=0.0, commits=0,
                                rows_committed=0, commit_failures=0, failing=False, retries_pending=0, delivered=0,
                                failed=0, dropped=0)
    return GateMetrics(stub, stub, stub)


def request_lines(gate: GateMetrics) -> list[str]:
    return [line for line in gate.render("")[0].decode().splitlines() if line.startswith("aegis_requests_")]


def test_a_status_outside_the_standard_ones_is_other() -> None:
    gate = metrics()
    for status in (200, 404, 418, 503, 599, 799, 999, 600, 99, 1000, 299):
        gate.observe("svc", "GET", status, "bot", "", False, 0.001, 0.001)
    statuses = {line.split('status="')[1].split('"')[0] for line in request_lines(gate)}
    assert statuses == {"200", "404", "418", "503", "other"}
    assert 'aegis_requests_total{agent="bot",method="GET",service="svc",status="other"} 7.0' in request_lines(gate)


def test_a_service_is_named_only_past_the_grant_check() -> None:
    known = {"prod-payments": object()}
    assert service_label("prod-payments", True, known) == "prod-payments"
    assert service_label("prod-payments", False, known) == "unknown"  # no token, not granted: a name oracle
    assert service_label("made-up", True, known) == "unknown"
    assert service_label("_aegis", False, known) == "_aegis"


def test_the_outcome_sink_names_the_service_only_for_a_granted_request() -> None:
    gate = metrics()
    agents = {name.encode(): AgentEntry(name, name, frozenset(), "") for name in ("bot", "other")}
    routing: Any = SimpleNamespace(table=SimpleNamespace(routes={"prod-payments": object()}, agents_by_hash=agents))
    webhooks: Any = SimpleNamespace(dispatcher=SimpleNamespace(has_subscribers=False))
    sink = OutcomeSink(routing, gate, webhooks)

    def outcome(agent: str, credential: str, reason: str, status: int) -> None:
        sink.record(LedgerEntry(kind="request", agent=agent, credential=credential, service="prod-payments",
                                method="GET", decision="denied" if reason else "allowed", reason=reason,
                                status=status), None)

    outcome("", "", "agent_auth_required", 401)  # no token
    outcome("other", "", "not_granted", 403)  # an agent without a grant for it
    outcome("bot", "prod-payments", "", 200)  # granted and forwarded
    outcome("bot", "prod-payments", "scope_denied", 403)  # granted, refused later: the agent knows the name
    lines = request_lines(gate)
    assert 'aegis_requests_blocked_total{agent="",reason="agent_auth_required",service="unknown"} 1.0' in lines
    assert 'aegis_requests_blocked_total{agent="other",reason="not_granted",service="unknown"} 1.0' in lines
    assert 'aegis_requests_total{agent="bot",method="GET",service="prod-payments",status="200"} 1.0' in lines
    assert 'aegis_requests_blocked_total{agent="bot",reason="scope_denied",service="prod-payments"} 1.0' in lines
    assert sum('service="prod-payments"' in line for line in lines) == 3


def test_an_accept_header_the_library_cannot_parse_gets_the_text_format() -> None:
    gate = metrics()
    gate.observe("svc", "GET", 200, "bot", "", False, 0.001, 0.001)
    for accept in ("application/openmetrics-text; version=abc", "application/openmetrics-text; version=",
                   "application/openmetrics-text; version=1.0.0; escaping=nonsense", "\x00;;=;", ""):
        body, content_type = gate.render(accept)
        assert content_type.startswith(("text/plain", "application/openmetrics-text")), (accept, content_type)
        assert b"aegis_requests_total" in body
    assert gate.render("application/openmetrics-text; version=abc")[1] == "text/plain; version=0.0.4; charset=utf-8"
