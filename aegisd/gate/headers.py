"""Step 9: what crosses the boundary in each direction.

Outbound, the agent's own credentials, hop-by-hop headers, the gate's headers and the headers
a reverse proxy routes on are dropped and exactly one real credential is put in. Inbound,
hop-by-hop headers and Set-Cookie are dropped: the gate is not a cookie jar for the agent.
"""

from __future__ import annotations

import re
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
# What a proxy says about the request it passes on: the host (and scheme, port, path) the client asked for, and who
# the client is. A reverse proxy in front of an allowlisted upstream (or its framework) may route on the first,
# taking the request, and the credential in it, to another backend than the host the allowlist judged: the same class
# as `X-Original-URL` for the path. An upstream may trust the second for access control (an address allowlist behind
# its load balancer). The gate is the agent's proxy and vouches for none of it, so the agent's are dropped (like its
# Host, which the gate sets), not refused: what goes upstream is then exactly the request judged.
ROUTING_HEADERS = frozenset({"forwarded", "x-forwarded-host", "x-forwarded-proto", "x-forwarded-port",
                             "x-forwarded-server", "x-forwarded-scheme", "x-forwarded-ssl", "x-forwarded-prefix",
                             "x-forwarded-uri", "x-original-uri", "x-host", "x-original-host", "x-http-host-override",
                             "front-end-https", "x-url-scheme",
                             "x-forwarded-for", "x-real-ip", "x-client-ip", "true-client-ip", "x-cluster-client-ip",
                             "x-original-forwarded-for", "client-ip", "forwarded-for", "x-forwarded",
                             "cf-connecting-ip", "fastly-client-ip", "x-originating-ip", "x-remote-ip",
                             "x-remote-addr", "x-proxyuser-ip", "x-envoy-external-address"})
RESPONSE_DROP = HOP_BY_HOP | {"set-cookie", "set-cookie2", "content-length"}
# Kept in an answer even when its Connection header lists them: the redactor must see how the body is coded (a
# gzip body it was not told of would pass undecoded, its echo of the secret unredacted), and so must the agent.
RESPONSE_KEEP = frozenset({"content-encoding"})
# Its mirror for requests: the `_method` guard and body inspection read the agent's type and coding, so a
# `Connection: Content-Type` must not take from the upstream what they judged (an untyped POST is a form to Rack).
REQUEST_KEEP = frozenset({"content-type", "content-encoding"})
_NOT_ALNUM = re.compile(r"[^a-z0-9]")
_NONE: tuple[str, ...] = ()  # getall's default, shared so a missing Connection header allocates nothing


def _drop_with_connection(headers: CIMultiDictProxy[str], drop: frozenset[str],
                          keep: frozenset[str]) -> frozenset[str]:
    """`drop` plus the names the Connection header lists but `keep`, built anew only when it lists one `drop`
    lacks (the usual `Connection: keep-alive` names nothing new)."""
    values = headers.getall("Connection", _NONE)
    if not values:
        return drop
    listed = _connection_tokens(values)
    return drop if listed <= drop else drop | (listed - keep)


def _connection_tokens(values: Iterable[str]) -> set[str]:
    return {t.strip().lower() for value in values for t in value.split(",")}


def plain_names(headers: CIMultiDictProxy[str]) -> bool:
    """Whether every header name is ASCII letters, digits and `-` only, so no two of them can share a CGI
    variable (the usual case: one pass over the names, in C)."""
    return plain_name("".join(headers))


def plain_name(name: str) -> bool:
    """Whether `name` is ASCII letters, digits and `-` only (or empty)."""
    bare = name.replace("-", "")
    return bare.isascii() and (bare.isalnum() or not bare)


def cgi_name(name: str) -> str:
    """The variable a CGI-style server may make of a header name: lower case, any other byte an `_` (CGI, WSGI and
    PHP read `X_Api_Key` as `X-Api-Key`; lighttpd, and PHP registering what Caddy passes, `X.Api.Key` too)."""
    return _NOT_ALNUM.sub("_", name.lower())


def agent_headers(headers: CIMultiDictProxy[str], route: Route) -> CIMultiDict[str]:
    """The agent's headers that may reach the upstream: not its own credentials or the routing headers (nor a
    name a CGI-style server would read as one of them, `X_Api_Key`, `X_Forwarded_Host`), hop-by-hop or gate
    headers, nor what the Connection header lists but REQUEST_KEEP. Body inspection scans exactly these;
    `add_credential` then completes them for forwarding."""
    drop = _drop_with_connection(headers, route.drop_headers, REQUEST_KEEP)
    # some name, the agent's or a credential header's, has `_` or other punctuation: compare CGI names too
    spelt = route.spelt_credential_names or not plain_names(headers)
    kept: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        lower = name.lower()
        if lower in drop or lower.startswith(GATE_PREFIX) or (spelt and cgi_name(name) in route.dropped_cgi_names):
            continue
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
    """The upstream's headers that reach the agent: not hop-by-hop (nor what its Connection header lists, but
    RESPONSE_KEEP), Set-Cookie or a Content-Length (the gate frames the answer itself)."""
    drop = _drop_with_connection(headers, RESPONSE_DROP, RESPONSE_KEEP)
    kept: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        if name.lower() not in drop:
            kept.add(name, value)
    return kept
