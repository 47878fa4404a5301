"""A body framed as thousands of 1-byte chunks, from an agent or from an upstream, is passed on in pieces as large
as what arrived together, not byte by byte.

Found by a cold review at the 28th stop: each chunk was taken, redacted, framed and written on its own with no
turn for the event loop in between. 3 million 1-byte chunks from an upstream stalled every agent and the health
page for 41 s (57 s of CPU); 1 million from an agent, streamed to an `off` credential, for 6-8 s. What these tests
can see without timing anything is the re-framing: the far side got each byte as a chunk of its own.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httptools

from tests.e2e.gate_support import GateWorld
from tests.upstreams import accepted

CHUNKS = 20_000  # 1-byte chunks; what arrives in one read of the gate is passed on as one piece


class ChunkCounter:
    """httptools callbacks: the body and how many chunks it came in."""

    def __init__(self) -> None:
        self.body, self.chunks, self.done = bytearray(), 0, False

    def on_chunk_header(self) -> None:
        self.chunks += 1

    def on_body(self, data: bytes) -> None:
        self.body += data

    def on_message_complete(self) -> None:
        self.done = True


def tiny_chunks(count: int) -> bytes:
    return b"1\r\nx\r\n" * count + b"0\r\n\r\n"


def read_message(sock: socket.socket, parser_type: type) -> ChunkCounter:
    counter = ChunkCounter()
    parser = parser_type(counter)
    while not counter.done and (data := sock.recv(65536)):
        parser.feed_data(data)
    assert counter.done, "the message never ended"
    return counter


class ChunkingUpstream:
    """Counts the chunks of each request body it gets, then answers with CHUNKS 1-byte chunks."""

    def __init__(self) -> None:
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._server.getsockname()[1])
        self.requests: list[ChunkCounter] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        for conn in accepted(self._server):
            with conn:
                conn.settimeout(30)
                self.requests.append(read_message(conn, httptools.HttpRequestParser))
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n"
                             b"Connection: close\r\n\r\n" + tiny_chunks(CHUNKS))

    def stop(self) -> None:
        self._server.close()


@contextmanager
def chunking_world() -> Iterator[tuple[GateWorld, ChunkingUpstream, str]]:
    world = GateWorld.start()
    upstream = ChunkingUpstream()
    try:
        entry = f"http://127.0.0.1:{upstream.port}"
        world.credential("redacted", "sk-redacted-0123456789abcdef", entry)
        world.credential("plain", "sk-plain-0123456789abcdef", entry, "--body-inspection", "off")
        yield world, upstream, world.agent("bot", "redacted", "plain")
    finally:
        upstream.stop()
        world.close()


def test_an_answer_in_tiny_chunks_reaches_the_agent_in_large_ones() -> None:
    with chunking_world() as (world, _, token):
        for service in ("redacted", "plain"):  # answer redaction on, and off
            with socket.create_connection(("127.0.0.1", world.port), timeout=60) as agent:
                agent.sendall(f"GET /{service}/tiny HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Aegis-Agent: {token}\r\n"
                              "Connection: close\r\n\r\n".encode())
                answer = read_message(agent, httptools.HttpResponseParser)
            assert bytes(answer.body) == b"x" * CHUNKS, service
            assert answer.chunks <= CHUNKS // 20, (service, answer.chunks)
        world.assert_no_leaks()


def test_a_request_body_in_tiny_chunks_reaches_the_upstream_in_large_ones() -> None:
    with chunking_world() as (world, upstream, token):
        with socket.create_connection(("127.0.0.1", world.port), timeout=60) as agent:
            agent.sendall(f"POST /plain/upload HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Aegis-Agent: {token}\r\n"
                          "Content-Type: text/plain\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                          .encode() + tiny_chunks(CHUNKS))
            answer = read_message(agent, httptools.HttpResponseParser)
        assert bytes(answer.body) == b"x" * CHUNKS
        (received,) = upstream.requests  # streamed as it came (inspection off), chunked
        assert bytes(received.body) == b"x" * CHUNKS
        assert 1 <= received.chunks <= CHUNKS // 20, received.chunks
        world.assert_no_leaks()


def test_a_small_answer_trickled_a_byte_at_a_time_is_read_whole() -> None:
    """From the review of the change above: a small answer (a declared length, read whole) that arrived in
    thousands of 1-byte reads passed the high-water mark (each held piece counts its overhead) and paused the
    upstream socket, which nothing resumed until the body was complete: it hung until total_timeout, then 504."""
    size = 8000  # pieces: 8000 * (1 + 64) bytes counted, twice the 256 KiB mark
    server = socket.create_server(("127.0.0.1", 0))

    def trickle() -> None:
        for conn in accepted(server):
            with conn:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                conn.sendall(f"HTTP/1.1 200 OK\r\nContent-Length: {size}\r\nConnection: close\r\n\r\n".encode())
                for _ in range(size):
                    conn.send(b"x")
                    time.sleep(0.0002)  # so each byte is a read of its own at the gate

    threading.Thread(target=trickle, daemon=True).start()
    world = GateWorld.start(read_timeout=5, total_timeout=20)
    try:
        world.credential("slow", "sk-slow-0123456789abcdef", f"http://127.0.0.1:{server.getsockname()[1]}")
        world.agent("bot", "slow")
        reply = world.call("GET", "/slow/answer", agent="bot")
        assert (reply.status, reply.body) == (200, b"x" * size), reply.text()[:200]
        world.assert_no_leaks()
    finally:
        server.close()
        world.close()
