"""A compressed response decodes the same wherever the upstream's chunks split it: at every offset, into two
chunks or bytes one by one (a deflate body's first byte alone used to choose raw deflate for a zlib
stream; a chunk ending inside the next gzip member's magic bytes used to be "data after the end"). And
zero padding between gzip members, which gzip skips, is skipped both for responses and for request
bodies (`decompress_capped`), so no member hides behind it. A `deflate` request body is decoded in every
reading an upstream may give it (`deflate_readings`): zlib, raw deflate and, when it starts like it, gzip."""

from __future__ import annotations

import gzip
import struct
import threading
import zlib

import pytest

from aegisd.inspection.decompress import (
    STEP,
    DecodeError,
    Readings,
    StreamDecoder,
    TooLarge,
    decompress_capped,
    deflate_readings,
)

PLAIN = b"".join(b"data: {\"n\": %d, \"text\": \"event %d of the stream\"}\n\n" % (i, i * i) for i in range(12))
FIRST, SECOND = PLAIN[:200], PLAIN[200:]


def raw_deflate(data: bytes) -> bytes:
    encoder = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    return encoder.compress(data) + encoder.flush()


BODIES = {
    "zlib deflate": ("deflate", zlib.compress(PLAIN)),
    "raw deflate": ("deflate", raw_deflate(PLAIN)),
    "gzip": ("gzip", gzip.compress(PLAIN)),
    "two gzip members": ("gzip", gzip.compress(FIRST) + gzip.compress(SECOND)),
    "gzip members padded with zeros": ("gzip", gzip.compress(FIRST) + b"\0" * 5 + gzip.compress(SECOND) + b"\0\0"),
}


def decode(encoding: str, chunks: list[bytes]) -> bytes:
    decoder = StreamDecoder(encoding)
    out = b"".join(piece for chunk in chunks for piece in decoder.feed(chunk))
    return out + decoder.finish()


@pytest.mark.parametrize("name", list(BODIES))
def test_every_split_into_two_chunks_decodes_whole(name: str) -> None:
    encoding, body = BODIES[name]
    if encoding == "gzip":
        assert gzip.decompress(body) == PLAIN  # what Python's gzip module reads from it
    for cut in range(len(body) + 1):
        assert decode(encoding, [body[:cut], body[cut:]]) == PLAIN, (name, cut)


@pytest.mark.parametrize("name", list(BODIES))
def test_byte_by_byte_and_every_split_into_three_chunks_decode_whole(name: str) -> None:
    encoding, body = BODIES[name]
    assert decode(encoding, [body[i:i + 1] for i in range(len(body))]) == PLAIN
    for first in range(0, len(body), 7):
        for second in range(first, min(first + 12, len(body))):
            assert decode(encoding, [body[:first], body[first:second], body[second:]]) == PLAIN, (first, second)


@pytest.mark.parametrize("name", ["zlib deflate", "raw deflate", "gzip"])
def test_a_cut_body_is_an_error_wherever_it_is_cut(name: str) -> None:
    encoding, body = BODIES[name]
    for cut in range(1, len(body)):
        for chunks in ([body[:cut]], [body[:1], body[1:cut]]):
            with pytest.raises(DecodeError):
                decode(encoding, chunks)


@pytest.mark.parametrize(("encoding", "body"), [
    ("gzip", gzip.compress(PLAIN) + b"trailing"),
    ("gzip", gzip.compress(PLAIN) + b"\0\0x"),
    ("gzip", gzip.compress(PLAIN) + b"\x1f"),  # perhaps a member's start, but the body ends there
    ("gzip", gzip.compress(PLAIN) + b"\x1f\x8b"),
    ("deflate", zlib.compress(PLAIN) + b"\0"),
    ("deflate", raw_deflate(PLAIN) + b"x"),
])
def test_bytes_after_the_end_are_an_error_however_they_arrive(encoding: str, body: bytes) -> None:
    for cut in range(len(body) - 10, len(body) + 1):
        with pytest.raises(DecodeError):
            decode(encoding, [body[:cut], body[cut:]])


def test_a_request_body_decodes_every_member_past_zero_padding() -> None:
    """gzip (and so Python's gzip module, an upstream's likely decoder) skips zeros between members; the
    second member must be inspected too, not passed over as trailing bytes."""
    hidden = b'{"note": "the part inspection must see"}'
    body = gzip.compress(b"hello ") + b"\0" * 4 + gzip.compress(hidden)
    assert gzip.decompress(body) == b"hello " + hidden
    assert decompress_capped(body, "gzip", 1 << 20) == b"hello " + hidden
    assert decompress_capped(body + b"\0\0", "gzip", 1 << 20) == b"hello " + hidden
    # Bytes that are no member are still inspected as they are.
    assert decompress_capped(gzip.compress(b"hello ") + b"\0\0plain", "gzip", 1 << 20) == b"hello plain"


@pytest.mark.parametrize(("encoding", "body", "valid"), [
    ("gzip", gzip.compress(bytes(STEP * 3 + 5)) + gzip.compress(b"second member"), True),
    ("gzip", gzip.compress(bytes(STEP * 2)) + b"\0\0" + gzip.compress(b"second member"), True),
    ("gzip", gzip.compress(bytes(STEP * 2)) + b"not a member", False),
    ("deflate", zlib.compress(bytes(STEP * 2)) + b"after the end", False),
])
def test_a_member_ending_past_the_first_step_of_a_chunk_does_not_hang(encoding: str, body: bytes,
                                                                       valid: bool) -> None:
    """A member (or stream) that ends while the rest of a chunk waits as zlib's unconsumed tail: CPython
    leaves that tail in place at the end, and a decoder testing only the tail spun on it for ever, with the
    event loop, whatever came next."""
    outcome: list[bytes | BaseException] = []

    def run() -> None:
        try:
            outcome.append(decode(encoding, [body]))
        except DecodeError as exc:
            outcome.append(exc)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(10)
    assert not worker.is_alive(), "the decoder did not return"
    if valid:
        assert outcome == [gzip.decompress(body)]
    else:
        assert isinstance(outcome[0], DecodeError)


