"""The gate's per-request shortcuts give the answers of the general code they bypass: the Host header's
fast path, the undecoded-path fast path, the precomputed header drop sets, the keyed-once token MAC, the
cached quotas, and the metrics exposition they must not change."""

from __future__ import annotations

import hashlib
import hmac
from types import SimpleNamespace
from typing import Any, cast

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from aegisd.gate.admission import GateLimits
from aegisd.gate.front_door import check_host_header, split_target
from aegisd.gate.headers import agent_headers, inbound_headers
from aegisd.gate.pipeline import Exchange, GatePipeline, _asked
from aegisd.gate.refusal import Refusal
from aegisd.gate.routing import AgentEntry, Route, build_route
from aegisd.inspection import Inspector, SecretSource
from aegisd.metrics import GateMetrics
from aegisd.vault.credentials import Credential
from aegisd.vault.crypto import keyed_hasher
from aegisd.vault.domains import DomainAllowlist, DomainError, canonical_target, parse_allowed_host


def route(rate_limit: str = "", auth_type: str = "bearer", header_name: str = "") -> Route:
    cred = Credential(id="c1", name="c1", service="svc", domains=["https://api.example.com"], auth_type=auth_type,
                      header_name=header_name, rate_limit=rate_limit)
    return build_route(cred, b"not-a-real-secret")


def host_outcome(value: str) -> tuple[int, str] | None:
    try:
        check_host_header(CIMultiDictProxy(CIMultiDict([("Host", value)])), frozenset({"127.0.0.1"}))
    except Refusal as refusal:
        return refusal.status, refusal.code
    return None


@pytest.mark.parametrize("value", ["127.0.0.1:3100", "127.0.0.1", "localhost", "LocalHost:3100", "localhost.:1",
                                   "ip6-localhost:80", "[::1]", "[::1]:3100", " localhost:3100 ", "127.0.0.2:3100",
                                   "localhost:00000"])
def test_loopback_hosts_are_accepted(value: str) -> None:
    assert host_outcome(value) is None


@pytest.mark.parametrize(("value", "expected"), [
    ("localhost:", (400, "bad_request")),  # a colon without a port
    ("localhost:123456", (400, "bad_request")),  # six digits
    ("127.0.0.1:+1", (400, "bad_request")),
    ("[::1]:", (400, "bad_request")),
    ("127.0.0.1:3100:1", (400, "bad_request")),
    ("evil.example:3100", (403, "host_not_allowed")),
    ("[2001:db8::1]:3100", (403, "host_not_allowed")),
])
def test_other_hosts_get_the_general_answer(value: str, expected: tuple[int, str]) -> None:
    assert host_outcome(value) == expected


@pytest.mark.parametrize(("target", "expected"), [
    ("/svc/v1/items?x=1", ("svc", "/v1/items", "x=1")),
    ("/svc", ("svc", "/", "")),
    ("/svc/a.b/.hidden/x..y", ("svc", "/a.b/.hidden/x..y", "")),
    ("/%73vc/a%2Eb", ("svc", "/a%2Eb", "")),  # the service is decoded, the rest stays encoded
    ("/svc/x?a=/../", ("svc", "/x", "a=/../")),  # the query is not a path
    ("/svc/v1/admin#x", ("svc", "/v1/admin", "")),  # a fragment is no part of what is judged or sent
    ("/svc/a#f?x=1", ("svc", "/a", "")),
    ("/svc/a?x=1#f&key=1", ("svc", "/a", "x=1")),
])
def test_split_target(target: str, expected: tuple[str, str, str]) -> None:
    assert split_target(target) == expected


@pytest.mark.parametrize("target", ["/svc/./x", "/svc/..", "/svc/x/.", "/svc/%2e%2e/x", "/svc/%252e/x", "/svc/.%2E",
                                    # with `;` parameters, which servlet containers drop before resolving the rest
                                    "/svc/a/..;/x", "/svc/..;", "/svc/.;/x", "/svc/%2e%2e;/x", "/svc/..;x=1/x",
                                    "/svc/..%3b/x", "/svc/.%2e%3Bjsessionid=1/x", "/..;/svc/x"])
