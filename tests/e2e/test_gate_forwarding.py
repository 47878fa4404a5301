"""What the gate puts on the wire and what it hands back: credential injection of each type, stripped
headers, TLS against a test CA, redirects, timeouts, body limits, cookies, request ids, a locked
vault and a SIGTERM drain. The upstream records every request, so each claim is checked where it
matters: at the upstream."""

from __future__ import annotations

import base64
import http.client
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qsl

import pytest

from aegisd.config import STOP_GRACE_SECONDS
from aegisd.gate.pipeline import WHOLE_ANSWER_MAX
from aegisd.ledger import query_rows
from tests.e2e.gate_support import (
    CUSTOM_HEADER,
    QUERY_PARAM,
    SECRETS,
    GateWorld,
    Reply,
    ScriptedUpstream,
    Standard,
    read_reply,
    request,
    shared_standard,
    untouched,
)
from tests.upstreams import pattern


@pytest.fixture
def std() -> Standard:
    return shared_standard()


AGENT_AUTH = [
    ("Authorization", "Bearer agent-own-bearer-0001"),
    ("Proxy-Authorization", "Basic YWdlbnQ6cHJveHk="),
    ("X-Api-Key", "agent-own-api-key-0002"),
    ("x-CUSTOM-key", "agent-own-custom-0003"),  # the header credential's own header, in another case
]
ALWAYS_STRIPPED = ("agent-own-bearer", "YWdlbnQ6cHJveHk=", "agent-own-api-key")


@pytest.mark.parametrize("service", ["bear", "hdr", "basic", "query"])
def test_each_injection_type_on_the_wire(std: Standard, service: str) -> None:
    world, up = std.world, std.up
    path = f"/echo/inject-{service}"
    query = f"keep=1&{QUERY_PARAM}=agent-own-query-0004&{QUERY_PARAM}=again&api%5Fkey=agent-own-encoded&{QUERY_PARAM}"
    reply = world.call("GET", f"/{service}{path}?{query}", AGENT_AUTH, agent="bot")
    assert reply.status == 200, reply.text()
    (seen,) = up.requests_to(path)
    secret = SECRETS[service]
    expected_auth = {"bear": [f"Bearer {secret}"], "basic": ["Basic " + base64.b64encode(secret.encode()).decode()]}
    assert seen.header("Authorization") == expected_auth.get(service, [])
    # Only the header credential owns X-Custom-Key; for the others it is an ordinary agent header.
    assert seen.header(CUSTOM_HEADER) == ([secret] if service == "hdr" else ["agent-own-custom-0003"])
    assert seen.header("X-Api-Key") == [] and seen.header("Proxy-Authorization") == []
    params = parse_qsl(seen.query, keep_blank_values=True)
    if service == "query":
        assert params == [("keep", "1"), (QUERY_PARAM, secret)]
    else:
        assert params == parse_qsl(query, keep_blank_values=True)
    wire = seen.query + "".join(f"{k}:{v}" for k, v in seen.headers)
    assert not any(value in wire for value in ALWAYS_STRIPPED)
    assert world.tokens["bot"] not in wire
    row = world.row(reply.request_id)
    assert (row["decision"], row["credential"], row["path"]) == ("allowed", service, path)
    world.assert_no_leaks()


def test_a_fragment_is_dropped_before_anything_judges_or_forwards_the_request(std: Standard) -> None:
    """HTTP clients never send one; if an agent does, the upstream, the ledger and the checks all see the
    same path and query, and the query credential is still the only one."""
    world, up = std.world, std.up
    reply = world.call("GET", f"/query/echo/frag?keep=1#part&{QUERY_PARAM}=agent-own-query-0005", AGENT_AUTH,
                       agent="bot")
    assert reply.status == 200, reply.text()
    (seen,) = up.requests_to("/echo/frag")
    assert seen.path == "/echo/frag"
    assert parse_qsl(seen.query, keep_blank_values=True) == [("keep", "1"), (QUERY_PARAM, SECRETS["query"])]
    assert "part" not in seen.query and "agent-own-query-0005" not in seen.query
    assert world.row(reply.request_id)["path"] == "/echo/frag"
    world.assert_no_leaks()


