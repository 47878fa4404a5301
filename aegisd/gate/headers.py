"""Step 9: what crosses the boundary in each direction.

Outbound, the agent's own credentials, hop-by-hop headers and the gate's headers are
dropped and exactly one real credential is put in. Inbound, hop-by-hop headers and
Set-Cookie are dropped: the gate is not a cookie jar for the agent.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING
from urllib.parse import unquote_plus

from multidict import CIMultiDict, CIMultiDictProxy

if TYPE_CHECKING:  # routing builds each route's drop set from the names below, so it imports this module
    from aegisd.gate.routing import Route

HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
                        "upgrade", "proxy-authenticate"})
# `expect` too: the gate answers 100-continue itself once its checks pass.
GATE_HEADERS = frozenset({"x-aegis-agent", "x-target-host", "x-aegis-request-id", "host", "content-length",
                          "expect"})
GATE_PREFIX = "x-aegis-"  # the gate's header namespace: none of it is the upstream's business
RESPONSE_DROP = HOP_BY_HOP | {"set-cookie", "set-cookie2", "content-length"}
_NONE: tuple[str, ...] = ()  # getall's default, shared so a missing Connection header allocates nothing


def _drop_with_connection(headers: CIMultiDictProxy[str], drop: frozenset[str]) -> frozenset[str]:
    """`drop` plus the names the Connection header lists, built anew only when it lists one `drop` lacks
    (the usual `Connection: keep-alive` names nothing new)."""
    values = headers.getall("Connection", _NONE)
    if not values:
        return drop
    listed = _connection_tokens(values)
    return drop if listed <= drop else drop | listed


def _connection_tokens(values: Iterable[str]) -> set[str]:
    return {t.strip().lower() for value in values for t in value.split(",")}


def agent_headers(headers: CIMultiDictProxy[str], route: Route) -> CIMultiDict[str]:
    """The agent's headers that may reach the upstream: not its own credentials, hop-by-hop or gate headers.
    Body inspection scans exactly these; `add_credential` then completes them for forwarding."""
    drop = _drop_with_connection(headers, route.drop_headers)
    kept: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        lower = name.lower()
        if lower not in drop and not lower.startswith(GATE_PREFIX):
            kept.add(name, value)
    return kept


def add_credential(headers: CIMultiDict[str], route: Route, host_header: str) -> None:
    """Set the upstream's Host and inject exactly one credential header (if the credential is a header)."""
    headers["Host"] = host_header
    if route.inject_header is not None:
        headers[route.inject_header[0]] = route.inject_header[1]


def agent_query(raw_query: str, route: Route) -> str:
    """The agent's query string minus any parameter named like the credential's query parameter."""
    if route.inject_query is None:
        return raw_query
    name = route.inject_query[0]
    return "&".join(part for part in raw_query.split("&") if part and unquote_plus(part.split("=", 1)[0]) != name)


def query_with_credential(query: str, route: Route) -> str:
    """`agent_query`'s result plus the credential, for query-parameter credentials."""
    if route.inject_query is None:
        return query
    name, encoded = route.inject_query
    return f"{query}&{name}={encoded}" if query else f"{name}={encoded}"


def inbound_headers(headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    drop = _drop_with_connection(headers, RESPONSE_DROP)
    kept: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        if name.lower() not in drop:
            kept.add(name, value)
    return kept
