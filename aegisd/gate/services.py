"""`/_aegis/services`: an agent's own view of what it may use, never anything about other agents.

Built from the same routing snapshot the pipeline enforces, so what an agent (or the MCP
bridge's `aegis_list_services`) is told is exactly what the gate would let it do. No secret,
no header value, no other agent's grant is ever part of it.
"""

from __future__ import annotations

from typing import Any

from aegisd.gate.routing import AgentEntry, RoutingTable
from aegisd.ledger.entry import iso_time


def granted_services(table: RoutingTable, agent: AgentEntry, now_ms: int) -> dict[str, Any]:
    """The agent's name and, sorted by service, each credential granted to it."""
    services = [
        {
            "name": route.name,
            "service": route.service,
            "allowed_hosts": route.allowlist.as_targets(),
            "auth_type": route.auth_type,
            "scopes": list(route.scopes),
            "expires_at": iso_time(route.expires_at) if route.expires_at is not None else None,
            "expired": route.expires_at is not None and now_ms >= route.expires_at,
        }
        for route in sorted(table.routes.values(), key=lambda r: r.service)
        if route.credential_id in agent.credential_ids
    ]
    return {"agent": agent.name, "services": services}