def test_agent_and_hop_by_hop_headers_are_stripped(std: Standard) -> None:
    world, up = std.world, std.up
    headers = [
        *AGENT_AUTH,
        ("Connection", "keep-alive, X-Hop-Named"),
        ("X-Hop-Named", "named-by-connection"),
        ("Keep-Alive", "timeout=5"),
        ("TE", "trailers"),
        ("Trailer", "X-Checksum"),
        ("Proxy-Connection", "keep-alive"),
        ("Upgrade", "h2c"),
        ("X-Aegis-Debug", "1"),
        ("X-Aegis-Request-Id", "forged-request-id"),
        ("X-Target-Host", f"127.0.0.1:{up.port}"),
        ("X-Trace", "kept-trace-1"),
        ("User-Agent", "agent-test/1.0"),
        ("Accept", "application/json"),
    ]
    reply = world.call("POST", "/hdr/echo/strip", [*headers, ("Content-Type", "text/plain")], body=b"hello",
                       agent="bot", host=f"localhost:{world.port}")
    assert reply.status == 200, reply.text()
    (seen,) = up.requests_to("/echo/strip")
    stripped = {"authorization", "proxy-authorization", "x-api-key", "connection", "x-hop-named", "keep-alive",
                "te", "trailer", "proxy-connection", "upgrade", "x-aegis-debug", "x-aegis-request-id",
                "x-target-host", "x-aegis-agent"}
    assert not stripped & seen.header_names, stripped & seen.header_names
    assert seen.header("Host") == [f"127.0.0.1:{up.port}"]
    assert seen.header(CUSTOM_HEADER) == [SECRETS["hdr"]]
    assert seen.header("X-Trace") == ["kept-trace-1"]
    assert seen.header("User-Agent") == ["agent-test/1.0"]
    assert seen.header("Content-Type") == ["text/plain"]
    assert seen.body == b"hello"
    assert reply.header("X-Aegis-Request-Id") == reply.request_id != "forged-request-id"
    world.assert_no_leaks()


# The agent's credentials spelt as CGI-style servers (CGI, WSGI, PHP; lighttpd for any punctuation) read the same
# variable as the injected header: HTTP_X_CUSTOM_KEY, HTTP_AUTHORIZATION, HTTP_X_API_KEY.
CGI_SPELLINGS = [
    ("X_Custom_Key", "agent-cgi-custom-0006"),
    ("x.custom.key", "agent-cgi-custom-0007"),
    ("X-Custom_Key", "agent-cgi-custom-0008"),
    ("X_API_KEY", "agent-cgi-api-key-0009"),
    ("Proxy_Authorization", "agent-cgi-proxy-0010"),
]


@pytest.mark.parametrize("service", ["hdr", "bear"])
def test_agent_headers_a_cgi_server_would_read_as_a_credential_are_stripped(std: Standard, service: str) -> None:
    """A cold review found an agent's `X_Custom_Key: attacker` forwarded beside the injected `X-Custom-Key`: a
    CGI-style upstream maps both to one variable and may read the agent's. Names that merely contain one pass."""
    world, up = std.world, std.up
    path = f"/echo/cgi-spelt-{service}"
    kept = [("X_Custom_Key_Id", "kept-0011"), ("X-Trace_Id", "kept-0012")]
    reply = world.call("GET", f"/{service}{path}", [*CGI_SPELLINGS, *kept], agent="bot")
    assert reply.status == 200, reply.text()
    (seen,) = up.requests_to(path)
    wire = "".join(f"{k}:{v}" for k, v in seen.headers)
    for name, value in CGI_SPELLINGS:
        # Only the header credential owns X-Custom-Key's variable; for the bearer one it is an agent header.
        own = service == "bear" and "custom" in name.lower()
        assert (value in wire) is own, (name, seen.headers)
    assert seen.header(CUSTOM_HEADER) == ([SECRETS["hdr"]] if service == "hdr" else [])
    for name, value in kept:
        assert seen.header(name) == [value]
    world.assert_no_leaks()


@pytest.mark.parametrize("header_name", ["X_Api_Token", "x.api.token"])
def test_a_credential_header_spelt_for_cgi_strips_the_agents_plain_spelling(header_name: str) -> None:
    """The other way round: the operator's header name has `_` or `.`, and the agent sends only plainly spelt
    names; `X-Api-Token` is the same CGI variable, so it must not reach the upstream beside the injected one."""
    world = GateWorld.start()
    try:
        up = world.upstream()
        world.credential("spelt", "sk-spelt-secret-3Wd8Kq1Zr6", up.entry(), "--auth-type", "header",
                         "--header-name", header_name)
        world.agent("bot", "spelt")
        reply = world.call("GET", "/spelt/echo/spelt", [("X-Api-Token", "agent-chosen-0013"), ("X-Trace", "kept")],
                           agent="bot")
        assert reply.status == 200, reply.text()
        (seen,) = up.requests_to("/echo/spelt")
        assert "agent-chosen-0013" not in "".join(f"{k}:{v}" for k, v in seen.headers), seen.headers
        assert seen.header(header_name) == ["sk-spelt-secret-3Wd8Kq1Zr6"] and seen.header("X-Trace") == ["kept"]
        world.assert_no_leaks()
    finally:
        world.close()


