"""Step 9: what crosses the boundary in each direction.

Outbound, the agent's own credentials, hop-by-hop headers and the gate's headers are
dropped and exactly one real credential is put in. Inbound, hop-by-hop headers and
Set-Cookie are dropped: the gate is not a cookie jar for the agent.
"""

from __future__ import annotations

from urllib.parse import unquote_plus

from multidict import CIMultiDict, CIMultiDictProxy

from aegisd.gate.routing import Route

HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
                        "upgrade", "proxy-authenticate"})
# `expect` too: the gate answers 100-continue itself once its checks pass.
GATE_HEADERS = frozenset({"x-aegis-agent", "x-target-host", "x-aegis-request-id", "host", "content-length",
                          "expect"})
GATE_PREFIX = "x-aegis-"  # the gate's header namespace: none of it is the upstream's business
RESPONSE_DROP = HOP_BY_HOP | {"set-cookie", "set-cookie2", "content-length"}


def _connection_tokens(headers: CIMultiDictProxy[str]) -> set[str]:
    return {t.strip().lower() for value in headers.getall("Connection", []) for t in value.split(",")}


def outbound_headers(headers: CIMultiDictProxy[str], route: Route, host_header: str) -> CIMultiDict[str]:
    drop = HOP_BY_HOP | GATE_HEADERS | route.strip_headers | _connection_tokens(headers)
    out: CIMultiDict[str] = CIMultiDict(
        (name, value) for name, value in headers.items()
        if name.lower() not in drop and not name.lower().startswith(GATE_PREFIX))
    out["Host"] = host_header
    if route.inject_header is not None:
        out[route.inject_header[0]] = route.inject_header[1]
    return out


def outbound_query(raw_query: str, route: Route) -> str:
    """The agent's query string, minus any parameter named like the credential's, plus the credential."""
    if route.inject_query is None:
        return raw_query
    name, encoded = route.inject_query
    kept = [part for part in raw_query.split("&")
            if part and unquote_plus(part.split("=", 1)[0]) != name]
    kept.append(f"{name}={encoded}")
    return "&".join(kept)


def inbound_headers(headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    drop = RESPONSE_DROP | _connection_tokens(headers)
    return CIMultiDict((name, value) for name, value in headers.items() if name.lower() not in drop)
