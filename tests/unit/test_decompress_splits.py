"""A compressed response decodes the same wherever the upstream's chunks split it: at every offset, into two
chunks or bytes one by one (a deflate body's first byte alone used to choose raw deflate for a zlib
stream; a chunk ending inside the next gzip member's magic bytes used to be "data after the end"). And
zero padding between gzip members, which gzip skips, is skipped both for responses and for request
bodies (`decompress_capped`), so no member hides behind it."""

from __future__ import annotations

import gzip
import threading
import zlib

import pytest

from aegisd.inspection.decompress import STEP, DecodeError, StreamDecoder, decompress_capped

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