def test_https_upstream_verified_against_the_test_ca(std: Standard) -> None:
    world, tls_up = std.world, std.tls_up
    reply = world.call("POST", "/tls/echo/tls", [("Content-Type", "application/json")], body=b'{"a": 1}',
                       agent="bot")
    assert reply.status == 200, reply.text()
    assert reply.json()["body"] == '{"a": 1}'
    (seen,) = tls_up.requests_to("/echo/tls")
    assert seen.tls and seen.header("Authorization") == [f"Bearer {SECRETS['tls']}"]
    assert seen.header("Host") == [f"localhost:{tls_up.port}"]
    row = world.row(reply.request_id)
    assert (row["decision"], row["target_host"], row["bytes_in"]) == ("allowed", f"localhost:{tls_up.port}", 8)
    world.assert_no_leaks()


def test_untrusted_certificate_is_refused(std: Standard) -> None:
    world, rogue = std.world, std.rogue_up
    before = len(rogue.requests)
    reply = world.call("GET", "/rogue/echo/rogue", agent="bot")
    world.assert_refused(reply, 502, "upstream_tls_error", credential="rogue")
    assert len(rogue.requests) == before  # the handshake failed: no request, so no credential, was sent
    world.assert_no_leaks()


def test_redirect_to_another_host_is_handed_back(std: Standard) -> None:
    world, up = std.world, std.up
    location = f"http://localhost:{up.port}/echo/followed?x=1"
    reply = world.call("GET", f"/bear/redirect?to={location}", agent="bot")
    assert reply.status == 302
    assert reply.header("Location") == location
    assert reply.body == b"moved"
    assert up.requests_to("/echo/followed") == []
    assert len(up.requests_to("/redirect")) == 1
    row = world.row(reply.request_id)
    assert (row["decision"], row["status"]) == ("allowed", 302)
    world.assert_no_leaks()


def test_hung_upstream_times_out() -> None:
    """Its own daemon with `[gate] read_timeout = 1`, so the shared one keeps a timeout no loaded machine hits."""
    world = GateWorld.start(read_timeout=1)
    try:
        up = world.upstream()
        world.credential("bear", SECRETS["bear"], up.entry())
        world.agent("bot", "bear")
        try:
            reply = world.call("GET", "/bear/hang", agent="bot")
        finally:
            up.release("hang")
        world.assert_refused(reply, 504, "upstream_timeout", credential="bear")
        assert len(up.requests_to("/hang")) == 1
        world.assert_no_leaks()
    finally:
        world.close()


def test_refused_connection_is_an_upstream_error(std: Standard) -> None:
    reply = std.world.call("GET", "/dead/echo/x", agent="bot")
    std.world.assert_refused(reply, 502, "upstream_error", target_host=f"127.0.0.1:{std.dead_port}")
    # Why, so the user can tell a dead port from a firewall (a review of the first hour found only "could not
    # connect"): the errno's name, which holds nothing of the request
    assert reply.error()["message"] == "could not connect to the upstream (ECONNREFUSED)", reply.text()
    std.world.assert_no_leaks()


@pytest.mark.parametrize("status", [404, 500, 503])
def test_upstream_statuses_pass_through(std: Standard, status: int) -> None:
    reply = std.world.call("GET", f"/bear/status/{status}", agent="bot")
    assert (reply.status, reply.body) == (status, f"status {status}".encode())
    row = std.world.row(reply.request_id)
    assert (row["decision"], row["status"], row["reason"]) == ("allowed", status, "")