def test_dot_segments_are_refused_encoded_or_not(target: str) -> None:
    with pytest.raises(Refusal) as refused:
        split_target(target)
    assert (refused.value.status, refused.value.message) == (
        400, "the path contains a '.' or '..' segment (with or without ';' parameters)")


def test_segments_with_parameters_that_are_no_dot_segments_pass() -> None:
    assert split_target("/svc/a;v=1/...;/x..;/.a;/..b") == ("svc", "/a;v=1/...;/x..;/.a;/..b", "")


@pytest.mark.parametrize("target", ["/svc//evil.example/x", "/svc//", "/svc///x", "/svc/%252fevil.example/x",
                                    "/svc/%252F%252Fevil.example", "/%73vc//evil.example/x?a=1"])
def test_a_rest_that_starts_with_two_slashes_is_refused_encoded_or_not(target: str) -> None:
    """Found by a cold review: `/svc//evil.example/x` went upstream as `//evil.example/x`, which a proxying
    upstream may read as a scheme-relative URL to another host, the credential with it."""
    with pytest.raises(Refusal) as refused:
        split_target(target)
    assert refused.value.status == 400 and "'//'" in refused.value.message


def test_empty_segments_after_the_first_pass() -> None:
    assert split_target("/svc/a//b/") == ("svc", "/a//b/", "")
    assert split_target("/svc/a/%252f/b") == ("svc", "/a/%252f/b", "")
    assert split_target("/svc/x?next=//elsewhere") == ("svc", "/x", "next=//elsewhere")


def proxy(*pairs: tuple[str, str]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(pairs))


def test_agent_headers_keep_order_and_case_and_drop_what_must_not_cross() -> None:
    sent = proxy(("Host", "127.0.0.1:3100"), ("User-Agent", "u"), ("Connection", "keep-alive, X-Drop-Me"),
                 ("X-Aegis-Agent", "aegis_t"), ("X-Aegis-Other", "1"), ("Authorization", "Bearer mine"),
                 ("X-Api-Token", "mine"), ("x-drop-me", "1"), ("Keep-Alive", "5"), ("accept", "*/*"),
                 ("Accept", "text/plain"))
    kept = agent_headers(sent, route(auth_type="header", header_name="X-Api-Token"))
    assert list(kept.items()) == [("User-Agent", "u"), ("accept", "*/*"), ("Accept", "text/plain")]


def test_a_connection_header_never_drops_the_request_s_type_or_coding() -> None:
    """What the `_method` guard and inspection read of the body's type and coding is what is forwarded."""
    sent = proxy(("Content-Type", "application/octet-stream"), ("Content-Encoding", "gzip"), ("X-Drop-Me", "1"),
                 ("Connection", "Content-Type, content-encoding , X-Drop-Me"))
    kept = agent_headers(sent, route())
    assert list(kept.items()) == [("Content-Type", "application/octet-stream"), ("Content-Encoding", "gzip")]
    # a credential whose own header is one of them still has the agent's dropped
    own = agent_headers(sent, route(auth_type="header", header_name="Content-Type"))
    assert list(own.items()) == [("Content-Encoding", "gzip")]


def test_connection_keep_alive_alone_adds_nothing_and_still_drops_itself() -> None:
    kept = agent_headers(proxy(("Connection", "keep-alive"), ("Keep-Alive", "5"), ("X-Custom", "1")), route())
    assert list(kept.items()) == [("X-Custom", "1")]


def test_inbound_headers() -> None:
    received = proxy(("Server", "s"), ("Set-Cookie", "a=1"), ("Content-Length", "60"), ("Connection", "close, X-Hop"),
                     ("X-Hop", "1"), ("Content-Type", "application/json"), ("set-cookie2", "b"), ("ETag", "e"))
    assert list(inbound_headers(received).items()) == [("Server", "s"), ("Content-Type", "application/json"),
                                                       ("ETag", "e")]


