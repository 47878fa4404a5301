"""An upstream that stops reading a streamed request body is silent: `read_timeout` ends the exchange, not
`total_timeout`. An agent slow to send its body is still the agent's fault, not the upstream's.

A real daemon with `read_timeout = 1` and `total_timeout = 60`, and a real upstream on a socket that reads
the request head and then nothing. The margin is wide: the test asserts only that the answer came well before
`total_timeout`, never how close to `read_timeout` it came."""

from __future__ import annotations

import contextlib
import select
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from tests.e2e.gate_support import GateWorld, Reply, read_reply
from tests.upstreams import accepted

READ_TIMEOUT = 1
TOTAL_TIMEOUT = 60
WELL_BEFORE_TOTAL = 30.0  # no answer by then is as good as the total timeout's
UPLOAD = 32 * 1024 * 1024  # more than the loopback socket buffers between the agent and the upstream hold
SLOW_SECRET = "sk-stall-secret-K1K2K3K4"
FINE_SECRET = "sk-fine-secret-F1F2F3F4"


class HeadOnlyUpstream:
    """Accepts connections, reads each request's head, then reads nothing more until resumed."""

    def __init__(self) -> None:
        self._server = socket.socket()
        # Set before listen, so accepted sockets inherit a small receive window: the body backs up sooner.
        self._server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self._server.bind(("127.0.0.1", 0))
        self._server.listen()
        self.port = int(self._server.getsockname()[1])
        self.heads: list[bytes] = []
        self.closed = threading.Event()  # after `resume`: the gate had closed a connection it sent a head on
        self._resume = threading.Event()
        threading.Thread(target=self._accept, name="head-only-upstream", daemon=True).start()

    def entry(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def resume(self) -> None:
        """Read again, to the end of what the gate sent."""
        self._resume.set()

    def stop(self) -> None:
        self._resume.set()
        self._server.close()

    def _accept(self) -> None:
        for conn in accepted(self._server):
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            buffer = b""
            while b"\r\n\r\n" not in buffer:
                data = conn.recv(1)  # byte by byte: not one byte of the body is taken off the socket
                if not data:
                    return
                buffer += data
            self.heads.append(buffer.split(b"\r\n", 1)[0])
            # The body stays unread until `resume`; then what the gate sent is read to its end, which is the
            # gate's close: its FIN waits behind the body it had written, so it shows only once that is read.
            self._resume.wait()
            conn.settimeout(10)
            try:
                while conn.recv(65536):
                    pass
            except ConnectionResetError:
                pass  # a reset is a close too
            except TimeoutError:
                return  # still open
            self.closed.set()


@pytest.fixture(scope="module")
def stall() -> Iterator[tuple[GateWorld, HeadOnlyUpstream]]:
    world = GateWorld.start(read_timeout=READ_TIMEOUT, total_timeout=TOTAL_TIMEOUT, max_body_bytes=2 * UPLOAD,
                            agent_max_concurrency=1)
    upstream = HeadOnlyUpstream()
    try:
        world.credential("stall", SLOW_SECRET, upstream.entry(), "--body-inspection", "off")
        world.credential("fine", FINE_SECRET, world.upstream().entry(), "--body-inspection", "off")
        world.agent("bot", "stall", "fine")
        world.agent("typist", "fine")
        yield world, upstream
    finally:
        upstream.stop()
        world.close()


def _upload(world: GateWorld, agent: str, path: str, body: bytes, *, declared: int) -> tuple[Reply | None, float]:
    """Send a head declaring `declared` bytes, then as much of `body` as the gate takes, until an answer
    comes or the gate closes the connection (or WELL_BEFORE_TOTAL passes); the answer (None for a close with
    none), and how long it took."""
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{world.port}\r\nX-Aegis-Agent: {world.tokens[agent]}\r\n"
            f"Content-Length: {declared}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", world.port)) as sock:
        sock.sendall(head)
        sock.setblocking(False)
        started, sent = time.monotonic(), 0
        while True:
            waited = time.monotonic() - started
            assert waited < WELL_BEFORE_TOTAL, f"no answer after {waited:.0f} s (sent {sent} body bytes)"
            readable, writable, _ = select.select([sock], [sock] if sent < len(body) else [], [], 0.2)
            if readable:
                break
            if writable:
                with contextlib.suppress(BlockingIOError):
                    sent += sock.send(body[sent:sent + 65536])
        took = time.monotonic() - started
        sock.settimeout(30)
        try:
            if not sock.recv(1, socket.MSG_PEEK):
                return None, took
        except ConnectionResetError:
            return None, took
        reply = read_reply(sock)
    world.received.append(reply.text())
    return reply, took


def test_an_upstream_that_stops_reading_the_body_times_out_after_read_timeout(
        stall: tuple[GateWorld, HeadOnlyUpstream]) -> None:
    world, upstream = stall
    reply, took = _upload(world, "bot", "/stall/upload", b"x" * UPLOAD, declared=UPLOAD)
    assert took < WELL_BEFORE_TOTAL  # the read timeout's doing: the total timeout is 60 s
    assert reply is not None, "the gate closed the agent's connection without an answer"
    row = world.assert_refused(reply, 504, "upstream_timeout", credential="stall", method="POST", path="/upload")
    assert 0 < row["bytes_in"] < UPLOAD  # part of the body went out before the upstream stopped taking it
    assert upstream.heads == [b"POST /upload HTTP/1.1"]
    upstream.resume()
    assert upstream.closed.wait(20), "the gate kept the upstream connection open"
    # The agent's one concurrency slot is free again: its next request goes through.
    after = world.call("GET", "/fine/echo/after", agent="bot")
    assert after.status == 200, after.text()
    assert after.json()["path"] == "/echo/after"
    world.assert_no_leaks()


def test_an_agent_slow_to_send_its_body_is_not_the_upstream_s_fault(
        stall: tuple[GateWorld, HeadOnlyUpstream]) -> None:
    """The upstream reads all it is sent; the agent sends part of its body and then nothing: the agent side's
    read timeout ends its connection (no answer: it keeps the gate waiting), and the row blames the body, not
    the upstream."""
    world, _ = stall
    reply, took = _upload(world, "typist", "/fine/echo/slow-agent", b"y" * (256 * 1024), declared=UPLOAD)
    assert took < WELL_BEFORE_TOTAL
    assert reply is None, reply.text()
    rows = [row for row in world.ledger() if row["path"] == "/echo/slow-agent"]
    assert [(r["decision"], r["reason"], r["status"], r["credential"]) for r in rows] == [
        ("denied", "bad_request", 400, "fine")], rows
    after = world.call("GET", "/fine/echo/after-slow", agent="typist")
    assert after.status == 200, after.text()
    world.assert_no_leaks()
