"""Upstreams that misbehave on purpose, against the real daemon: trailers without end, a TLS answer cut by a bare
TCP close, answers the gate has to cut; and the headers a reverse proxy in front of an upstream routes on.

Found by a cold review of the gate. Each upstream here is a raw socket (TLS with the world's test CA where it
says so) that writes exactly the bytes a test wants; the agent is a raw socket too, so the test sees how its
connection ends: an orderly close (FIN) or a reset. Nothing asserts a duration: where the gate must stay
responsive, the test checks what happened before what.
"""

from __future__ import annotations

import contextlib
import itertools
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from typing import cast

import pytest

from aegisd.gate.headers import cgi_name
from tests.e2e.gate_support import GateWorld, Reply, read_reply
from tests.upstreams import accepted

GUARD = 60.0  # seconds: a socket wait past this fails the test instead of hanging it


class RawUpstream:
    """A socket upstream on 127.0.0.1 (TLS when given a context): for each connection, reads a request head and
    hands the socket to `script`, which writes what it likes and ends the connection as it likes."""

    def __init__(self, script: Callable[[socket.socket], None], context: ssl.SSLContext | None = None) -> None:
        self._script, self._context = script, context
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._server.getsockname()[1])
        self.errors: list[BaseException] = []
        self._threads: list[threading.Thread] = []
        threading.Thread(target=self._accept, name="raw-upstream", daemon=True).start()

    def entry(self) -> str:
        return f"https://localhost:{self.port}" if self._context is not None else f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        for conn in accepted(self._server):
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(GUARD)
            sock = self._context.wrap_socket(conn, server_side=True) if self._context is not None else conn
            head = b""
            while b"\r\n\r\n" not in head:
                data = sock.recv(65536)
                if not data:
                    return
                head += data
            self._script(sock)
        except Exception as exc:  # reported by `finish`: a broken script fails its test
            self.errors.append(exc)
        finally:
            with contextlib.suppress(OSError):
                conn.close()

    def finish(self) -> None:
        """Stop accepting and wait for every connection's script to end (a guard, not a timing bound)."""
        self._server.close()
        for thread in self._threads:
            thread.join(GUARD)
            assert not thread.is_alive(), "an upstream script never ended"
        assert not self.errors, self.errors


def exchange(world: GateWorld, request: bytes) -> tuple[bytes, str]:
    """Send a raw request and read until the gate ends the connection: what came, and how it ended."""
    with socket.create_connection(("127.0.0.1", world.port), timeout=GUARD) as sock:
        sock.sendall(request)
        return read_to_end(world, sock)


def read_to_end(world: GateWorld, sock: socket.socket) -> tuple[bytes, str]:
    """What the gate sends on `sock` until it ends the connection, and how it ended (`eof` or `reset`)."""
    received = b""
    try:
        while data := sock.recv(65536):
            received += data
        ended = "eof"
    except ConnectionResetError:
        ended = "reset"
    world.received.append(received.decode("latin-1"))
    return received, ended


def get(world: GateWorld, agent: str, target: str, version: str = "1.1", *, close: bool = False) -> bytes:
    """A raw GET; `close` asks the gate to close after a whole answer (else an HTTP/1.1 one stays open), which
    leaves a cut answer's framing as it is (chunked or of its length)."""
    ending = "Connection: close\r\n" if close else ""
    return (f"GET {target} HTTP/{version}\r\nHost: 127.0.0.1:{world.port}\r\n"
            f"X-Aegis-Agent: {world.tokens[agent]}\r\n{ending}\r\n").encode()


def request_id(received: bytes) -> str:
    head = received.partition(b"\r\n\r\n")[0].decode("latin-1")
    (value,) = [line.split(":", 1)[1].strip() for line in head.split("\r\n")
                if line.lower().startswith("x-aegis-request-id:")]
    return value


def assert_cut(world: GateWorld, received: bytes, ended: str, reason: str) -> None:
    """An HTTP/1.1 answer that began and was cut: by a reset, never an orderly close, and its row says why."""
    assert received.startswith(b"HTTP/1.1 200 "), received[:200]
    assert not received.endswith(b"\r\n0\r\n\r\n")
    assert ended == "reset", "a cut answer ended with an orderly close: an agent that ignores framing takes it whole"
    row = world.row(request_id(received))
    assert (row["decision"], row["reason"], row["status"]) == ("allowed", reason, 200), row


