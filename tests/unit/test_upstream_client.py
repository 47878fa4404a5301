"""The gate's upstream client (aegisd/gate/upstream.py) against real local servers, byte for byte.

Through the whole gate, aiohttp's server and the pipeline hide most of what the client does on the wire.
Here the pool is driven directly against a raw asyncio server written in this file, so a test chooses
the exact bytes the upstream sends (interim answers, close-delimited bodies, garbage, trickles, drops)
and sees the exact bytes and connections the client makes. Every test runs on the stock asyncio loop
and on uvloop, which the daemon runs on: the two differ in how transports pause, read and close.

Timeouts are sub-second and nothing asserts a duration: a test that hangs fails on its guard instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from multidict import CIMultiDict

from aegisd.config import load_config
from aegisd.gate import upstream as upstream_module
from aegisd.gate.upstream import (
    MAX_HEADER_BYTES,
    UpstreamBroken,
    UpstreamError,
    UpstreamPool,
    UpstreamResponse,
    UpstreamTimeout,
    UpstreamTLSError,
)
from tests.unit.event_loops import Run, eventually
from tests.upstreams import Upstream, make_pki, pattern

# -- the raw upstream -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """One request as the raw server read it off the wire."""

    line: str
    headers: CIMultiDict[str]
    body: bytes
    raw: bytes  # every byte of it, head and body as sent (chunk framing included)


class Peer:
    """One connection the raw server accepted: everything that arrived on it, and a way to answer."""

    def __init__(self, index: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.index = index  # 0 for the first connection accepted, 1 for the next...
        self.reader = reader
        self.writer = writer
        self.received = bytearray()
        self.requests: list[Request] = []
        self.eof = asyncio.Event()  # the client closed (or reset) its side

    def write(self, data: bytes | memoryview) -> None:
        self.writer.write(data)

    async def read_request(self) -> Request | None:
        """The next whole request, or None when the client closed the connection instead."""
        start = len(self.received)
        try:
            head = await self._read(self.reader.readuntil(b"\r\n\r\n"))
        except (asyncio.IncompleteReadError, ConnectionError):
            self.eof.set()
            return None
        line, *fields = head.decode("latin-1").split("\r\n")[:-2]
        headers: CIMultiDict[str] = CIMultiDict()
        for field in fields:
            name, _, value = field.partition(":")
            headers.add(name, value.strip())
        if "chunked" in headers.get("Transfer-Encoding", ""):
            body = b""
            while size := int((await self._read(self.reader.readuntil(b"\r\n"))).strip(), 16):
                body += (await self._read(self.reader.readexactly(size + 2)))[:-2]
            while await self._read(self.reader.readuntil(b"\r\n")) != b"\r\n":  # trailer fields
                pass
        else:
            body = await self._read(self.reader.readexactly(int(headers.get("Content-Length", "0"))))
        request = Request(line, headers, body, bytes(self.received[start:]))
        self.requests.append(request)
        return request

    async def until_eof(self) -> None:
        """Keep the connection open, recording whatever arrives, until the client closes it."""
        with contextlib.suppress(ConnectionError):
            while data := await self.reader.read(65536):
                self.received += data
        self.eof.set()

    def drop(self, how: str) -> None:
        """Close the connection without a word: an orderly FIN, or a RST."""
        if how == "rst":
            sock = self.writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.writer.transport.abort()
        else:
            self.writer.close()

    async def _read(self, reading: Awaitable[bytes]) -> bytes:
        data = await reading
        self.received += data
        return data


Handler = Callable[[Peer], Awaitable[None]]


class RawServer:
    """An asyncio TCP server on 127.0.0.1 whose handler writes exactly the bytes a test wants."""

    def __init__(self, handler: Handler) -> None:
        self._handler = handler
        self.peers: list[Peer] = []
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._errors: list[BaseException] = []

    async def __aenter__(self) -> RawServer:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._errors and exc[0] is None:
            raise self._errors[0]  # a failed assertion or read inside a handler fails the test

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        peer = Peer(len(self.peers), reader, writer)
        self.peers.append(peer)
        try:
            await self._handler(peer)
        except asyncio.CancelledError:
            return  # the test is over; a cancelled task would make asyncio's stream callback log an error
        except Exception as exc:
            self._errors.append(exc)
        finally:
            writer.close()


def ok(body: bytes = b"ok", *fields: str) -> bytes:
    """A complete keep-alive 200 answer with a Content-Length."""
    extra = "".join(f"{field}\r\n" for field in fields)
    return f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body


async def keep_alive(peer: Peer) -> None:
    """A well-behaved upstream: answer `answer N` to the Nth request on this connection, until EOF."""
    while await peer.read_request() is not None:
        peer.write(ok(f"answer {len(peer.requests)}".encode()))


# -- the client side ------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def new_pool(read_timeout: float | None = None, total_timeout: float | None = None
                   ) -> AsyncIterator[UpstreamPool]:
    """A pool with the daemon's configuration, built the way the daemon builds it (inside the loop)."""
    config = load_config({"read_timeout": read_timeout, "total_timeout": total_timeout}, env={})
    pool = UpstreamPool(connect_timeout=config.connect_timeout, read_timeout=config.read_timeout,
                        total_timeout=config.total_timeout)
    try:
        yield pool
    finally:
        await pool.close()


async def send(pool: UpstreamPool, port: int, method: str = "GET", target: str = "/",
               body: bytes | AsyncIterator[bytes] | None = None,
               headers: dict[str, str] | None = None, credential: str = "cred-a") -> UpstreamResponse:
    fields: CIMultiDict[str] = CIMultiDict({"Host": f"127.0.0.1:{port}", **(headers or {})})
    return await pool.request(method, "http", "127.0.0.1", port, target, fields, body, allow_internal=True,
                              credential=credential)


async def fetch(pool: UpstreamPool, port: int, method: str = "GET", target: str = "/",
                body: bytes | AsyncIterator[bytes] | None = None,
                headers: dict[str, str] | None = None, credential: str = "cred-a") -> tuple[int, bytes]:
    response = await send(pool, port, method, target, body, headers, credential)
    try:
        return response.status, await response.read()
    finally:
        response.release()


async def pieces(*parts: bytes) -> AsyncIterator[bytes]:
    """A request body as the pipeline streams one: an async iterator of chunks."""
    for part in parts:
        await asyncio.sleep(0)
        yield part


# -- connection reuse -----------------------------------------------------------------------------


def test_sequential_requests_share_one_connection(run: Run) -> None:
    async def main() -> None:
        async with RawServer(keep_alive) as server, new_pool() as pool:
            assert await fetch(pool, server.port) == (200, b"answer 1")
            assert await fetch(pool, server.port, target="/second?x=1") == (200, b"answer 2")
            assert len(server.peers) == 1
            assert [r.line for r in server.peers[0].requests] == ["GET / HTTP/1.1", "GET /second?x=1 HTTP/1.1"]

    run(main())