def _switches(target: str) -> bytes:
    if target == "/switch/upgrade":
        return b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    if target == "/switch/bare":
        return b"HTTP/1.1 101 Switching Protocols\r\n\r\n"
    return b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def test_an_unasked_for_101_is_a_broken_upstream(std: Standard) -> None:
    """The gate never forwards Upgrade, so a 101 can only be bogus: 502 upstream_error, that upstream connection
    is closed, and the agent's keep-alive connection goes on to its next request."""
    world = std.world
    up = ScriptedUpstream(_switches)
    try:
        world.credential("switchy", "sk-switchy-secret-S1w2T3", up.entry())
        world.aegis.ctl("grant", "bot", "switchy").ok()
        head = f"Host: 127.0.0.1\r\nX-Aegis-Agent: {world.tokens['bot']}\r\n"
        with socket.create_connection(("127.0.0.1", world.port), timeout=30) as sock:
            sock.sendall(f"GET /switchy/switch/upgrade HTTP/1.1\r\n{head}\r\n"
                         f"GET /switchy/switch/bare HTTP/1.1\r\n{head}\r\n"
                         f"GET /switchy/after HTTP/1.1\r\n{head}Connection: close\r\n\r\n".encode())
            replies = [read_reply(sock) for _ in range(3)]
        world.received += [reply.text() for reply in replies]
        for reply in replies[:2]:
            world.assert_refused(reply, 502, "upstream_error", credential="switchy")
        assert (replies[2].status, replies[2].body) == (200, b"ok")
        assert up.connections == 3  # neither switched connection was used again
        world.assert_no_leaks()
    finally:
        up.stop()


def test_pooled_upstream_connections_never_cross_credentials(std: Standard) -> None:
    """Found by a cold review: the pool was keyed by scheme, host and port, so one credential's connection was
    reused for another's; against an upstream that ignores a GET's Content-Length (CL.0), a body one agent sent
    could prefix the next request on it, another credential's included. Now each credential has its own
    connections, and one that carried a body with a GET is not reused at all."""
    world, up = std.world, std.up
    for n in range(2):
        for service in ("bear", "hdr"):  # two credentials, one upstream entry
            assert world.call("GET", f"/{service}/echo/pool-{service}-{n}", agent="bot").status == 200
    bear = {seen.peer for seen in up.requests_to("/echo/pool-bear-")}
    hdr = {seen.peer for seen in up.requests_to("/echo/pool-hdr-")}
    assert len(bear) == len(hdr) == 1 and bear != hdr, (bear, hdr)  # reused within a credential, never across

    smuggled = b"GET /smuggled HTTP/1.1\r\nX: "
    assert world.call("GET", "/bear/echo/pool-get-body", body=smuggled, agent="bot").status == 200
    assert world.call("GET", "/bear/echo/pool-after-body", agent="bot").status == 200
    (with_body,), (after,) = up.requests_to("/echo/pool-get-body"), up.requests_to("/echo/pool-after-body")
    assert with_body.peer in bear and after.peer != with_body.peer
    world.assert_no_leaks()


def test_set_cookie_is_dropped(std: Standard) -> None:
    reply = std.world.call("GET", "/bear/cookie", agent="bot")
    assert reply.status == 200
    assert reply.all("Set-Cookie") == []
    assert reply.header("X-Upstream") == "kept"
    assert std.world.row(reply.request_id)["status"] == 200


# -- request bodies ------------------------------------------------------------------------------


def test_body_at_the_limit_is_forwarded(std: Standard) -> None:
    body = b"x" * 4096
    reply = std.world.call("POST", "/bear/echo/at-limit", body=body, agent="bot")
    assert reply.status == 200, reply.text()
    assert std.up.requests_to("/echo/at-limit")[0].body == body
    assert std.world.row(reply.request_id)["bytes_in"] == 4096


def test_content_length_over_the_limit_is_refused_before_reading(std: Standard) -> None:
    """The body is never sent: a gate that tried to read it would wait forever instead of answering."""
    world = std.world
    with untouched(std.up):
        reply = world.raw_request("POST", "/bear/echo/too-big", [("Content-Length", "4097")], agent="bot")
    world.assert_refused(reply, 413, "body_too_large", bytes_in=0)
    world.assert_no_leaks()


def test_expect_100_continue_with_a_length_over_the_limit_gets_413_and_no_continue(std: Standard) -> None:
    """A client waiting to send a body it declared too large is told so at once, never asked to send it."""
    world = std.world
    head = (f"POST /bear/echo/too-big-expect HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Aegis-Agent: {world.tokens['bot']}"
            "\r\nContent-Length: 1000000000\r\nExpect: 100-continue\r\n\r\n").encode()
    with untouched(std.up), socket.create_connection(("127.0.0.1", world.port), timeout=30) as sock:
        sock.sendall(head)
        reply = read_reply(sock)
    world.received.append(reply.text())
    world.assert_refused(reply, 413, "body_too_large", bytes_in=0)
    assert reply.header("Connection") == "close"
    world.assert_no_leaks()


