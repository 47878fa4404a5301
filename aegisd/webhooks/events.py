"""Which webhook events a gate outcome raises, and the secret-free details an event carries.

The mapping is the one place that turns ledger reasons and flags into alert names, so the
docs, the metrics and the receivers all agree on what "blocked" means.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from aegisd.errors import InvalidArgument
from aegisd.ledger import LedgerEntry

EVENTS: tuple[str, ...] = ("blocked_request", "rate_limited", "agent_auth_failure", "body_inspection",
                           "credential_expiry", "response_redacted")
TEST_EVENT = "test"
# Refusals where the gate stopped nothing the agent did: the upstream or the daemon itself failed, or the agent
# left before its request was sent (a `denied` row: nothing went upstream).
NOT_BLOCKED = frozenset({"upstream_error", "upstream_timeout", "upstream_tls_error", "shutting_down",
                         "ledger_unavailable", "client_disconnected"})
CREDENTIAL_EXPIRED = "credential_expired"
# Ledger row fields a receiver sees; a query string never reaches the ledger, let alone these.
DETAIL_FIELDS: tuple[str, ...] = ("request_id", "agent", "service", "credential", "method", "path", "target_host",
                                  "reason", "status")


def parse_events(names: Iterable[str]) -> tuple[str, ...]:
    """Validate subscribed event names; returns them deduplicated in EVENTS order."""
    wanted = {name.strip() for name in names if name.strip()}
    if not wanted:
        raise InvalidArgument(f"name at least one event: {', '.join(EVENTS)}")
    unknown = sorted(wanted.difference(EVENTS))
    if unknown:
        raise InvalidArgument(f"unknown webhook event {', '.join(map(repr, unknown))}; the events are: "
                              f"{', '.join(EVENTS)}")
    return tuple(name for name in EVENTS if name in wanted)


def events_for(entry: LedgerEntry) -> tuple[str, ...]:
    """The events one gate outcome raises (credential_expiry is deduplicated by its caller)."""
    found: list[str] = []
    if entry.decision == "denied":
        reason = entry.reason
        if reason.startswith("agent_auth"):
            found.append("agent_auth_failure")
        elif reason == "rate_limited":
            found.append("rate_limited")
        elif reason == "body_inspection":
            found.append("body_inspection")
        elif reason not in NOT_BLOCKED:
            found.append("blocked_request")
        if reason == CREDENTIAL_EXPIRED:
            found.append("credential_expiry")
    flags = entry.flags
    if flags:
        if "body_inspection" in flags and "body_inspection" not in found:
            found.append("body_inspection")  # warn mode: forwarded, but flagged
        if "response_redacted" in flags:
            found.append("response_redacted")
    return tuple(found)


def details(entry: LedgerEntry) -> dict[str, Any]:
    """What a receiver learns about the request: ledger fields, never a secret, token or query."""
    found: dict[str, Any] = {name: getattr(entry, name) for name in DETAIL_FIELDS}
    found["decision"] = entry.decision
    if entry.flags:
        found["flags"] = entry.flags
    return found