@pytest.mark.parametrize("key", [b"k" * 32, b"", b"x" * 64, b"y" * 65, bytes(range(200))])
@pytest.mark.parametrize("token", ["aegis_" + "A" * 43, "", "ünïcode", "t" * 300])
def test_the_keyed_once_token_hash_is_hmac_sha256(key: bytes, token: str) -> None:
    assert keyed_hasher(key)(token.encode()) == hmac.new(key, token.encode(), hashlib.sha256).digest()


def test_a_changed_rate_limit_applies_at_once_and_a_bad_one_always_refuses() -> None:
    limits = GateLimits(max_concurrency=10, clock=lambda: 0)
    agent = AgentEntry("agent-id", "bot", frozenset({"c1"}), "")
    first = Exchange("GET")
    limits.admit(first, agent, route("1/min"), None)
    with pytest.raises(Refusal) as refused:
        limits.admit(Exchange("GET"), agent, route("1/min"), None)
    assert refused.value.status == 429
    limits.admit(Exchange("GET"), agent, route("2/min"), None)  # a new limit starts afresh
    for _ in range(2):  # not remembered as a quota: refused every time
        with pytest.raises(Refusal) as refused:
            limits.admit(Exchange("GET"), agent, route("lots"), None)
        assert (refused.value.status, refused.value.code) == (500, "rate_limit_invalid")


def test_canonical_target_keeps_refusing_a_bad_host() -> None:
    assert canonical_target("API.Example.com:8443") == canonical_target("API.Example.com:8443") == (
        "api.example.com", 8443, None)
    for _ in range(2):
        with pytest.raises(DomainError):
            canonical_target("evil.example@api.example.com")


def target_outcome(domains: list[str], target: str) -> tuple[int, str, str] | str:
    cred = Credential(id="c1", name="c1", service="svc", domains=domains)
    request: Any = SimpleNamespace(headers=CIMultiDict([("X-Target-Host", target)]))
    try:
        entry, _, port = GatePipeline._target(cast(Any, None), request, build_route(cred, b"not-a-real-secret"),
                                              Exchange("GET"), Inspector(()))
    except Refusal as refused:
        return refused.status, refused.code, refused.message
    return f"{entry} on {port}"


@pytest.mark.parametrize(("domains", "target"), [
    (["http://127.0.0.1:38732", "http://127.0.0.1:38733"], "127.0.0.1"),
    (["api.example.com", "https://api.example.com:8443"], "api.example.com"),
    (["http://127.0.0.1:8765", "https://127.0.0.1:8765"], "127.0.0.1:8765"),
])
def test_a_target_host_that_several_entries_fit_is_refused_not_guessed(domains: list[str], target: str) -> None:
    """The gate quietly took the first entry; a missing port means the entry's own, and there are two. The
    message lists them as /_aegis/services does, so that each, sent back, reaches exactly that entry (a bare
    `api.example.com` sent back would be ambiguous again)."""
    listed = DomainAllowlist.parse(domains).as_targets()
    assert target_outcome(domains, target) == (
        400, "target_host_ambiguous", f"{target} fits several entries of service 'svc''s allowlist: "
        f"{', '.join(listed)}; send X-Target-Host as /_aegis/services lists the entry you mean")
    for shown in listed:  # each entry as listed is still reached
        assert target_outcome(domains, shown) == f"{parse_allowed_host(shown)} on {parse_allowed_host(shown).port}"


def test_a_wrong_scheme_names_the_entries_as_they_can_be_sent_back() -> None:
    """Found by a review: the refusal named `api.example.com`, which sent back was ambiguous, whose refusal named
    it again: an agent copying from the errors went round in a loop."""
    domains = ["api.example.com", "https://api.example.com:8443"]
    assert target_outcome(domains, "http://api.example.com") == (
        403, "domain_not_allowed", "http://api.example.com is not an allowed host for service 'svc'; its allowlist "
        "has https://api.example.com, https://api.example.com:8443 for that host (send X-Target-Host as "
        "/_aegis/services lists it)")


