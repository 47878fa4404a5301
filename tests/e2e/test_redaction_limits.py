"""What a hostile or careless upstream's answer may cost or slip past redaction, through the real daemon:

- a body with a transfer coding other than chunked (`Transfer-Encoding: gzip, chunked`, or `gzip` to the
  close) is refused, for every credential: llhttp removes only the chunked framing and the header is not
  forwarded, so the compressed bytes (and a compressed echo of the secret) would reach the agent.
"""

from __future__ import annotations

import contextlib
import gzip
import socket
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from tests.e2e.gate_support import GateWorld, Reply

SECRET = "lim-secret-for-redaction-K8j7H6g5"
OFF = "lim-off-secret-Z1x2C3v4B5"


class RawUpstream:
    """A plain-HTTP upstream answering each request with the pieces `answer(path, secret)` returns, sent in
    turn with a short pause at each None (so the gate reads them apart); it closes the connection after an
    answer whose head says `Connection: close`. `served` counts the answers sent in full."""

    def __init__(self, answer: Callable[[str, bytes], list[bytes | None]]) -> None:
        self._answer = answer
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._server.getsockname()[1])
        self.served = 0
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, name="raw-upstream", daemon=True).start()

    def entry(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self._server.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buffer = b""
        with conn, contextlib.suppress(OSError):
            while True:
                while b"\r\n\r\n" not in buffer:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buffer += data
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                lines = head.split(b"\r\n")
                auth = next((line.split(b":", 1)[1].strip() for line in lines[1:]
                             if line.lower().startswith(b"authorization:")), b"")
                pieces = self._answer(lines[0].split(b" ")[1].decode(), auth.removeprefix(b"Bearer "))
                for piece in pieces:
                    if piece is None:
                        time.sleep(0.05)
                    else:
                        conn.sendall(piece)
                with self._lock:
                    self.served += 1
                first = next(p for p in pieces if p is not None)
                if b"connection: close" in first.split(b"\r\n\r\n")[0].lower():
                    return


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


def _gzip_zeros(size: int) -> bytes:
    """`size` zero bytes, gzip-compressed (about a thousandth of that)."""
    encoder = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    block, parts = bytes(1 << 20), []
    for _ in range(size >> 20):
        parts.append(encoder.compress(block))
    parts.append(encoder.compress(bytes(size & ((1 << 20) - 1))))
    return b"".join(parts) + encoder.flush()


def answer(path: str, secret: bytes) -> list[bytes | None]:
    echo = gzip.compress(b'{"echo": "' + secret + b'"}')
    kind = path.split("/")[1]
    if kind == "te-gzip-chunked":
        return [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n" + _chunk(echo) + b"0\r\n\r\n"]
    if kind == "te-gzip-close":
        return [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nConnection: close\r\n\r\n", None, echo]
    if kind == "te-chunked-twice":
        return [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n"
                + _chunk(_chunk(echo) + b"0\r\n\r\n") + b"0\r\n\r\n"]
    if kind == "te-chunked":  # the one transfer coding that is forwarded (as the gate's own chunking)
        return [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Encoding: gzip\r\n\r\n" + _chunk(echo)
                + b"0\r\n\r\n"]
    if kind == "te-gzip-head":  # no body follows: nothing to refuse
        return [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"]
    return [b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"]


@dataclass
class Limits:
    world: GateWorld
    up: RawUpstream


@pytest.fixture(scope="module")
def lim() -> Iterator[Limits]:
    world = GateWorld.start()
    up = RawUpstream(answer)
    try:
        world.credential("blk", SECRET, up.entry())
        world.credential("off", OFF, up.entry(), "--body-inspection", "off")
        world.agent("bot", "blk", "off")
        yield Limits(world, up)
    finally:
        up.stop()
        world.close()


def get(world: GateWorld, target: str, method: str = "GET", version: str = "1.1") -> Reply:
    return world.raw(f"{method} {target} HTTP/{version}\r\nHost: 127.0.0.1\r\nX-Aegis-Agent: {world.tokens['bot']}\r\n"
                     "Connection: close\r\n\r\n".encode())


@pytest.mark.parametrize("kind", ["te-gzip-chunked", "te-gzip-close", "te-chunked-twice"])
def test_a_body_with_a_transfer_coding_other_than_chunked_is_refused(lim: Limits, kind: str) -> None:
    world = lim.world
    for service in ("blk", "off"):  # forwarded without its header, the body is garbage to any agent
        reply = get(world, f"/{service}/{kind}")
        world.assert_refused(reply, 502, "response_not_redactable", credential=service)
        assert b"\x1f\x8b" not in reply.body
    world.assert_no_leaks([gzip.compress(b'{"echo": "' + s.encode() + b'"}').decode("latin-1") for s in (SECRET, OFF)])


def test_chunked_alone_and_bodiless_answers_still_pass(lim: Limits) -> None:
    world = lim.world
    reply = get(world, "/blk/te-chunked")
    assert (reply.status, reply.json()) == (200, {"echo": "[REDACTED]"}), reply.text()
    head = get(world, "/blk/te-gzip-head", method="HEAD")
    assert head.status == 200 and head.header("Transfer-Encoding") is None
    world.assert_no_leaks()