def _chunked(total: int, size: int = 1000) -> bytes:
    out = b""
    while total > 0:
        part = min(size, total)
        out += f"{part:x}\r\n".encode() + b"y" * part + b"\r\n"
        total -= part
    return out + b"0\r\n\r\n"


def test_chunked_body_crossing_the_limit_is_refused_and_closed(std: Standard) -> None:
    world, up = std.world, std.up
    reply = world.raw_request("POST", "/bear/echo/chunked-big", [("Transfer-Encoding", "chunked")], agent="bot",
                              body=_chunked(6000), wait_close=True)
    world.assert_refused(reply, 413, "body_too_large")
    assert reply.closed
    assert all(seen.body is None for seen in up.requests_to("/echo/chunked-big"))  # never a whole body
    world.assert_no_leaks()


def test_an_upgrade_request_with_a_body_is_refused_and_one_without_is_served() -> None:
    """llhttp hands over no body after a `Connection: Upgrade` head. Forwarded with its declared length and
    no body (inspection off streams bodies), the request would leave the upstream waiting for bytes that the
    gate's next request on that pooled connection would supply: the agent could choose where a request of its
    own, credential attached, starts there. With a body it is refused; without one it is served (curl's
    `Upgrade: h2c`), the Upgrade dropped as a hop-by-hop header."""
    world = GateWorld.start()
    try:
        up = world.upstream()
        world.credential("stream", "sk-stream-secret-7Hq2Lp9Xv4", up.entry(), "--body-inspection", "off")
        world.agent("bot", "stream")
        upgrade = [("Connection", "Upgrade"), ("Upgrade", "anything")]
        for method, framing, body in (("POST", [], b"DELETE /x HTTP/1.1\r\n\r\n"),
                                      ("GET", [("Transfer-Encoding", "chunked")], b"5\r\nhello\r\n0\r\n\r\n")):
            with untouched(up):
                reply = world.raw_request(method, "/stream/echo/upgrade", [*upgrade, *framing], agent="bot", body=body,
                                          wait_close=True)
            # Its head was read: the row names the agent and the target as sent, as a front-door refusal's does.
            world.assert_refused(reply, 400, "bad_request", agent="bot", service="", path="/stream/echo/upgrade")
            assert "protocol upgrade" in reply.error()["message"] and reply.closed
        h2c = [("Connection", "Upgrade, HTTP2-Settings"), ("Upgrade", "h2c"), ("HTTP2-Settings", "AAMAAABkAAQAAP__")]
        reply = world.raw_request("GET", "/stream/echo/h2c", h2c, agent="bot")
        assert reply.status == 200, reply.text()
        (seen,) = up.requests_to("/echo/h2c")
        assert not {"upgrade", "http2-settings"} & set(seen.header_names) and seen.body in (None, b"")
        world.assert_no_leaks()
    finally:
        world.close()


def test_chunked_body_under_the_limit_is_forwarded(std: Standard) -> None:
    reply = std.world.raw_request("POST", "/bear/echo/chunked-ok", [("Transfer-Encoding", "chunked")],
                                  agent="bot", body=_chunked(3000))
    assert reply.status == 200, reply.text()
    assert std.up.requests_to("/echo/chunked-ok")[0].body == b"y" * 3000
    assert std.world.row(reply.request_id)["bytes_in"] == 3000


# -- request ids and error bodies ----------------------------------------------------------------


def test_every_response_carries_its_request_id(std: Standard) -> None:
    world = std.world
    replies = [
        world.call("GET", "/bear/echo/id", agent="bot"),
        world.call("GET", "/bear/status/500", agent="bot"),
        world.call("GET", "/bear/echo/id"),
        world.call("GET", "/nope/x", agent="bot"),
        world.call("GET", "/", agent="bot"),
        world.call("GET", "/bear/echo/id", agent="bot", host="evil.example"),
    ]
    rows = world.ledger()
    ids = [reply.request_id for reply in replies]
    assert len(set(ids)) == len(ids)
    for reply in replies:
        row = world.row(reply.request_id, rows)
        assert row["status"] == reply.status
        if reply.status >= 400 and row["decision"] == "denied":
            assert reply.error()["code"] == row["reason"]
    health = world.call("GET", "/_aegis/health")
    assert health.status == 200 and health.request_id
    # Found by a cold review: a refusal on an unknown operator endpoint got no row, unlike every other one.
    unknown = world.call("GET", "/_aegis/nothing-here", agent="bot")
    row = world.assert_refused(unknown, 404, "not_found")
    assert (row["agent"], row["service"], row["path"]) == ("", "_aegis", "/nothing-here"), row
    assert not [r for r in world.ledger() if r["request_id"] == health.request_id]  # probes poll it: no rows
    world.assert_no_leaks()