def test_a_connection_never_carries_another_credential_s_request(run: Run) -> None:
    """Found by a cold review: the pool key was (scheme, host, port, allow_internal), so a connection that
    carried one credential's request was reused for another's, and a desync on it (an upstream ignoring a GET's
    Content-Length) could prefix that request, its credential included, with bytes the first agent chose."""
    async def main() -> None:
        async with RawServer(keep_alive) as server, new_pool() as pool:
            for credential in ("cred-a", "cred-b", "cred-a", "cred-b"):
                assert (await fetch(pool, server.port, target=f"/{credential}", credential=credential))[0] == 200
            assert [[r.line for r in peer.requests] for peer in server.peers] == [
                ["GET /cred-a HTTP/1.1", "GET /cred-a HTTP/1.1"], ["GET /cred-b HTTP/1.1", "GET /cred-b HTTP/1.1"]]

    run(main())


@pytest.mark.parametrize(("method", "streamed"), [("GET", False), ("HEAD", False), ("OPTIONS", False),
                                                  ("DELETE", False), ("GET", True)])
def test_a_connection_that_carried_a_body_where_none_is_expected_is_not_reused(run: Run, method: str,
                                                                               streamed: bool) -> None:
    """An upstream that ignores the Content-Length of a GET (CL.0) reads its body as the next request's start:
    the connection is closed after the answer rather than pooled. A POST's body is expected: reused."""
    async def main() -> None:
        async with RawServer(keep_alive) as server, new_pool() as pool:
            body = pieces(b"GET /smuggled HTTP/1.1\r\nX: ") if streamed else b"GET /smuggled HTTP/1.1\r\nX: "
            response = await send(pool, server.port, method, "/first", body=body)
            await response.read()
            response.release()
            assert await fetch(pool, server.port, target="/second") == (200, b"answer 1")
            assert await fetch(pool, server.port, "POST", "/third", body=b"a=1") == (200, b"answer 2")
            assert await fetch(pool, server.port, target="/fourth") == (200, b"answer 3")
            assert [[r.line for r in peer.requests] for peer in server.peers] == [
                [f"{method} /first HTTP/1.1"], ["GET /second HTTP/1.1", "POST /third HTTP/1.1", "GET /fourth HTTP/1.1"]]
            await server.peers[0].eof.wait()

    run(main())


def test_the_answer_s_status_reason_and_headers_are_as_sent(run: Run) -> None:
    async def handler(peer: Peer) -> None:
        await peer.read_request()
        peer.write(b"HTTP/1.1 201 Made It\r\nContent-Length: 2\r\nSet-Cookie: a=1\r\nset-cookie: b=2\r\n"
                   b"X-Odd: caf\xc3\xa9\r\n\r\nhi")
        await peer.until_eof()

    async def main() -> None:
        async with RawServer(handler) as server, new_pool() as pool:
            response = await send(pool, server.port)
            try:
                assert (response.status, response.reason, response.content_length) == (201, "Made It", 2)
                assert response.headers.getall("Set-Cookie") == ["a=1", "b=2"]
                assert response.headers["x-odd"] == "café"
                assert await response.read() == b"hi"
            finally:
                response.release()

    run(main())


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
], ids=["connection-close", "http-1.0"])
def test_an_answer_that_ends_the_connection_is_followed_by_a_new_one(run: Run, answer: bytes) -> None:
    async def handler(peer: Peer) -> None:
        if await peer.read_request() is not None:
            peer.write(answer)
            await peer.until_eof()  # the upstream leaves its side open: the client must close on its own

    async def main() -> None:
        async with RawServer(handler) as server, new_pool() as pool:
            assert await fetch(pool, server.port) == (200, b"ok")
            await server.peers[0].eof.wait()
            assert await fetch(pool, server.port) == (200, b"ok")
            assert len(server.peers) == 2
            assert [len(peer.requests) for peer in server.peers] == [1, 1]

    run(main())


def test_a_connection_the_upstream_closed_while_idle_is_not_an_error(run: Run) -> None:
    """Whether or not the client has seen the FIN when it reuses the connection, a GET gets its answer."""
    async def handler(peer: Peer) -> None:
        if await peer.read_request() is not None:
            peer.write(ok(f"from {peer.index}".encode()))

    async def main() -> None:
        async with RawServer(handler) as server, new_pool() as pool:
            assert await fetch(pool, server.port) == (200, b"from 0")
            assert await fetch(pool, server.port) == (200, b"from 1")
            assert len(server.peers) == 2

    run(main())


@pytest.mark.parametrize("how", ["fin", "rst"])
def test_a_get_on_a_reused_connection_that_is_dropped_is_retried_once_on_a_fresh_one(run: Run, how: str) -> None:
    async def handler(peer: Peer) -> None:
        if peer.index == 0:
            await peer.read_request()
            peer.write(ok(b"first"))
            await peer.read_request()  # the reused connection: the upstream drops it instead of answering
            peer.drop(how)
            return
        await keep_alive(peer)

    async def main() -> None:
        async with RawServer(handler) as server, new_pool() as pool:
            assert await fetch(pool, server.port) == (200, b"first")
            assert await fetch(pool, server.port, target="/again") == (200, b"answer 1")
            assert len(server.peers) == 2
            assert [r.line for r in server.peers[0].requests] == ["GET / HTTP/1.1", "GET /again HTTP/1.1"]
            assert [r.line for r in server.peers[1].requests] == ["GET /again HTTP/1.1"]

    run(main())


@pytest.mark.parametrize("method, streamed", [("POST", False), ("PUT", True)], ids=["post-bytes", "put-streamed"])
def test_a_request_whose_body_cannot_be_resent_is_not_retried(run: Run, method: str, streamed: bool) -> None:
    """POST is not idempotent; a streamed body is gone once sent, whatever the method."""
    async def handler(peer: Peer) -> None:
        if peer.index == 0:
            await peer.read_request()
            peer.write(ok(b"first"))
            await peer.read_request()
            peer.drop("fin")
            return
        await keep_alive(peer)

    async def main() -> None:
        async with RawServer(handler) as server, new_pool() as pool:
            assert await fetch(pool, server.port) == (200, b"first")
            body = pieces(b'{"a":', b"1}") if streamed else b'{"a":1}'
            with pytest.raises(UpstreamBroken):
                await send(pool, server.port, method, body=body)
            assert len(server.peers) == 1
            assert server.peers[0].requests[1].body == b'{"a":1}'

    run(main())