# -- the readings of a request body sent as `deflate` ------------------------------------------------------

SECRET = b'{"key": "sk-readingSECRETvalue-0123456789abcdef"}'


def two_way(raw_tail: bytes) -> bytes:
    """Valid zlib (one stored block of 0xFEFE bytes) that read as raw deflate is a stored block of 257 bytes
    (the zlib header, the stored block's header and padding) followed by `raw_tail`."""
    body = bytearray(b"\x78\x01\x01\xfe\xfe\x01\x01") + b"x" * 255 + raw_tail
    body += b"x" * (7 + 0xFEFE - len(body))
    return bytes(body + struct.pack(">I", zlib.adler32(bytes(body[7:]))))


def inflate_raw(body: bytes) -> bytes:
    return zlib.decompressobj(-zlib.MAX_WBITS).decompress(body)


@pytest.mark.parametrize(("body", "plain"), [
    (zlib.compress(PLAIN), PLAIN),
    (zlib.compress(PLAIN, 0), PLAIN),  # stored blocks
    (raw_deflate(PLAIN), PLAIN),
    (gzip.compress(FIRST) + b"\0\0" + gzip.compress(SECOND), PLAIN),  # as zlib's auto-detection reads it
    (zlib.compress(PLAIN) + b"trailing", PLAIN + b"trailing"),  # trailing bytes as they are, as before
])
def test_an_ordinary_deflate_body_has_one_reading(body: bytes, plain: bytes) -> None:
    """The other readings fail on the first few bytes, before decoding anything: no reading at all."""
    assert deflate_readings(body, 1 << 20) == Readings([plain], True)
    if not body.startswith(b"\x1f\x8b"):  # what the gate read before (gzip was not valid `deflate` to it)
        assert deflate_readings(body, 1 << 20).decoded == [decompress_capped(body, "deflate", 1 << 20)]


def test_a_body_valid_as_zlib_and_as_raw_deflate_is_read_both_ways() -> None:
    """Found in review: the gate read this body as zlib only (its first two bytes are a zlib header), while
    .NET's DeflateStream and Go's compress/flate read it as raw deflate and get the secret."""
    body = two_way(raw_deflate(SECRET))
    as_zlib, as_raw = zlib.decompress(body), inflate_raw(body)
    assert SECRET not in as_zlib and SECRET in as_raw
    readings = deflate_readings(body, 1 << 20)
    assert readings.whole
    assert readings.decoded[0] == as_zlib
    assert readings.decoded[1].startswith(as_raw) and SECRET in readings.decoded[1]


def test_a_reading_that_breaks_off_after_decoding_something_makes_the_body_not_whole() -> None:
    """Valid as zlib, but raw deflate decodes 257 stored bytes and then meets an invalid block type, or a
    block the body ends inside: both readings are inspected as far as they go, and the body is not whole."""
    for tail in (b"\xff\xff", b"\x01\xff\xff\x00\x00"):  # a reserved block type; a stored block past the end
        body = two_way(tail)
        readings = deflate_readings(body, 1 << 20)
        assert not readings.whole
        assert readings.decoded[0] == zlib.decompress(body)
        assert readings.decoded[1].startswith(body[5:7] + b"x" * 255)  # the first stored block, then the end
    # What decodes before the error is kept whole, not only what came before the failing call's input.
    broken = bytearray(raw_deflate(PLAIN))
    for at in range(len(broken) // 2, len(broken)):  # the first byte from the middle on that breaks it
        broken[at] ^= 0xFF
        try:
            inflate_raw(bytes(broken))
        except zlib.error:
            break
        broken[at] ^= 0xFF
    decoder, exact = zlib.decompressobj(-zlib.MAX_WBITS), bytearray()
    for i in range(len(broken)):  # byte by byte: everything an upstream's stream decoder hands out
        try:
            exact += decoder.decompress(broken[i:i + 1])
        except zlib.error:
            break
    readings = deflate_readings(bytes(broken), 1 << 20)
    assert not readings.whole and readings.decoded == [bytes(exact)] and len(exact) > 20


@pytest.mark.parametrize("body", [b"\x78\x9cnot deflate at all", b"\x00", zlib.compress(PLAIN)[:-6],
                                  b"\x1f\x8b\x08garbage"])
def test_a_body_no_reading_decodes_whole_is_not_whole(body: bytes) -> None:
    assert not deflate_readings(body, 1 << 20).whole


def test_the_readings_together_are_capped() -> None:
    """Each reading is capped, and so are all of them together: a two-way body costs no more to decode and
    inspect than one plain body of the limit."""
    body = two_way(raw_deflate(SECRET))
    total = sum(map(len, deflate_readings(body, 1 << 20).decoded))
    assert total > 0xFEFE * 2 - 300
    assert sum(map(len, deflate_readings(body, total).decoded)) == total
    with pytest.raises(TooLarge):
        deflate_readings(body, total - 1)  # each reading alone fits
    bomb = two_way(raw_deflate(bytes(4 << 20)))  # harmless as zlib, 4 MiB of zeros as raw deflate
    with pytest.raises(TooLarge):
        deflate_readings(bomb, 1 << 20)
    with pytest.raises(TooLarge):
        deflate_readings(gzip.compress(bytes(4 << 20)), 1 << 20)
