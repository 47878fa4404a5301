"""A `Content-Encoding: deflate` body is inspected in every reading an upstream may give it: zlib (RFC 9110's
`deflate`), raw deflate (RFC 1951, as .NET's DeflateStream and Go's compress/flate read it) and, when it starts
like one, gzip (zlib's auto-detection). Found in review: the gate chose one reading by the first two bytes,
so a body valid as zlib (harmless stored bytes) and as raw deflate (holding a vault secret) was forwarded."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator

import pytest

from tests.e2e.gate_support import GateWorld, untouched
from tests.e2e.inspection_support import LeakyUpstream

OWN = "dfl-own-secret-Q7w8E9r0T1y2"
OTHER = "sk-dflOtherSECRETvalue-0123456789abcdef"
HEADERS = [("Content-Type", "application/octet-stream"), ("Content-Encoding", "deflate")]


def raw_deflate(data: bytes) -> bytes:
    encoder = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS, 9, zlib.Z_FIXED)
    return encoder.compress(data) + encoder.flush()


def two_way(raw_tail: bytes) -> bytes:
    """A valid zlib stream of one stored block of 0xFEFE bytes, which read as raw deflate is a stored block of
    257 bytes (the zlib header, the stored block's header and padding) followed by `raw_tail`."""
    body = bytearray(b"\x78\x01")  # zlib header | raw: a stored block, not final; LEN's low byte 0x01
    body += b"\x01\xfe\xfe\x01\x01"  # zlib: final stored block, LEN 0xFEFE, NLEN | raw: LEN 257, NLEN, 2 bytes
    body += b"x" * 255 + raw_tail
    body += b"x" * (7 + 0xFEFE - len(body))
    return bytes(body + struct.pack(">I", zlib.adler32(bytes(body[7:]))))


@pytest.fixture(scope="module")
def dfl() -> Iterator[tuple[GateWorld, LeakyUpstream]]:
    world = GateWorld.start()
    try:
        up = LeakyUpstream()
        world.upstreams.append(up)
        up.start()
        world.credential("own", OWN, up.entry())  # body inspection: block (the default)
        world.credential("other", OTHER, up.entry())
        world.agent("bot", "own")
        yield world, up
    finally:
        world.close()


def test_a_secret_in_the_raw_deflate_reading_of_a_zlib_body_is_refused(dfl: tuple[GateWorld, LeakyUpstream]) -> None:
    world, up = dfl
    for secret in (OWN, OTHER):
        body = two_way(raw_deflate(b'{"note": "' + secret.encode() + b'"}'))
        assert secret.encode() not in zlib.decompress(body)  # the reading the gate used to inspect
        assert secret.encode() in zlib.decompressobj(-zlib.MAX_WBITS).decompress(body)  # what such upstreams read
        with untouched(up):
            reply = world.call("POST", "/own/echo/two-way", HEADERS, body, agent="bot")
        row = world.assert_refused(reply, 403, "body_inspection")
        assert row["flags"] == "body_inspection_block=vault_secret", row
    world.assert_no_leaks()


def test_a_reading_that_breaks_partway_is_not_inspectable(dfl: tuple[GateWorld, LeakyUpstream]) -> None:
    """Valid as zlib, but raw deflate decodes a stored block and then meets an invalid block type: an upstream
    reading it raw gets those bytes and an error, which cannot be inspected as a whole."""
    world, up = dfl
    with untouched(up):
        reply = world.call("POST", "/own/echo/two-way-broken", HEADERS, two_way(b"\xff\xff"), agent="bot")
    row = world.assert_refused(reply, 400, "body_not_inspectable")
    assert row["flags"] == "body_inspection_block=not_inspectable", row
    world.assert_no_leaks()


def test_clean_deflate_bodies_are_forwarded_as_sent(dfl: tuple[GateWorld, LeakyUpstream]) -> None:
    world, up = dfl
    plain = b'{"note": "nothing secret here", "n": 12}'
    for name, body in (("zlib", zlib.compress(plain)), ("raw", raw_deflate(plain)),
                       ("two-way", two_way(raw_deflate(plain)))):
        reply = world.call("POST", f"/own/echo/clean-{name}", HEADERS, body, agent="bot")
        assert reply.status == 200, (name, reply.text())
        forwarded = up.requests_to(f"/echo/clean-{name}")[-1]
        assert forwarded.header("Content-Encoding") == ["deflate"], name
        assert forwarded.body == (plain if name == "raw" else zlib.decompress(body)), name  # as aiohttp inflates it
    world.assert_no_leaks()
