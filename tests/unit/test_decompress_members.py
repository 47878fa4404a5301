"""Gzip bodies of many members, and damaged ones, decoded for inspection and redaction.

Found by a review: after each gzip member the decoder was handed the rest of the body, which zlib copies as
the member's unused_data, so a body of N minimal empty members (20 bytes each) cost about N^2 * 10 bytes of
copying and decoded to nothing, under no cap (through aegisd, 10 MiB of them took 344 s in a worker thread,
256 KiB 0.12 s on the event loop; an answer of them held the loop up to 0.7 s, as members that decode to
nothing gave it no turn). And a `.gz` upload whose CRC was wrong was inspected for none of what it decodes
to, as the 64 KiB slice holding the error was dropped whole, though `gunzip` prints all of it.

The work is counted, not timed: every byte handed to a zlib decoder, and every byte zlib copies out of it
(unused_data, unconsumed_tail), must stay within a small multiple of the body.
"""

from __future__ import annotations

import asyncio
import gzip
import random
import zlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, cast

import pytest
from multidict import CIMultiDict

from aegisd.gate import outbound_inspection
from aegisd.gate.response_redaction import ResponseRedactor
from aegisd.inspection import REDACTED, VAULT_SECRET, Inspector, Redaction, SecretSource
from aegisd.inspection.decompress import (
    FIRST_SLICE,
    MEMBER_COST,
    STEP,
    StreamDecoder,
    TooLarge,
    decodable_prefix,
    decompress_capped,
    deflate_readings,
    gzip_reading,
)
from aegisd.inspection.secret_forms import redaction_forms

SECRET = b"members-secret-Q7w8E9r0T1y2"
EMPTY = gzip.compress(b"", mtime=0)  # the smallest member: 20 bytes
LAST = gzip.compress(b'{"note": "' + SECRET + b'"}', mtime=0)
MEMBERS = EMPTY * 3000 + LAST  # 60 KB


@dataclass
class Tally:
    decoders: int = 0
    fed: int = 0  # bytes handed to decompress()
    copied: int = 0  # bytes zlib left in unused_data and unconsumed_tail (each a fresh copy)


class _Counted:
    def __init__(self, real: Any, tally: Tally) -> None:
        self._real, self._tally = real, tally

    def decompress(self, data: Any, max_length: int = 0) -> bytes:
        self._tally.fed += len(data)
        try:
            return bytes(self._real.decompress(data, max_length))
        finally:
            self._tally.copied += len(self._real.unused_data) + len(self._real.unconsumed_tail)

    def flush(self, *args: Any) -> bytes:
        return bytes(self._real.flush(*args))

    def __getattr__(self, name: str) -> Any:  # eof, unused_data, unconsumed_tail
        return getattr(self._real, name)


@pytest.fixture
def tally(monkeypatch: pytest.MonkeyPatch) -> Tally:
    counts = Tally()
    real = zlib.decompressobj

    def counted(*args: Any, **kwargs: Any) -> Any:
        counts.decoders += 1
        return _Counted(real(*args, **kwargs), counts)

    monkeypatch.setattr(zlib, "decompressobj", counted)
    return counts


def _stream(body: bytes) -> bytes:
    decoder = StreamDecoder("gzip")
    return b"".join(decoder.feed(body)) + decoder.finish()


DECODERS: dict[str, Callable[[bytes], bytes]] = {
    "decompress_capped": lambda body: decompress_capped(body, "gzip", 1 << 30),
    "gzip_reading": lambda body: gzip_reading(body, 1 << 30).out,
    "deflate_readings": lambda body: b"".join(deflate_readings(body, 1 << 30).decoded),
    "decodable_prefix": lambda body: decodable_prefix(body, "gzip", 1 << 30),
    "StreamDecoder": _stream,
}


@pytest.mark.parametrize("name", list(DECODERS))
def test_many_members_cost_work_linear_in_the_body(tally: Tally, name: str) -> None:
    """3,000 empty members and one holding the secret: about 3.6 bytes fed and copied per byte of body (each
    member's first slice is FIRST_SLICE bytes), where handing each member the rest fed about 1,500 times
    the body and copied as much."""
    assert DECODERS[name](MEMBERS).endswith(b'{"note": "' + SECRET + b'"}')
    assert 3001 <= tally.decoders <= 3 * 3001 + 2, tally  # deflate_readings tries zlib and raw deflate first
    bound = (FIRST_SLICE / len(EMPTY) + 1) * len(MEMBERS)
    assert tally.fed <= bound and tally.copied <= bound, (tally, bound)