def test_a_wrong_port_names_every_entry_for_that_host() -> None:
    domains = ["http://127.0.0.1:38732", "http://127.0.0.1:38733", "api.example.com"]
    assert target_outcome(domains, "127.0.0.1:9") == (
        403, "domain_not_allowed", "127.0.0.1:9 is not an allowed host for service 'svc'; its allowlist has "
        "http://127.0.0.1:38732, http://127.0.0.1:38733 for that host (send X-Target-Host as /_aegis/services lists "
        "it)")
    assert target_outcome(domains, "127.0.0.1:38733") == "http://127.0.0.1:38733 on 38733"
    assert target_outcome(domains, "api.example.com") == "api.example.com on 443"  # one entry for it: no doubt


def metrics() -> GateMetrics:
    stub: Any = SimpleNamespace(state="uninitialized", queue_depth=0, last_commit_seconds=0.0, commits=0,
                                rows_committed=0, commit_failures=0, failing=False, retries_pending=0, delivered=0,
                                failed=0, dropped=0)
    return GateMetrics(stub, stub, stub)


def test_metrics_exposition() -> None:
    gate = metrics()
    gate.observe("svc", "BREW", 403, "bot", "not_granted", True, 0.0005, None)  # exactly on a bound: that bucket
    gate.observe("svc", "GET", 200, "bot", "", False, 31.0, 0.00051)  # past the last bound: +Inf only
    gate.observe("unknown", "GET", 200, "", "", False, 0.002, 0.002)
    text = gate.render("")[0].decode()
    lines = [line for line in text.splitlines() if line.startswith(("aegis_requests", "aegis_upstream"))
             and 'service="svc"' in line]
    assert lines == [
        'aegis_requests_total{agent="bot",method="OTHER",service="svc",status="403"} 1.0',
        'aegis_requests_total{agent="bot",method="GET",service="svc",status="200"} 1.0',
        'aegis_requests_blocked_total{agent="bot",reason="not_granted",service="svc"} 1.0',
        'aegis_upstream_duration_seconds_bucket{le="0.0005",service="svc"} 0.0',
        'aegis_upstream_duration_seconds_bucket{le="0.001",service="svc"} 1.0',
        *(f'aegis_upstream_duration_seconds_bucket{{le="{le}",service="svc"}} 1.0' for le in (
            "0.0025", "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1.0", "2.5", "5.0", "10.0", "30.0",
            "+Inf")),
        'aegis_upstream_duration_seconds_count{service="svc"} 1.0',
        'aegis_upstream_duration_seconds_sum{service="svc"} 0.00051',
    ]
    assert 'aegis_request_duration_seconds_bucket{le="0.0005",service="svc"} 1.0' in text
    assert 'aegis_request_duration_seconds_bucket{le="30.0",service="svc"} 1.0' in text
    assert 'aegis_request_duration_seconds_bucket{le="+Inf",service="svc"} 2.0' in text
    assert 'aegis_request_duration_seconds_sum{service="svc"} 31.0005' in text
    assert "# TYPE aegis_requests_total counter" in text and "# TYPE aegis_request_duration_seconds histogram" in text


def test_a_refused_target_host_is_masked_in_the_form_the_gate_read_too() -> None:
    """Found by the review of dbd7e10: a lowercase secret sent in capitals (`0123...ABCDEF.example.com`) is no
    finding as sent, and the form the gate read (lowercase) went to the row unmasked; the row's own masking does
    not run for a request refused only when judged again after step 8. Both forms are masked now."""
    secret = "0123456789abcdef0123456789abcdef"
    inspector = Inspector([SecretSource("c1", (secret.encode(),))])
    asked = _asked(inspector, f"{secret.upper()}.example.com", f"{secret}.example.com", None, "https")
    assert secret not in asked.lower() and "[REDACTED]" in asked, asked
    assert _asked(inspector, "Evil.Example", "evil.example", None, None) == "evil.example"