class _Received:
    """What an agent received, read back as from its socket."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    def recv(self, size: int) -> bytes:
        chunk, self._data = self._data[:size], self._data[size:]
        return chunk


def parse(received: bytes) -> Reply:
    """A whole answer, as a well-behaved client reads it."""
    return read_reply(cast(socket.socket, _Received(received)))


_names = itertools.count()


def service(world: GateWorld, entry: str, *args: str) -> tuple[str, str]:
    """A fresh credential for `entry` and a fresh agent granted it: (service, agent)."""
    n = next(_names)
    name, agent = f"hostile{n}", f"hostile-bot{n}"
    world.credential(name, f"sk-hostile-secret-{n}-H1o2S3t4", entry, *args)
    world.agent(agent, name)
    return name, agent


@pytest.fixture(scope="module")
def world() -> Iterator[GateWorld]:
    instance = GateWorld.start()
    yield instance
    instance.close()


# -- trailers without end --------------------------------------------------------------------------------------

_BLOCK = b"a" * 65536
_BUDGET = 512  # blocks: 32 MiB, far past the 64 KiB bound (and what the sockets between can hold)


@pytest.mark.parametrize("version", ["1.1", "1.0"])
def test_an_endless_trailer_is_cut_at_the_bound_while_the_gate_keeps_answering(world: GateWorld,
                                                                              version: str) -> None:
    """Found by a cold review: after the last chunk, the upstream's trailers had no bound. One field sent without
    end grew in httptools by concatenation on the event loop (another client's health check went from 2 ms to
    28 s, the daemon's memory from 69 to 276 MB in 10 s), and the read timeout never fired while bytes came.
    Now the gate cuts the exchange once 64 KiB (and at most one read) arrive without the parser making progress:
    `upstream_error`, a cut answer to an HTTP/1.1 agent, a 502 to an HTTP/1.0 one (its answer is read whole)."""
    midway, health_answered = threading.Event(), threading.Event()
    sent: list[int] = []  # blocks of the budget the upstream got out before the gate closed the connection

    def endless(sock: socket.socket) -> None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"2\r\nok\r\n0\r\nX-Trailer: " + b"a" * 16384)  # under the bound: the answer is under way
        midway.set()
        assert health_answered.wait(GUARD)
        for n in range(_BUDGET):
            try:
                sock.sendall(_BLOCK)
            except OSError:  # the gate closed the connection
                sent.append(n)
                return
        # Nothing bounded it: end it, so the test fails on what was sent rather than waiting out a timeout
        sent.append(_BUDGET)

    up = RawUpstream(endless)
    name, agent = service(world, up.entry())
    with socket.create_connection(("127.0.0.1", world.port), timeout=GUARD) as sock:
        sock.sendall(get(world, agent, f"/{name}/endless", version))
        assert midway.wait(GUARD)
        # The upstream is in the middle of its answer, the gate in the middle of the exchange: health answers.
        health = world.call("GET", "/_aegis/health")
        assert health.status == 200 and health.json()["status"] == "ok", health.text()
        health_answered.set()
        received, ended = read_to_end(world, sock)
    up.finish()
    assert sent and sent[0] < _BUDGET, "the gate read the whole endless trailer: nothing bounded it"
    assert world.call("GET", "/_aegis/health").status == 200  # and it answers after, too
    if version == "1.1":
        assert_cut(world, received, ended, "upstream_error")
    else:
        world.assert_refused(parse(received), 502, "upstream_error")
    world.assert_no_leaks()


# -- a TLS answer framed by the close, cut by a bare TCP close -----------------------------------------------


def _to_the_close(end: str) -> Callable[[socket.socket], None]:
    def script(sock: socket.socket) -> None:
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nPART-ONE-")
        sock.sendall(b"PART-TWO")
        if end == "tls-close-notify":
            assert isinstance(sock, ssl.SSLSocket)
            sock.unwrap().close()
        elif end == "tls-bare-close":  # no close_notify: what anyone on the path can send
            assert isinstance(sock, ssl.SSLSocket)
            raw = socket.socket(fileno=sock.detach())
            raw.shutdown(socket.SHUT_RDWR)
            raw.close()
        else:  # plain TCP: the FIN is the end
            sock.shutdown(socket.SHUT_WR)
            sock.close()
    return script


@pytest.mark.parametrize(("end", "version"), [("tls-bare-close", "1.1"), ("tls-bare-close", "1.0"),
                                              ("tls-close-notify", "1.1"), ("tls-close-notify", "1.0"),
                                              ("tcp-fin", "1.1"), ("tcp-fin", "1.0")])
@pytest.mark.parametrize("inspection", ["block", "off"])
def test_an_answer_framed_by_the_close_is_whole_only_at_an_orderly_end(world: GateWorld, end: str, version: str,
                                                                      inspection: str) -> None:
    """Found by a cold review: over TLS, an answer with neither a length nor chunks ended at any end of the
    connection, so a bare TCP close (no TLS close_notify), which an on-path attacker can inject anywhere, made a
    cut answer a complete one for the agent, and its row said allowed. Now over TLS only the close_notify ends it
    (a bare close is `upstream_error`: a cut answer, or a 502 to an HTTP/1.0 agent, which gets it whole); on plain
    TCP the FIN still does."""
    up = RawUpstream(_to_the_close(end), world.pki.server_context() if end.startswith("tls") else None)
    name, agent = service(world, up.entry(), "--body-inspection", inspection)
    received, ended = exchange(world, get(world, agent, f"/{name}/to-the-close", version, close=True))
    up.finish()
    if end != "tls-bare-close":
        reply = parse(received)
        assert (reply.status, reply.body) == (200, b"PART-ONE-PART-TWO"), reply.text()
        row = world.row(reply.request_id)
        assert (row["decision"], row["reason"], row["status"]) == ("allowed", "", 200), row
    elif version == "1.1":
        assert_cut(world, received, ended, "upstream_error")
    else:
        world.assert_refused(parse(received), 502, "upstream_error")
    world.assert_no_leaks()


# -- a cut answer is a reset -----------------------------------------------------------------------------------


@pytest.mark.parametrize("inspection", ["block", "off"], ids=["chunked-to-the-agent", "content-length-to-the-agent"])
def test_a_cut_http_1_1_answer_ends_in_a_reset(world: GateWorld, inspection: str) -> None:
    """Found by a cold review: the docs said an answer the gate has to cut is cut with a reset, but only one framed
    by the close (HTTP/1.0) was; a chunked or Content-Length answer to an HTTP/1.1 agent ended in an orderly close,
    which an agent that ignores the framing takes for the end. Here the upstream closes 70,000 bytes into an answer
    of 100,000: the agent's answer (chunked where redaction is on, the upstream's length where it is off) ends in
    a reset, and its row says `upstream_error`."""
    def short(sock: socket.socket) -> None:
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 100000\r\n\r\n" + b"b" * 70000)
        sock.shutdown(socket.SHUT_WR)

    up = RawUpstream(short)
    name, agent = service(world, up.entry(), "--body-inspection", inspection)
    received, ended = exchange(world, get(world, agent, f"/{name}/short"))
    up.finish()
    framing = b"Content-Length: 100000" if inspection == "off" else b"Transfer-Encoding: chunked"
    assert framing in received.partition(b"\r\n\r\n")[0]
    assert_cut(world, received, ended, "upstream_error")
    world.assert_no_leaks()


# -- the headers a reverse proxy routes on ----------------------------------------------------------------------

ROUTING = [("X-Forwarded-Host", "admin.internal.example"), ("X-Forwarded-Proto", "http"),
           ("X-Forwarded-Port", "8443"), ("X-Forwarded-Server", "backend-2"), ("X-Forwarded-Scheme", "http"),
           ("X-Forwarded-Ssl", "off"), ("X-Forwarded-Prefix", "/admin"),
           ("Forwarded", "host=admin.internal.example;proto=http"), ("X-Host", "admin.internal.example"),
           ("X-Original-Host", "admin.internal.example"), ("X-HTTP-Host-Override", "admin.internal.example"),
           ("Front-End-Https", "off"), ("X-Url-Scheme", "http"), ("X-Forwarded-Uri", "/admin"),
           ("X-Original-URI", "/admin"),
           # who the client is, which an upstream behind a load balancer may trust for access control
           ("X-Forwarded-For", "10.0.0.1"), ("X-Real-IP", "10.0.0.1"), ("X-Client-IP", "10.0.0.1"),
           ("True-Client-IP", "10.0.0.1"), ("X-Cluster-Client-IP", "10.0.0.1"), ("Client-IP", "10.0.0.1"),
           ("X-Original-Forwarded-For", "10.0.0.1"), ("Forwarded-For", "10.0.0.1"), ("X-Forwarded", "for=10.0.0.1"),
           ("CF-Connecting-IP", "10.0.0.1"), ("Fastly-Client-IP", "10.0.0.1"), ("X-Originating-IP", "10.0.0.1"),
           ("X-Remote-IP", "10.0.0.1"), ("X-Remote-Addr", "10.0.0.1"), ("X-ProxyUser-Ip", "10.0.0.1"),
           ("X-Envoy-External-Address", "10.0.0.1"),
           # as CGI-style servers read them: HTTP_X_FORWARDED_HOST
           ("X_Forwarded_Host", "cgi.internal.example"), ("x.forwarded.proto", "http"), ("X-Forwarded_Server", "b3")]


def test_the_headers_a_reverse_proxy_routes_on_never_reach_the_upstream(world: GateWorld) -> None:
    """Suggested by a cold review: a reverse proxy in front of an allowlisted upstream (or its framework) that routes
    on `X-Forwarded-Host` and its kin would take the request, and the credential in it, to another backend than
    the host the allowlist judged. Only a proxy may say those things, and the gate is the agent's proxy: the
    agent's are dropped, as its Host is. The 27th stop added the client's address (`X-Forwarded-For` and its kin,
    which an upstream may trust for access control) and `X-Forwarded-Uri`; a header the gate has no reason to
    drop still passes."""
    up = world.upstream()
    name, agent = service(world, up.entry())
    reply = world.call("GET", f"/{name}/echo/routing", [*ROUTING, ("X-Request-Source", "203.0.113.7")], agent=agent)
    assert reply.status == 200, reply.text()
    (seen,) = up.requests_to("/echo/routing")
    assert seen.header("Host") == [f"127.0.0.1:{up.port}"]
    arrived = {cgi_name(header) for header in seen.header_names}
    assert not arrived & {cgi_name(header) for header, _ in ROUTING}, seen.header_names
    assert seen.header("X-Request-Source") == ["203.0.113.7"]
    row = world.row(reply.request_id)
    assert (row["decision"], row["reason"], row["status"]) == ("allowed", "", 200), row
    world.assert_no_leaks()