@pytest.mark.parametrize("name", list(DECODERS))
def test_a_long_member_is_fed_in_bounded_slices_and_copies_little(tally: Tally, name: str) -> None:
    """A member of 200 KB (incompressible) followed by many small ones: no call copies more than a slice."""
    big = gzip.compress(bytes(range(256)) * 800 + b"x", compresslevel=0)
    body = big + EMPTY * 500 + LAST
    assert DECODERS[name](body).endswith(SECRET + b'"}')
    assert tally.fed <= 4 * len(body) and tally.copied <= 4 * len(body), tally


def test_each_member_after_the_first_counts_against_the_cap(tally: Tally) -> None:
    """A body of empty members decodes to nothing, so its members count: past cap / MEMBER_COST of them it is
    too large, found after that many decoders, not after all of the body's."""
    cap = 100 * MEMBER_COST
    fits, too_many = EMPTY * 101, EMPTY * 102 + LAST
    assert decompress_capped(fits, "gzip", cap) == b""
    assert gzip_reading(fits, cap).spent == cap
    body = EMPTY * 50_000 + LAST
    for decode in (lambda: decompress_capped(too_many, "gzip", cap), lambda: gzip_reading(body, cap),
                   lambda: deflate_readings(body, cap)):
        tally.decoders = 0
        with pytest.raises(TooLarge):
            decode()
        assert tally.decoders <= cap // MEMBER_COST + 5, tally  # deflate_readings: 2 each for zlib, raw
    # The readings of a deflate body share the cap, members included.
    assert deflate_readings(fits, cap).whole
    with pytest.raises(TooLarge):
        deflate_readings(fits + b"\0", cap - 1)
    # What only looks at a prefix stops there too, with what decoded before it.
    tally.decoders = 0
    assert decodable_prefix(gzip.compress(b"abc") + body, "gzip", cap) == b"abc"
    assert tally.decoders <= cap // MEMBER_COST + 2, tally
    # A look at how a body starts goes past members that decode to nothing, within the cap.
    assert decodable_prefix(EMPTY * 50 + LAST, "gzip", cap, enough=3).startswith(b'{"n')


def _inspect_inline(body: bytes, encoding: str) -> tuple[set[str], Any]:
    inspector = Inspector([SecretSource("c", (SECRET,))])
    return outbound_inspection._inspect_body(inspector, body, encoding, 10 * 1024 * 1024,
                                             outbound_inspection.INLINE_BODY_MAX)