# -- whole-daemon states: locked, draining -------------------------------------------------------


def _small(daemon_env: dict[str, str] | None = None) -> Iterator[GateWorld]:
    world = GateWorld.start(daemon_env)
    up = world.upstream()
    world.credential("bear", SECRETS["bear"], up.entry())
    world.agent("bot", "bear")
    yield world
    world.close()


@pytest.fixture
def small() -> Iterator[GateWorld]:
    """A fresh daemon with default settings, one upstream, and agent `bot` granted `bear`."""
    yield from _small()


SHORT_GRACE_SECONDS = 2.0  # the tests that wait the stop's grace out, without ten idle seconds


@pytest.fixture
def short_grace(tmp_path: Path) -> Iterator[GateWorld]:
    """As `small`, with a stop grace of SHORT_GRACE_SECONDS (the `stop_grace` setting)."""
    config = tmp_path / "aegisd.toml"
    config.write_text(f"stop_grace = {SHORT_GRACE_SECONDS}\n")
    yield from _small({"AEGIS_CONFIG": str(config)})


def _stop_after_the_grace(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM; aegisd exits 0 once the (short) grace period has run out, not before and not at the default."""
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    waited = time.monotonic() - started
    assert SHORT_GRACE_SECONDS <= waited < STOP_GRACE_SECONDS, waited


def test_locked_vault_refuses_and_forwards_nothing(small: GateWorld) -> None:
    world, up = small, small.upstreams[0]
    assert world.call("GET", "/bear/echo/before", agent="bot").status == 200
    world.aegis.ctl("lock").ok()
    with untouched(up):
        locked = world.call("GET", "/bear/echo/locked", agent="bot")
        no_token = world.call("GET", "/bear/echo/locked")
    world.assert_refused(locked, 503, "vault_locked")
    world.assert_refused(no_token, 503, "vault_locked")
    assert locked.header("Retry-After") is None  # an operator must unlock: no time to name
    world.unlock()
    assert world.call("GET", "/bear/echo/after", agent="bot").status == 200
    world.assert_no_leaks()


def _connects(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except OSError:
        return False
    return True


def test_sigterm_drains_in_flight_requests(small: GateWorld) -> None:
    world, up = small, small.upstreams[0]
    token = world.tokens["bot"]
    idle = http.client.HTTPConnection("127.0.0.1", world.port, timeout=30)
    idle.request("GET", "/bear/echo/warm", headers={"X-Aegis-Agent": token})
    warm = idle.getresponse()
    warm.read()
    assert warm.status == 200 and not warm.will_close  # kept alive, and open across the signal

    replies: list[Reply] = []
    slow = threading.Thread(target=lambda: replies.append(
        request(world.port, "GET", "/bear/hold/drain", [("X-Aegis-Agent", token)])))
    slow.start()
    assert up.arrived("drain").wait(10), "the slow request never reached the upstream"
    assert world.aegis.proc is not None
    proc = world.aegis.proc
    proc.send_signal(signal.SIGTERM)
    for _ in range(500):  # the gate stops listening once it starts draining
        if not _connects(world.port):
            break
        time.sleep(0.02)
    else:
        raise AssertionError("the gate kept accepting connections after SIGTERM")

    idle.request("GET", "/bear/echo/late", headers={"X-Aegis-Agent": token})
    late = idle.getresponse()
    late_body = late.read()
    assert late.status == 503, late_body
    up.release("drain")
    slow.join(30)
    assert proc.wait(30) == 0
    world.aegis.proc = None
    (reply,) = replies
    assert (reply.status, reply.body) == (200, b"held drain")
    assert up.was_released("drain")
    rows = query_rows(world.aegis.data_dir / "ledger.db", limit=1000)
    (row,) = [r for r in rows if r.request_id == reply.request_id]
    assert (row.decision, row.status, row.path) == ("allowed", 200, "/hold/drain")
    (late_row,) = [r for r in rows if r.request_id == late.getheader("X-Aegis-Request-Id")]
    assert (late_row.decision, late_row.reason) == ("denied", "shutting_down")
    assert up.requests_to("/echo/late") == []
    world.received.append(late_body.decode())
    world.aegis.assert_no_leaks([*world.secrets, token], extra_text=world.received)


def test_sigterm_records_a_request_cut_when_the_grace_period_ends(short_grace: GateWorld) -> None:
    """A stream still open when the grace period ends is cut, and its ledger row says so."""
    world, up = short_grace, short_grace.upstreams[0]
    token = world.tokens["bot"]
    sock = socket.create_connection(("127.0.0.1", world.port), timeout=30)
    sock.sendall(f"GET /bear/sse?gate=never HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Aegis-Agent: {token}\r\n\r\n".encode())
    head = _read_until(sock, b"data: first")
    request_id = next(line.split(b":", 1)[1].strip().decode() for line in head.split(b"\r\n")
                      if line.lower().startswith(b"x-aegis-request-id:"))
    assert world.aegis.proc is not None
    _stop_after_the_grace(world.aegis.proc)
    world.aegis.proc = None
    sock.close()
    rows = query_rows(world.aegis.data_dir / "ledger.db", limit=1000)
    (row,) = [r for r in rows if r.request_id == request_id]
    assert (row.decision, row.reason, row.status, row.path) == ("allowed", "shutting_down", 200, "/sse")
    up.release("never")
    world.aegis.assert_no_leaks([*world.secrets, token])


def test_an_http_1_0_agent_gets_an_answer_of_unknown_length_whole_with_its_length(small: GateWorld) -> None:
    """HTTP/1.0 has no chunks: a body of unknown length would end at the close, and a cut one could not be
    told from a whole one. The gate reads it whole and sends it with a Content-Length."""
    world = small
    size = 300_000
    reply = world.raw(f"GET /bear/stream?bytes={size} HTTP/1.0\r\nHost: 127.0.0.1\r\n"
                      f"X-Aegis-Agent: {world.tokens['bot']}\r\n\r\n".encode())
    assert reply.status == 200 and reply.header("Content-Length") == str(size)
    assert reply.header("Transfer-Encoding") is None and reply.body == pattern(size)
    row = world.row(reply.request_id)
    assert (row["decision"], row["status"], row["bytes_out"]) == ("allowed", 200, size)
    world.assert_no_leaks()


def test_an_http_1_0_answer_of_unknown_length_past_the_whole_answer_limit_is_refused(small: GateWorld) -> None:
    world = small
    head = f"HTTP/1.0\r\nHost: 127.0.0.1\r\nX-Aegis-Agent: {world.tokens['bot']}\r\n\r\n"
    over = world.raw(f"GET /bear/stream?bytes={WHOLE_ANSWER_MAX + 1} {head}".encode())
    world.assert_refused(over, 502, "upstream_error")
    assert "use HTTP/1.1" in over.error()["message"]
    world.assert_no_leaks()


def _read_until(sock: socket.socket, marker: bytes) -> bytes:
    data = b""
    while marker not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def test_expect_100_continue_is_answered_once_the_checks_pass(std: Standard) -> None:
    """A client that waits for `100 Continue` gets it from the gate once every bodiless check passed, and
    the body then reaches the upstream (without the Expect header); a refused one gets its final answer."""
    world, up = std.world, std.up
    body = b"payload-after-continue"
    head = (f"POST /bear/echo/expect HTTP/1.1\r\nHost: 127.0.0.1:{world.port}\r\n"
            f"X-Aegis-Agent: {world.tokens['bot']}\r\nContent-Length: {len(body)}\r\n"
            "Expect: 100-continue\r\nConnection: close\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", world.port), timeout=30) as sock:
        sock.sendall(head)
        interim = _read_until(sock, b"\r\n\r\n")  # nothing is sent until the gate says go on
        assert interim.startswith(b"HTTP/1.1 100 Continue\r\n"), interim
        sock.sendall(body)
        final = _read_until(sock, b"payload-after-continue")
    world.received.append(final.decode("latin-1"))
    assert final.split(b"\r\n", 1)[0] == b"HTTP/1.1 200 OK", final
    (seen,) = up.requests_to("/echo/expect")
    assert seen.body == body and seen.header("Expect") == []

    refused = world.raw_request("POST", "/bear/echo/expect-refused", [("Expect", "100-continue"),
                                                                      ("Content-Length", "5")])
    assert refused.status == 401 and not up.requests_to("/echo/expect-refused")
    world.assert_no_leaks()


def test_sigterm_cuts_a_request_still_reading_its_body_as_refused(short_grace: GateWorld) -> None:
    """A request whose body has not all arrived when the grace period ends never reached the upstream:
    its row says denied, not allowed, and the agent gets no answer at all."""
    world, up = short_grace, short_grace.upstreams[0]
    token = world.tokens["bot"]
    sock = socket.create_connection(("127.0.0.1", world.port), timeout=30)
    # Body inspection is on: the gate reads the whole body before it forwards anything. Its 100 Continue
    # says the request passed every other check and now waits for that body.
    sock.sendall(f"POST /bear/echo/unfinished HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Aegis-Agent: {token}\r\n"
                 "Content-Type: text/plain\r\nContent-Length: 100\r\nExpect: 100-continue\r\n\r\n".encode())
    assert _read_until(sock, b"\r\n\r\n").startswith(b"HTTP/1.1 100 ")
    sock.sendall(b"ten bytes.")
    assert world.aegis.proc is not None
    _stop_after_the_grace(world.aegis.proc)
    world.aegis.proc = None
    assert sock.recv(65536) == b""  # cut: no answer at all
    sock.close()
    assert up.requests_to("/echo/unfinished") == []
    rows = query_rows(world.aegis.data_dir / "ledger.db", limit=1000)
    (row,) = [r for r in rows if r.path == "/echo/unfinished"]
    assert (row.decision, row.reason, row.agent, row.credential) == ("denied", "shutting_down", "bot", "bear")
    world.aegis.assert_no_leaks([*world.secrets, token])


# A test-only fault, loaded into the daemon through PYTHONPATH: one step of the pipeline raises for
# chosen paths, after the limits admitted the request but before the upstream is called, or after it
# answered. Nothing in aegisd knows about it.
FAULT = '''
import aegisd.gate.pipeline as pipeline

_inspect_request, _relay = pipeline.inspect_request, pipeline.GatePipeline._relay

def inspect_request(request, route, inspector, x, *args):
    if x.path.startswith("/echo/fault-before"):
        raise RuntimeError("injected fault before forwarding")
    return _inspect_request(request, route, inspector, x, *args)

async def relay(self, request, x, upstream, redaction):
    if x.path.startswith("/echo/fault-after"):
        raise RuntimeError("injected fault after forwarding")
    return await _relay(self, request, x, upstream, redaction)

pipeline.inspect_request, pipeline.GatePipeline._relay = inspect_request, relay
'''


def test_a_bug_in_the_pipeline_answers_500_and_records_it(small: GateWorld) -> None:
    """A step that raises: the agent gets the gate's JSON 500 and the connection closes, the ledger gets one
    `internal_error` row (denied if nothing was forwarded, and then it used no quota), the log names only the
    exception's type, and the daemon goes on serving."""
    world, up = small, small.upstreams[0]
    fault = world.aegis.root / "fault"
    fault.mkdir()
    (fault / "sitecustomize.py").write_text(FAULT)
    world.aegis.stop()
    world.aegis.start(env={"PYTHONPATH": str(fault)})
    world.unlock()
    world.aegis.ctl("agent", "set-rate-limit", "bot", "3/day").ok()

    before = world.raw_request("GET", "/bear/echo/fault-before", agent="bot", wait_close=True)
    after = world.raw_request("GET", "/bear/echo/fault-after", agent="bot", wait_close=True)
    for reply in (before, after):
        assert reply.status == 500, reply.text()
        assert reply.error()["code"] == "internal_error"
        assert reply.closed
    assert up.requests_to("/echo/fault-before") == []
    assert len(up.requests_to("/echo/fault-after")) == 1
    rows = world.ledger()
    assert {k: world.row(before.request_id, rows)[k] for k in ("decision", "reason", "status")} == \
        {"decision": "denied", "reason": "internal_error", "status": 500}
    assert {k: world.row(after.request_id, rows)[k] for k in ("decision", "reason", "status")} == \
        {"decision": "allowed", "reason": "internal_error", "status": 500}
    assert world.call("GET", "/bear/echo/fine", agent="bot").status == 200  # the pooled upstream connection too
    assert world.call("GET", "/bear/echo/third", agent="bot").status == 200  # `before` gave its quota back
    world.assert_refused(world.call("GET", "/bear/echo/fourth", agent="bot"), 429, "rate_limited")
    log = world.aegis.log()
    assert log.count("the gate failed on a request: RuntimeError") == 2
    assert "injected fault" not in log
    world.assert_no_leaks()