def test_a_reused_connection_that_fails_after_part_of_an_answer_is_not_retried(run: Run) -> None:
    async def handler(peer: Peer) -> None:
        if peer.index == 0:
            await peer.read_request()
            peer.write(ok(b"first"))
            await peer.read_request()
            peer.write(b"HTTP/1.1 200 OK\r\nContent-Le")
            await peer.writer.drain()
            peer.drop("fin")
            return
        await keep_alive(peer)

    async def main() -> None:
        async with RawServer(handler) as server, new_pool() as pool:
            assert await fetch(pool, server.port) == (200, b"first")
            with pytest.raises(UpstreamBroken):
                await send(pool, server.port)
            assert len(server.peers) == 1

    run(main())


def test_the_retry_happens_once(run: Run) -> None:
    async def handler(peer: Peer) -> None:
        if peer.index == 0:
            await peer.read_request()
            peer.write(ok(b"first"))
        await peer.read_request()
        peer.drop("fin")

    async def main() -> None:
        async with RawServer(handler) as server, new_pool() as pool:
            assert await fetch(pool, server.port) == (200, b"first")
            with pytest.raises(UpstreamBroken):
                await send(pool, server.port)
            assert len(server.peers) == 2

    run(main())


def test_a_fresh_connection_closed_without_an_answer_is_an_error_and_not_retried(run: Run) -> None:
    async def handler(peer: Peer) -> None:
        await peer.read_request()
        peer.drop("fin")

    async def main() -> None:
        async with RawServer(handler) as server, new_pool() as pool:
            with pytest.raises(UpstreamBroken) as failed:
                await send(pool, server.port)
            assert (failed.value.status, failed.value.code) == (502, "upstream_error")
            assert len(server.peers) == 1

    run(main())