def test_inline_inspection_counts_the_body_its_decoded_text_and_its_members() -> None:
    """A compressed body is inspected on the event loop only while it, what it decodes to and its members
    together fit INLINE_BODY_MAX, so it costs the loop no more than a plain body of that size: 40 KB of
    empty members (2,000 of them) go to a worker thread, where the secret in the last is found."""
    inline = outbound_inspection.INLINE_BODY_MAX
    body = EMPTY * 2000 + LAST
    assert len(body) < inline // 4
    for encoding in ("gzip", ""):
        with pytest.raises(outbound_inspection._LargerThanInline):
            _inspect_inline(body, encoding)
        inspector = Inspector([SecretSource("c", (SECRET,))])
        assert outbound_inspection._inspect_body(inspector, body, encoding, 10 * 1024 * 1024, None) == (
            {VAULT_SECRET}, None)
    stored = gzip.compress(bytes(range(256)) * (inline // 512) + SECRET, compresslevel=0)  # each half the size
    with pytest.raises(outbound_inspection._LargerThanInline):
        _inspect_inline(stored, "gzip")
    assert _inspect_inline(EMPTY * 20 + LAST, "gzip") == ({VAULT_SECRET}, None)  # a small one stays inline


def _damaged(payload: bytes) -> dict[str, bytes]:
    whole = gzip.compress(payload, mtime=0)
    crc, size = bytearray(whole), bytearray(whole)
    crc[-8] ^= 0xFF
    size[-1] ^= 0xFF
    return {"bad CRC": bytes(crc), "bad size": bytes(size), "cut 4 bytes": whole[:-4], "cut 8 bytes": whole[:-8],
            "second member bad CRC": gzip.compress(b"first member, ") + bytes(crc)}


PAYLOADS = {
    "small": b"notes: " + SECRET + b"\n",
    "one slice": b"n" * (FIRST_SLICE - 10) + SECRET,
    "several slices": random.Random(3).randbytes(150_000) + SECRET,  # incompressible: past STEP compressed
    "compressible": b"line of a log\n" * 20_000 + SECRET,
}


@pytest.mark.parametrize("payload", list(PAYLOADS))
def test_a_damaged_gz_is_inspected_for_everything_it_decodes_to(payload: str) -> None:
    """As gunzip prints all of it before complaining of the CRC: the slice holding the fault is decoded again
    up to it, not dropped with it."""
    plain = PAYLOADS[payload]
    inspector = Inspector([SecretSource("c", (SECRET,))])
    for how, body in _damaged(plain).items():
        reading = gzip_reading(body, 1 << 30)
        assert not reading.ended and reading.out.endswith(plain), (how, len(reading.out))
        assert decodable_prefix(body, "gzip", 1 << 30).endswith(plain), how
        # An upload of it (no Content-Encoding) is inspected as its bytes and what decodes of them, and refused
        # for the secret; sent as Content-Encoding: gzip it is not valid gzip, and the secret is named too.
        for inline_max in (outbound_inspection.INLINE_BODY_MAX, None):
            try:
                found = outbound_inspection._inspect_body(inspector, body, "", 10 * 1024 * 1024, inline_max)
            except outbound_inspection._LargerThanInline:
                assert len(body) + len(plain) > outbound_inspection.INLINE_BODY_MAX, how
                continue
            assert found == ({VAULT_SECRET}, None), how
        families, problem = outbound_inspection._inspect_body(inspector, body, "gzip", 10 * 1024 * 1024, None)
        assert families == {VAULT_SECRET} and problem is not None and problem.status == 400, how


class _Row:
    flags = ""
    request_id = "r"


def _redactor(encoding: str) -> ResponseRedactor:
    redactor = ResponseRedactor(Redaction(redaction_forms([SECRET])), cast(Any, _Row()))
    redactor.headers(CIMultiDict({"Content-Encoding": encoding}) if encoding else CIMultiDict(), "GET", 200)
    return redactor


def test_an_answer_of_empty_members_gives_the_event_loop_turns() -> None:
    """One upstream chunk of 2 MiB of empty members, then the echo: no piece decodes until the last member,
    and the loop got no turn for all of it. Now it gets one at least every STEP bytes of input."""
    body = EMPTY * (2 * 1024 * 1024 // len(EMPTY)) + LAST
    assert sum(1 for piece in StreamDecoder("gzip").feed(body) if not piece) >= len(body) // STEP
    small_chunks = StreamDecoder("gzip")  # however the upstream's chunks cut it
    turns = sum(1 for start in range(0, len(body), 1000) for piece in small_chunks.feed(body[start:start + 1000])
                if not piece)
    assert turns >= len(body) // STEP, turns
    redactor = _redactor("gzip")

    async def one_chunk() -> AsyncIterator[bytes]:
        yield body

    async def run() -> tuple[bytes, int]:
        ticks = 0
        done = False

        async def tick() -> None:
            nonlocal ticks
            while not done:
                ticks += 1
                await asyncio.sleep(0)

        ticker = asyncio.ensure_future(tick())
        await asyncio.sleep(0)
        ticks = 0
        out = b"".join([piece async for piece in redactor.filter(one_chunk())])
        done = True
        await ticker
        return out, ticks

    out, ticks = asyncio.run(run())
    assert out == b'{"note": "' + REDACTED + b'"}'
    assert ticks >= len(body) // STEP, ticks


@pytest.mark.parametrize(("encoding", "body"), [
    ("", _damaged(b'{"echo": "' + SECRET + b'"}')["bad CRC"]),
    ("", _damaged(b'{"echo": "' + SECRET + b'"}')["cut 4 bytes"]),
    ("", _damaged(b'{"echo": "' + SECRET + b'"}')["second member bad CRC"]),
    ("", zlib.compress(b'{"echo": "' + SECRET + b'"}')[:-2]),
    ("gzip", gzip.compress(gzip.compress(b'{"echo": "' + SECRET + b'"}'))),
    ("gzip", gzip.compress(zlib.compress(b'{"echo": "' + SECRET + b'"}'))),
    ("deflate", zlib.compress(gzip.compress(b'{"echo": "' + SECRET + b'"}'))),
    ("gzip", EMPTY * 300 + gzip.compress(_damaged(b'{"echo": "' + SECRET + b'"}')["bad CRC"])),
], ids=["bad CRC", "cut", "second member bad CRC", "zlib cut", "gzip in gzip", "zlib in gzip", "gzip in deflate",
        "damaged gzip in gzip after empty members"])
def test_an_answer_whose_compressed_data_holds_the_secret_is_refused(encoding: str, body: bytes) -> None:
    """A small answer that is compressed data, without a Content-Encoding or inside the one it declares, is
    refused when what decodes of it holds the secret, damaged or cut short or not."""
    with pytest.raises(Exception) as refused:
        asyncio.run(_redactor(encoding).refuse_undeclared_compression(body, 1 << 20))
    assert getattr(refused.value, "code", None) == "response_not_redactable", refused.value


def test_an_answer_whose_compressed_data_is_clean_passes() -> None:
    for encoding, body in (("", gzip.compress(b"nothing here")), ("gzip", gzip.compress(gzip.compress(b"clean"))),
                           ("gzip", gzip.compress(b"x^ plain text that starts like zlib")),
                           ("gzip", EMPTY * 3000 + gzip.compress(b"plain")), ("", b"plain text")):
        asyncio.run(_redactor(encoding).refuse_undeclared_compression(body, 1 << 20))