def test_a_connection_idle_too_long_is_not_reused(run: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(upstream_module, "_IDLE_SECONDS", 0.0)

    async def main() -> None:
        async with RawServer(keep_alive) as server, new_pool() as pool:
            assert await fetch(pool, server.port) == (200, b"answer 1")
            assert await fetch(pool, server.port) == (200, b"answer 1")
            assert len(server.peers) == 2
            await server.peers[0].eof.wait()

    run(main())


def test_idle_connections_in_all_pools_together_are_bounded(run: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by a cold review at the 27th stop: only each pool's idle connections were bounded, and under a `*.`
    allowlist entry an agent names the host, so each request could leave a socket behind in a pool of its own
    until aegisd ran out of file descriptors. The idle ones are bounded in all now, the least recently used
    closed first. (Pools told apart here by credential, the other part of a pool's key.)"""
    monkeypatch.setattr(upstream_module, "_MAX_IDLE", 3)

    async def main() -> None:
        async with RawServer(keep_alive) as server, new_pool() as pool:
            for n in range(6):
                assert await fetch(pool, server.port, credential=f"cred-{n}") == (200, b"answer 1")
            for peer in server.peers[:3]:
                await asyncio.wait_for(peer.eof.wait(), 5)  # the three parked first were closed
            await asyncio.sleep(0.05)
            assert [peer.eof.is_set() for peer in server.peers[3:]] == [False] * 3
            assert await fetch(pool, server.port, credential="cred-5") == (200, b"answer 2")  # reused, not closed

    run(main())


def test_an_idle_connection_is_closed_in_time_with_no_further_traffic(run: Run,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by the same review: idle connections were swept only when another one was parked, so after a burst
    every socket stayed open until traffic came again."""
    monkeypatch.setattr(upstream_module, "_IDLE_SECONDS", 0.05)

    async def main() -> None:
        async with RawServer(keep_alive) as server, new_pool() as pool:
            assert await fetch(pool, server.port) == (200, b"answer 1")
            await asyncio.wait_for(server.peers[0].eof.wait(), 5)

    run(main())


def test_closing_the_pool_closes_its_idle_connections(run: Run) -> None:
    async def main() -> None:
        async with RawServer(keep_alive) as server:
            async with new_pool() as pool:
                assert await fetch(pool, server.port) == (200, b"answer 1")
                await asyncio.sleep(0)
                assert not server.peers[0].eof.is_set()
            await server.peers[0].eof.wait()

    run(main())


@pytest.mark.parametrize("where", ["fresh", "pooled"])
def test_a_request_abandoned_while_waiting_for_its_answer_closes_the_connection(run: Run, where: str) -> None:
    """The agent hung up: the exchange is cancelled, and its connection may carry no other answer."""
    sent = 2 if where == "pooled" else 1

    async def handler(peer: Peer) -> None:
        if peer.index == 0:
            if where == "pooled":
                await peer.read_request()
                peer.write(ok(b"first"))
            await peer.read_request()
            await peer.until_eof()
            return
        await keep_alive(peer)

    async def main() -> None:
        async with RawServer(handler) as server, new_pool() as pool:
            if where == "pooled":
                assert await fetch(pool, server.port) == (200, b"first")
            waiting = asyncio.create_task(send(pool, server.port))
            await eventually(lambda: bool(server.peers and len(server.peers[0].requests) == sent),
                             "the request arrived")
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            await server.peers[0].eof.wait()
            assert await fetch(pool, server.port) == (200, b"answer 1")
            assert len(server.peers) == 2

    run(main())


@pytest.mark.parametrize("taken", [0, 1])
def test_an_answer_released_before_its_end_is_not_pooled(run: Run, taken: int) -> None:
    async def handler(peer: Peer) -> None:
        if peer.index == 0:
            await peer.read_request()
            peer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + pattern(100_000))
            await peer.until_eof()
            return
        await keep_alive(peer)

    async def main() -> None:
        async with RawServer(handler) as server, new_pool() as pool:
            response = await send(pool, server.port)
            if taken:
                async for _ in response.chunks():
                    break
            response.release()
            await server.peers[0].eof.wait()
            assert await fetch(pool, server.port) == (200, b"answer 1")
            assert len(server.peers) == 2

    run(main())


@pytest.mark.parametrize("head", [
    b"HTTP/1.1 204 No Content\r\n\r\n",
    b"HTTP/1.1 304 Not Modified\r\nContent-Length: 1234\r\nETag: \"v1\"\r\n\r\n",
], ids=["204", "304"])
def test_an_answer_that_has_no_body_by_its_status_keeps_the_connection(run: Run, head: bytes) -> None:
    async def handler(peer: Peer) -> None:
        await peer.read_request()
        peer.write(head)
        await keep_alive(peer)

    async def main() -> None:
        async with RawServer(handler) as server, new_pool() as pool:
            status, body = await fetch(pool, server.port)
            assert (status, body) == (int(head[9:12]), b"")
            assert await fetch(pool, server.port) == (200, b"answer 2")
            assert len(server.peers) == 1

    run(main())


# -- what the upstream sends ----------------------------------------------------------------------


@pytest.mark.parametrize("interim", [
    b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n",
    b"HTTP/1.1 100 Continue\r\n\r\n",
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a.js>; rel=preload\r\n\r\n",
], ids=["103", "100", "100-then-103"])
def test_an_interim_answer_is_skipped_for_the_final_one(run: Run, interim: bytes) -> None:
    async def handler(peer: Peer) -> None:
        await peer.read_request()
        peer.write(interim)
        await peer.writer.drain()
        peer.write(ok(b"final", "X-Final: yes"))
        await keep_alive(peer)

    async def main() -> None:
        async with RawServer(handler) as server, new_pool() as pool:
            response = await send(pool, server.port)
            try:
                assert (response.status, response.reason, response.content_length) == (200, "OK", 5)
                assert response.headers["X-Final"] == "yes"
                assert "Link" not in response.headers
                assert await response.read() == b"final"
            finally:
                response.release()
            assert await fetch(pool, server.port) == (200, b"answer 2")  # the parser starts clean
            assert len(server.peers) == 1

    run(main())


@pytest.mark.parametrize("reader", ["read", "chunks"])
def test_a_close_delimited_body_is_read_to_the_end_of_the_connection(run: Run, reader: str) -> None:
    async def handler(peer: Peer) -> None:
        if peer.index > 0:
            await keep_alive(peer)
            return
        await peer.read_request()
        peer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nfirst part, ")
        await peer.writer.drain()
        await asyncio.sleep(0.01)
        peer.write(b"second part")
        await peer.writer.drain()
        peer.drop("fin")

    async def main() -> None:
        async with RawServer(handler) as server, new_pool() as pool:
            response = await send(pool, server.port)
            try:
                assert response.content_length is None
                if reader == "read":
                    body = await response.read()
                else:
                    body = b"".join([chunk async for chunk in response.chunks()])
                assert body == b"first part, second part"
            finally:
                response.release()
            assert await fetch(pool, server.port) == (200, b"answer 1")
            assert len(server.peers) == 2

    run(main())


@pytest.mark.parametrize("framing", ["Content-Length: 1234", "Transfer-Encoding: chunked"])
def test_a_head_answer_ends_at_its_headers(run: Run, framing: str) -> None:
    async def handler(peer: Peer) -> None:
        await peer.read_request()
        peer.write(f"HTTP/1.1 200 OK\r\n{framing}\r\nContent-Type: application/json\r\n\r\n".encode())
        await peer.until_eof()  # and no body ever comes, as HEAD promises

    async def main() -> None:
        async with RawServer(handler) as server, new_pool() as pool:
            response = await send(pool, server.port, "HEAD")
            try:
                assert response.status == 200
                assert response.content_length == (1234 if "Length" in framing else None)
                assert await response.read() == b""
                assert [chunk async for chunk in response.chunks()] == []
            finally:
                response.release()
            request = server.peers[0].requests[0]
            assert request.line == "HEAD / HTTP/1.1"
            assert "Content-Length" not in request.headers
            assert "Transfer-Encoding" not in request.headers

    run(main())


def test_a_chunked_answer_arrives_whole_and_in_order(run: Run) -> None:
    parts = [b"first,", b"second,", pattern(70_000), b"", b"last"]

    async def handler(peer: Peer) -> None:
        await peer.read_request()
        peer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for part in parts:
            if part:
                peer.write(b"%x\r\n%b\r\n" % (len(part), part))
                await peer.writer.drain()
                await asyncio.sleep(0)
        peer.write(b"0\r\nX-Trailer: done\r\n\r\n")
        await keep_alive(peer)

    async def main() -> None:
        async with RawServer(handler) as server, new_pool() as pool:
            response = await send(pool, server.port)
            try:
                assert response.content_length is None
                assert b"".join([chunk async for chunk in response.chunks()]) == b"".join(parts)
            finally:
                response.release()
            assert await fetch(pool, server.port) == (200, b"answer 2")
            assert len(server.peers) == 1

    run(main())


@pytest.mark.parametrize("fields", [
    "".join(f"X-Filler-{i}: {'v' * 1000}\r\n" for i in range(70)),
    f"X-Big: {'v' * (MAX_HEADER_BYTES + 1)}\r\n",
], ids=["many-headers", "one-huge-header"])
def test_response_headers_over_the_limit_are_refused(run: Run, fields: str) -> None:
    async def handler(peer: Peer) -> None:
        await peer.read_request()
        peer.write(f"HTTP/1.1 200 OK\r\n{fields}Content-Length: 2\r\n\r\nok".encode())
        await peer.until_eof()

    async def main() -> None:
        async with RawServer(handler) as server, new_pool() as pool:
            with pytest.raises(UpstreamBroken, match="headers are too large"):
                await send(pool, server.port)
            await server.peers[0].eof.wait()

    run(main())


def test_response_headers_just_under_the_limit_are_accepted(run: Run) -> None:
    fields = "".join(f"X-Filler-{i}: {'v' * 1000}\r\n" for i in range(60))

    async def handler(peer: Peer) -> None:
        await peer.read_request()
        peer.write(f"HTTP/1.1 200 OK\r\n{fields}Content-Length: 2\r\n\r\nok".encode())
        await peer.until_eof()

    async def main() -> None:
        async with RawServer(handler) as server, new_pool() as pool:
            response = await send(pool, server.port)
            try:
                assert len(response.headers) == 61
                assert await response.read() == b"ok"
            finally:
                response.release()

    run(main())


def test_an_endless_response_header_line_is_refused_once_past_the_limit(run: Run) -> None:
    async def handler(peer: Peer) -> None:
        await peer.read_request()
        peer.write(b"HTTP/1.1 200 OK\r\nX-Endless: " + b"v" * (4 * MAX_HEADER_BYTES))
        await peer.until_eof()

    async def main() -> None:
        async with RawServer(handler) as server, new_pool(read_timeout=0.5) as pool:
            with pytest.raises(UpstreamBroken, match="headers are too large"):
                await send(pool, server.port)

    run(main())


@pytest.mark.parametrize("garbage", [
    b"SSH-2.0-OpenSSH_9.6\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(32),
    b"HTTP/1.1 abc Nope\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: nope\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
], ids=["ssh", "tls", "bad-status", "bad-length", "length-and-chunked"])
def test_an_answer_that_is_not_http_is_an_error(run: Run, garbage: bytes) -> None:
    async def handler(peer: Peer) -> None:
        await peer.read_request()
        peer.write(garbage)
        await peer.until_eof()  # the upstream stays open: the client must give up by itself

    async def main() -> None:
        async with RawServer(handler) as server, new_pool() as pool:
            with pytest.raises(UpstreamBroken):
                await send(pool, server.port)
            await server.peers[0].eof.wait()

    run(main())


@pytest.mark.parametrize("extra", [
    pytest.param(ok(b"unasked"), id="second-answer"),
    pytest.param(b"garbage", id="garbage"),
    pytest.param(b"HTTP/1.1 200 OK\r\n", id="start-of-an-answer"),
])
def test_bytes_after_a_complete_answer_in_the_same_write_stop_reuse(run: Run, extra: bytes) -> None:
    async def handler(peer: Peer) -> None:
        if peer.index == 0:
            await peer.read_request()
            peer.write(ok(b"first") + extra)
        await keep_alive(peer)

    async def main() -> None:
        async with RawServer(handler) as server, new_pool() as pool:
            assert await fetch(pool, server.port) == (200, b"first")
            assert (await fetch(pool, server.port))[0] == 200
            assert len(server.peers) == 2

    run(main())


def test_bytes_after_a_complete_answer_while_idle_close_the_connection(run: Run) -> None:
    answered = asyncio.Event()

    async def handler(peer: Peer) -> None:
        if peer.index == 0:
            await peer.read_request()
            peer.write(ok(b"first"))
            await answered.wait()  # the client has the answer and has pooled the connection
            peer.write(ok(b"unasked"))
            await peer.until_eof()
            return
        await keep_alive(peer)

    async def main() -> None:
        async with RawServer(handler) as server, new_pool() as pool:
            assert await fetch(pool, server.port) == (200, b"first")
            answered.set()
            await server.peers[0].eof.wait()
            assert await fetch(pool, server.port) == (200, b"answer 1")
            assert len(server.peers) == 2
            assert len(server.peers[0].requests) == 1

    run(main())


# -- flow control ---------------------------------------------------------------------------------


def large_body_handler(body: bytes) -> Handler:
    async def handler(peer: Peer) -> None:
        await peer.read_request()
        peer.write(f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n\r\n".encode())
        view = memoryview(body)
        for start in range(0, len(body), 256 * 1024):
            peer.write(view[start:start + 256 * 1024])
            await peer.writer.drain()
        await keep_alive(peer)

    return handler


def test_a_large_body_to_a_slow_consumer_pauses_the_upstream_and_arrives_intact(run: Run) -> None:
    body = pattern(8 * 1024 * 1024)

    async def main() -> None:
        async with RawServer(large_body_handler(body)) as server, new_pool() as pool:
            response = await send(pool, server.port)
            try:
                transport = response.transport
                assert transport is not None
                received = bytearray()
                stops = [0, 2 * 1024 * 1024, 4 * 1024 * 1024]  # where the consumer stalls (MiBs still to come)
                async for chunk in response.chunks():
                    received += chunk
                    if stops and len(received) > stops[0]:
                        stops.pop(0)
                        # The consumer stalls: the client must stop reading rather than buffer the rest,
                        # and (as the loop goes on) resume once the consumer takes chunks again.
                        await eventually(lambda: not transport.is_reading(), "the client paused reading")
                    await asyncio.sleep(0)
                assert stops == []
                assert received == body
            finally:
                response.release()
            assert await fetch(pool, server.port) == (200, b"answer 2")
            assert len(server.peers) == 1

    run(main())


def test_a_pause_for_a_slow_consumer_is_not_an_upstream_read_timeout(run: Run) -> None:
    body = pattern(2 * 1024 * 1024)

    async def main() -> None:
        async with RawServer(large_body_handler(body)) as server, new_pool(read_timeout=0.2) as pool:
            response = await send(pool, server.port)
            try:
                transport = response.transport
                assert transport is not None
                chunks = response.chunks()
                received = [await anext(chunks)]
                await eventually(lambda: not transport.is_reading(), "the client paused reading")
                await asyncio.sleep(0.5)  # the consumer is silent for longer than the read timeout
                received += [chunk async for chunk in chunks]
                assert b"".join(received) == body
            finally:
                response.release()

    run(main())


# -- timeouts -------------------------------------------------------------------------------------


def test_an_upstream_that_never_answers_times_out(run: Run) -> None:
    async def handler(peer: Peer) -> None:
        await peer.read_request()
        await peer.until_eof()

    async def main() -> None:
        async with RawServer(handler) as server, new_pool(read_timeout=0.2) as pool:
            with pytest.raises(UpstreamTimeout) as timed_out:
                await send(pool, server.port)
            assert (timed_out.value.status, timed_out.value.code) == (504, "upstream_timeout")
            assert isinstance(timed_out.value, TimeoutError)
            await server.peers[0].eof.wait()  # the connection was given up, not pooled

    run(main())


def test_an_upstream_that_goes_silent_mid_body_times_out(run: Run) -> None:
    async def handler(peer: Peer) -> None:
        await peer.read_request()
        peer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
        await peer.until_eof()

    async def main() -> None:
        async with RawServer(handler) as server, new_pool(read_timeout=0.2) as pool:
            response = await send(pool, server.port)
            received: list[bytes] = []
            try:
                with pytest.raises(UpstreamTimeout):
                    async for chunk in response.chunks():
                        received.append(chunk)
            finally:
                response.release()
            assert b"".join(received) == b"0123456789"
            await server.peers[0].eof.wait()

    run(main())


@pytest.mark.parametrize("stage", ["head", "body"])
def test_an_upstream_that_trickles_forever_hits_the_total_timeout(run: Run, stage: str) -> None:
    """Each byte comes well within the read timeout, so only the total deadline can end the exchange."""
    start, drip = {"head": (b"HTTP/1.1 200 OK\r\nX-Slow: ", b"a"),
                   "body": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", b"1\r\na\r\n")}[stage]

    async def handler(peer: Peer) -> None:
        await peer.read_request()
        closed = asyncio.create_task(peer.until_eof())
        peer.write(start)
        while not closed.done():
            peer.write(drip)
            await asyncio.sleep(0.02)

    async def main() -> None:
        async with RawServer(handler) as server, new_pool(read_timeout=3.0, total_timeout=0.4) as pool:
            with pytest.raises(UpstreamTimeout):
                response = await send(pool, server.port)
                try:
                    async for _ in response.chunks():
                        pass
                finally:
                    response.release()
            await server.peers[0].eof.wait()

    run(main())


@pytest.mark.timeout(10)  # the failure this guards against blocks the loop, so the loop's own guard cannot fire
@pytest.mark.parametrize("reader", ["read", "chunks"])
@pytest.mark.parametrize("cut", ["closed", "silent"])
def test_a_body_cut_short_after_some_bytes_is_an_error(run: Run, reader: str, cut: str) -> None:
    async def handler(peer: Peer) -> None:
        await peer.read_request()
        peer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
        await peer.writer.drain()
        if cut == "closed":
            peer.drop("fin")
        else:
            await peer.until_eof()

    async def main() -> None:
        async with RawServer(handler) as server, new_pool(read_timeout=0.2) as pool:
            response = await send(pool, server.port)
            try:
                with pytest.raises(UpstreamTimeout if cut == "silent" else UpstreamBroken):
                    if reader == "read":
                        await response.read()
                    else:
                        async for _ in response.chunks():
                            pass
            finally:
                response.release()

    run(main())


# -- what the client sends ------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["fresh", "pooled"])
@pytest.mark.parametrize("headers, target", [
    ({"X-Note": "a\r\nX-Injected: 1"}, "/"),
    ({"X-Note": "a\nX-Injected: 1"}, "/"),
    ({"X-Note": "a\rX-Injected: 1"}, "/"),
    ({}, "/x HTTP/1.1\r\nX-Injected: 1\r\n\r\nGET /y"),
], ids=["crlf", "lf", "cr", "in-target"])
def test_a_line_break_in_the_request_head_is_refused_before_anything_is_sent(
        run: Run, headers: dict[str, str], target: str, where: str) -> None:
    async def handler(peer: Peer) -> None:
        await keep_alive(peer)

    async def main() -> None:
        async with RawServer(handler) as server, new_pool() as pool:
            if where == "pooled":
                assert await fetch(pool, server.port) == (200, b"answer 1")
            with pytest.raises(UpstreamError, match="line break") as refused:
                await send(pool, server.port, target=target, headers=headers)
            assert (refused.value.status, refused.value.code) == (502, "upstream_error")
            assert not isinstance(refused.value, UpstreamBroken)
            assert (await fetch(pool, server.port))[0] == 200
            sent = b"".join(bytes(peer.received) for peer in server.peers)
            assert b"Injected" not in sent
            assert sum(len(peer.requests) for peer in server.peers) == (2 if where == "pooled" else 1)

    run(main())


def test_a_refused_request_leaves_no_unretrieved_exception(run: Run) -> None:
    async def main() -> None:
        async with RawServer(keep_alive) as server, new_pool() as pool:
            with pytest.raises(UpstreamError, match="line break"):
                await send(pool, server.port, headers={"X-Note": "a\r\nX-Injected: 1"})

    run(main())


@pytest.mark.parametrize("size", [3, 100_000])
def test_a_bytes_body_is_sent_with_its_exact_length(run: Run, size: int) -> None:
    body = pattern(size)

    async def main() -> None:
        async with RawServer(keep_alive) as server, new_pool() as pool:
            assert await fetch(pool, server.port, "POST", body=body, headers={"Content-Length": "999"}) \
                == (200, b"answer 1")
            request = server.peers[0].requests[0]
            assert request.headers.getall("Content-Length") == [str(size)]
            assert "Transfer-Encoding" not in request.headers
            assert request.body == body

    run(main())


@pytest.mark.parametrize("method, length", [
    ("POST", "0"), ("PUT", "0"), ("PATCH", "0"), ("DELETE", "0"), ("GET", None), ("HEAD", None), ("OPTIONS", None),
])
def test_a_request_without_a_body_says_so_only_where_the_method_needs_it(
        run: Run, method: str, length: str | None) -> None:
    async def main() -> None:
        async with RawServer(keep_alive) as server, new_pool() as pool:
            response = await send(pool, server.port, method)
            response.release()
            request = server.peers[0].requests[0]
            assert request.line == f"{method} / HTTP/1.1"
            assert request.headers.getall("Content-Length", []) == ([length] if length else [])
            assert "Transfer-Encoding" not in request.headers
            assert request.raw.endswith(b"\r\n\r\n")

    run(main())


@pytest.mark.parametrize("parts", [
    (b"hello ", b"", b"world"),
    tuple(pattern(4 * 1024 * 1024)[i:i + 65536] for i in range(0, 4 * 1024 * 1024, 65536)),
], ids=["small", "4MiB"])
def test_a_streamed_body_without_a_length_goes_out_chunked(run: Run, parts: tuple[bytes, ...]) -> None:
    async def main() -> None:
        async with RawServer(keep_alive) as server, new_pool() as pool:
            assert await fetch(pool, server.port, "POST", body=pieces(*parts)) == (200, b"answer 1")
            request = server.peers[0].requests[0]
            assert request.headers.getall("Transfer-Encoding") == ["chunked"]
            assert "Content-Length" not in request.headers
            assert request.body == b"".join(parts)
            assert await fetch(pool, server.port) == (200, b"answer 2")  # the chunked body ended cleanly

    run(main())


def test_a_streamed_body_with_a_declared_length_goes_out_as_is(run: Run) -> None:
    async def main() -> None:
        async with RawServer(keep_alive) as server, new_pool() as pool:
            status, _ = await fetch(pool, server.port, "PUT", body=pieces(b"hello ", b"world"),
                                    headers={"Content-Length": "11"})
            assert status == 200
            request = server.peers[0].requests[0]
            assert request.headers.getall("Content-Length") == ["11"]
            assert "Transfer-Encoding" not in request.headers
            assert request.raw.endswith(b"\r\n\r\nhello world")

    run(main())


class AgentLeft(Exception):
    """What the pipeline's request-body iterator raises when the agent's side fails (BodyTooLarge, a reset)."""


def test_a_request_body_that_fails_fails_the_request_with_its_own_error(run: Run) -> None:
    async def body() -> AsyncIterator[bytes]:
        yield b"the start"
        await asyncio.sleep(0)
        raise AgentLeft()

    async def handler(peer: Peer) -> None:
        await peer.until_eof()

    async def main() -> None:
        async with RawServer(handler) as server, new_pool() as pool:
            with pytest.raises(AgentLeft):
                await send(pool, server.port, "POST", body=body())
            await server.peers[0].eof.wait()
            assert b"the start" in server.peers[0].received

    run(main())


def test_an_answer_before_the_upload_ends_is_delivered_and_the_connection_dropped(run: Run) -> None:
    """An upstream may refuse (413, 401) before reading the body; the unsent rest is abandoned."""
    rest = asyncio.Event()

    async def body() -> AsyncIterator[bytes]:
        yield b"the start"
        await rest.wait()
        yield b"the rest"

    async def handler(peer: Peer) -> None:
        if peer.index == 0:
            await peer.reader.readuntil(b"\r\n\r\n")
            peer.write(b"HTTP/1.1 413 Too Large\r\nContent-Length: 3\r\n\r\nbig")
            await peer.until_eof()
            return
        await keep_alive(peer)

    async def main() -> None:
        async with RawServer(handler) as server, new_pool() as pool:
            assert await fetch(pool, server.port, "POST", body=body()) == (413, b"big")
            await server.peers[0].eof.wait()
            assert b"the rest" not in server.peers[0].received
            assert await fetch(pool, server.port) == (200, b"answer 1")

    run(main())


# -- TLS, against tests/upstreams.py's aiohttp server ---------------------------------------------


def test_an_https_upstream_is_verified_and_its_connection_kept(
        run: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pki = make_pki(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca_pem))

    async def main(up: Upstream) -> None:
        async with new_pool() as pool:
            for n in range(2):
                response = await pool.request("GET", "https", "127.0.0.1", up.port, f"/echo/{n}",
                                              CIMultiDict({"Host": f"127.0.0.1:{up.port}"}), None, True, "c")
                try:
                    assert response.status == 200
                    assert f'"n": {n}'.encode() in await response.read()
                finally:
                    response.release()
        assert up.connections == 1
        assert [seen.tls for seen in up.requests] == [True, True]

    with Upstream(pki.server_context()) as up:
        run(main(up))


def test_the_ca_store_is_loaded_at_the_first_tls_connection_and_once(
        run: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading a CA store costs 50-100 ms: a pool loads none until it first dials TLS (a start, and plain-http
    upstreams, never pay it), and tls_context does not load the system's again when SSL_CERT_FILE names it."""
    loads: list[str] = []
    real_load = ssl.SSLContext.load_verify_locations

    def counted(self: ssl.SSLContext, cafile: str | None = None, *args: Any, **kwargs: Any) -> None:
        loads.append(str(cafile))
        real_load(self, cafile, *args, **kwargs)

    monkeypatch.setattr(ssl.SSLContext, "load_verify_locations", counted)
    system = ssl.get_default_verify_paths().openssl_cafile
    if system and Path(system).exists():
        monkeypatch.setenv("SSL_CERT_FILE", str(Path(system).resolve()))
        upstream_module.tls_context()
        assert loads == []  # OpenSSL read SSL_CERT_FILE itself; the same store is not loaded twice
    pki = make_pki(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca_pem))

    async def main(plain: Upstream, tls: Upstream) -> None:
        async with new_pool() as pool:
            for scheme, up in (("http", plain), ("https", tls), ("https", tls)):
                response = await pool.request("GET", scheme, "127.0.0.1", up.port, "/echo/x",
                                              CIMultiDict({"Host": f"127.0.0.1:{up.port}"}), None, True, "c")
                response.release()
                assert (pool._tls is None) is (scheme == "http")
            assert pool._tls is not None

    with Upstream() as plain, Upstream(pki.server_context()) as tls:
        run(main(plain, tls))
    assert len([load for load in loads if load == system]) == (1 if system and Path(system).exists() else 0)


def test_an_https_upstream_with_an_unknown_certificate_is_refused(run: Run, tmp_path: Path) -> None:
    pki = make_pki(tmp_path)

    async def main(up: Upstream) -> None:
        async with new_pool() as pool:
            with pytest.raises(UpstreamTLSError) as refused:
                await pool.request("GET", "https", "127.0.0.1", up.port, "/echo/x",
                                   CIMultiDict({"Host": f"127.0.0.1:{up.port}"}), None, True, "c")
            assert refused.value.code == "upstream_tls_error"
        assert up.requests == []

    with Upstream(pki.server_context()) as up:
        run(main(up))


# -- found by review: a paused pooled connection, failures that end a close-delimited body, framing ---------


def test_an_answer_left_paused_by_a_slow_agent_is_not_pooled(run: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole answer arrived in the read that made the client pause (the agent was slow), then the agent
    left: pooled, the connection would stay paused and never read its next answer."""
    monkeypatch.setattr(upstream_module, "_HIGH_WATER", 16)  # so one small answer crosses it in one read

    async def handler(peer: Peer) -> None:
        if peer.index == 0:
            await peer.read_request()
            peer.write(ok(b"x" * 100))
        await keep_alive(peer)

    async def main() -> None:
        async with RawServer(handler) as server, new_pool() as pool:
            response = await send(pool, server.port)
            transport = response.transport
            assert transport is not None
            await eventually(lambda: not transport.is_reading(), "the client paused reading")
            response.release()  # the agent went away without taking the body
            assert await fetch(pool, server.port) == (200, b"answer 1")  # on a new connection, at once
            assert len(server.peers) == 2

    run(main())


@pytest.mark.parametrize("failure", ["timeout", "reset"])
def test_a_close_delimited_body_that_fails_is_an_error_not_an_end(run: Run, failure: str) -> None:
    """A body that runs to the end of the connection is complete only at an orderly close, never when the
    connection ends because the exchange failed (a timeout while the agent was slow) or was reset."""
    async def handler(peer: Peer) -> None:
        await peer.read_request()
        peer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nfirst part ")
        await peer.writer.drain()
        if failure == "reset":
            await asyncio.sleep(0.05)
            peer.drop("rst")
        await peer.until_eof()

    async def main() -> None:
        async with RawServer(handler) as server, new_pool(read_timeout=0.2, total_timeout=0.2) as pool:
            response = await send(pool, server.port)
            received = bytearray()
            try:
                with pytest.raises(UpstreamError):
                    async for chunk in response.chunks():
                        received += chunk
                        await asyncio.sleep(0.4)  # the agent is slow: the failure comes while nobody waits
            finally:
                response.release()
            assert received == b"first part "

    run(main())


@pytest.mark.parametrize(("codings", "chunked"), [
    (("chunked",), True),
    (("Chunked",), True),
    (("gzip", "chunked"), True),  # two fields: llhttp frames the body as chunked (the last coding)
    (("gzip, chunked",), True),
    (("chunked", "gzip"), False),  # chunked not last: the body runs to the end of the connection
    (("chunked", "chunked"), True),
    (("chunked ",), True),  # llhttp skips spaces after `chunked` (a plain chunked body, found by a second review),
    # not a tab or an empty list element:
    (("chunked,",), False),  # these four (found by a cold review) it frames as no chunked coding at all,
    (("chunked , ",), False),  # and hands over the chunk-size lines with the data, to the close
    (("chunked", ","), False),
    (("chunked\t",), False),
    ((",chunked",), True),
    (("chunked;q=1",), False),
])
def test_transfer_encoding_is_framed_as_llhttp_frames_it(run: Run, codings: tuple[str, ...], chunked: bool) -> None:
    """Whatever llhttp makes of the body, the gate never reads it otherwise: only a single `Transfer-Encoding:
    chunked` is a plain chunked body; any other is `transfer_coded` (the pipeline refuses it), and where llhttp
    frames that one as chunked the truncated body is still an error, never a body complete at the close."""
    fields = "".join(f"Transfer-Encoding: {coding}\r\n" for coding in codings)

    async def handler(peer: Peer) -> None:
        await peer.read_request()
        if chunked:  # cut inside a chunk: a truncated body, which must not pass for a whole one
            peer.write(f"HTTP/1.1 200 OK\r\n{fields}\r\na\r\n0123456789\r\n10\r\npartial".encode())
        else:
            peer.write(f"HTTP/1.1 200 OK\r\n{fields}\r\nraw bytes to the end".encode())
        await peer.writer.drain()
        peer.drop("fin")

    async def main() -> None:
        async with RawServer(handler) as server, new_pool() as pool:
            response = await send(pool, server.port)
            try:
                assert response.transfer_coded is not (codings in (("chunked",), ("Chunked",), ("chunked ",)))
                if chunked:
                    with pytest.raises(UpstreamBroken):
                        await response.read()
                else:
                    assert await response.read() == b"raw bytes to the end"
            finally:
                response.release()

    run(main())


@pytest.mark.parametrize("codings", [("gzip", "chunked"), ("gzip, chunked",), ("chunked", "chunked")])
def test_a_body_llhttp_frames_as_chunked_is_never_read_as_another(run: Run, codings: tuple[str, ...]) -> None:
    """The gate takes only a single `chunked` for chunked; where llhttp still frames another Transfer-Encoding
    as chunked (its first chunk header says so), the exchange fails rather than pass that body, complete
    or not, as one running to the close."""
    fields = "".join(f"Transfer-Encoding: {coding}\r\n" for coding in codings)

    async def handler(peer: Peer) -> None:
        await peer.read_request()
        peer.write(f"HTTP/1.1 200 OK\r\n{fields}\r\na\r\n0123456789\r\n0\r\n\r\n".encode())
        await keep_alive(peer)

    async def main() -> None:
        async with RawServer(handler) as server, new_pool() as pool:
            response = await send(pool, server.port)
            try:
                assert response.transfer_coded
                with pytest.raises(UpstreamBroken):
                    await response.read()
            finally:
                response.release()

    run(main())


# -- found by a cold review: chunk framing and trailers without end, a TLS answer cut without close_notify --------


_ENDLESS = {
    # one trailer field that never ends: httptools grew its value by concatenation, on the event loop
    "trailer-field": (b"0\r\nX-Trailer: ", b"v" * 65536),
    "trailer-fields": (b"0\r\n", b"".join(b"X-T-%d: %s\r\n" % (n, b"v" * 1000) for n in range(64))),
    "chunk-extension": (b"5;ext=", b"v" * 65536),
}


@pytest.mark.parametrize("endless", list(_ENDLESS))
def test_chunk_framing_and_trailers_are_bounded_like_a_head(run: Run, endless: str) -> None:
    """Found by a cold review: the upstream's 64 KiB bound held only until its head was complete. After the last
    chunk, a trailer field sent without end grew in httptools (quadratic, on the event loop: another client's
    health check took 28 s) and in memory, and the read timeout never fired while its bytes came. Now what is
    read without the parser making progress is bounded past the head too, and the trailers as the head is."""
    start, filler = _ENDLESS[endless]

    async def handler(peer: Peer) -> None:
        await peer.read_request()
        peer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n" + start)
        with contextlib.suppress(ConnectionError):
            for _ in range(64):  # 4 MiB: without a bound the client waits it all out, then times out
                peer.write(filler)
                await peer.writer.drain()
        await peer.until_eof()

    async def main() -> None:
        async with RawServer(handler) as server, new_pool(read_timeout=1) as pool:
            response = await send(pool, server.port)
            received = bytearray()
            try:
                with pytest.raises(UpstreamBroken, match="chunk framing or trailers are too large"):
                    async for chunk in response.chunks():
                        received += chunk
            finally:
                response.release()
            assert received == b"ok"
            await server.peers[0].eof.wait()  # the connection was closed, never pooled

    run(main())


def test_a_head_and_trailers_each_within_the_bound_are_read_whole(run: Run) -> None:
    """The trailers have a bound of their own, as an agent's do: a head and trailers of 60 KiB each pass."""
    fields = "".join(f"X-Filler-{i}: {'v' * 1000}\r\n" for i in range(60)).encode()

    async def handler(peer: Peer) -> None:
        await peer.read_request()
        peer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n" + fields + b"\r\n2\r\nok\r\n0\r\n"
                   + fields + b"\r\n")
        await keep_alive(peer)

    async def main() -> None:
        async with RawServer(handler) as server, new_pool() as pool:
            response = await send(pool, server.port)
            try:
                assert await response.read() == b"ok"
            finally:
                response.release()
            assert await fetch(pool, server.port) == (200, b"answer 2")
            assert len(server.peers) == 1

    run(main())


class _TLSCloser:
    """A TLS upstream on 127.0.0.1 that answers with a body framed by the close, then ends the connection with
    the TLS close_notify (`clean`) or with a bare TCP close (what anyone on the path can forge)."""

    def __init__(self, context: ssl.SSLContext, clean: bool) -> None:
        self._context, self._clean = context, clean
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._server.getsockname()[1])
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            conn, _ = self._server.accept()
            tls = self._context.wrap_socket(conn, server_side=True)
            received = b""
            while b"\r\n\r\n" not in received:
                received += tls.recv(65536)
            tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nfirst part, ")
            tls.sendall(b"second part")
            if self._clean:
                tls.unwrap().close()
            else:
                raw = socket.socket(fileno=tls.detach())
                raw.shutdown(socket.SHUT_RDWR)
                raw.close()

    def close(self) -> None:
        self._server.close()
        self._thread.join(5)


@pytest.mark.parametrize("clean", [True, False], ids=["close-notify", "bare-tcp-close"])
def test_a_tls_answer_framed_by_the_close_ends_only_at_close_notify(
        run: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clean: bool) -> None:
    """Found by a cold review: over TLS a body that runs to the close was complete at any end of the connection,
    and an on-path attacker can end it with a bare TCP close (no close_notify) wherever they like: the agent got
    a cut answer as a whole one. Only the TLS close_notify ends it now (a FIN on plain TCP, as before)."""
    pki = make_pki(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca_pem))
    server = _TLSCloser(pki.server_context(), clean)

    async def main() -> None:
        async with new_pool() as pool:
            response = await pool.request("GET", "https", "localhost", server.port, "/",
                                          CIMultiDict({"Host": f"localhost:{server.port}"}), None, True, "c")
            try:
                assert response.content_length is None
                if clean:
                    assert await response.read() == b"first part, second part"
                else:
                    with pytest.raises(UpstreamBroken, match="without close_notify"):
                        await response.read()
            finally:
                response.release()

    try:
        run(main())
    finally:
        server.close()
