"""gzip and deflate, decoded with a hard cap (outbound bodies) or in bounded steps (responses).

A compressed request body is inspected as if it had been sent plain, so its decoded size must fit
the same `max_body_bytes` a plain body must: past that the caller refuses it (a zip bomb's decoded
body is never larger; what inspecting it costs is in docs/inspection.md). Response decoding hands
out pieces of at most STEP bytes, so a bomb upstream costs bandwidth to the agent, never memory here.

A request body sent as `deflate` has more than one reading: RFC 9110 means zlib, but .NET's DeflateStream
and Go's compress/flate read raw deflate, and zlib's auto-detection reads gzip; one body can be valid in
two of them and decode to different text (`deflate_readings`). A response has just the one reading
StreamDecoder gives it: it is decoded here and reaches the agent plain.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from typing import NamedTuple

GZIP_MAGIC = b"\x1f\x8b\x08"
DECODABLE = frozenset({"gzip", "x-gzip", "deflate"})
STEP = 64 * 1024


class DecodeError(Exception):
    """The data is not valid for its declared encoding."""


class TooLarge(Exception):
    """The decoded data would exceed the cap."""


def _wbits(encoding: str, head: bytes) -> int:
    if encoding != "deflate":
        return 16 + zlib.MAX_WBITS  # gzip
    # "deflate" means zlib-wrapped per RFC 9110, but some senders use raw deflate; the header tells.
    return zlib.MAX_WBITS if _zlib_header(head) else -zlib.MAX_WBITS


def _zlib_header(head: bytes) -> bool:
    """Whether `head` starts like zlib data (RFC 1950: the deflate method, and a header that checks)."""
    return len(head) >= 2 and head[0] & 0x0F == 8 and ((head[0] << 8) | head[1]) % 31 == 0


def sniffed_encoding(data: bytes) -> str | None:
    """"gzip" or "deflate" (zlib-wrapped) when `data` starts like such compressed data, whatever it was
    declared as; None otherwise (raw deflate has no header to tell it by)."""
    if data.startswith(GZIP_MAGIC[:2]):
        return "gzip"
    return "deflate" if _zlib_header(data) else None


def decompress_capped(data: bytes, encoding: str, cap: int) -> bytes:
    """The whole decoded body (every gzip member, then any trailing bytes as they are), at most `cap` bytes.

    A `deflate` body in the one reading its first two bytes suggest: request bodies use deflate_readings."""
    out = bytearray()
    rest = data
    while rest:
        decoder = zlib.decompressobj(_wbits(encoding, rest))
        try:
            out += decoder.decompress(rest, cap + 1 - len(out))
        except zlib.error as exc:
            raise DecodeError(str(exc)) from None
        if len(out) > cap or decoder.unconsumed_tail:
            raise TooLarge()
        if not decoder.eof:
            raise DecodeError("the compressed data is truncated")
        rest = decoder.unused_data
        if encoding != "deflate":
            rest = rest.lstrip(b"\0")  # zero padding between gzip members, which gzip itself skips
        if encoding == "deflate" or not rest.startswith(GZIP_MAGIC):
            out += rest  # trailing bytes an upstream might still read: inspect them as they are
            break
    if len(out) > cap:
        raise TooLarge()
    return bytes(out)


class Readings(NamedTuple):
    """What each reading of a `deflate` body decodes to, and whether it can be inspected as a whole."""

    decoded: list[bytes]  # every reading that decodes something: whole, or up to where it breaks off
    whole: bool  # some reading decodes to its end, and none breaks off after decoding something


# zlib (RFC 1950), raw deflate (RFC 1951), and gzip, which zlib's auto-detection (wbits 32 + 15) takes a
# body starting with 1f 8b for; a gzip reading is decoded as gzip bodies are (every member).
_ZLIB, _RAW, _GZIP = zlib.MAX_WBITS, -zlib.MAX_WBITS, 16 + zlib.MAX_WBITS


def deflate_readings(data: bytes, cap: int) -> Readings:
    """Every reading of a `deflate` body that decodes anything, all of them together at most `cap` bytes.

    A reading that fails before decoding a byte (raw deflate of a zlib body fails on its 5th byte, zlib of a
    raw one on its 2nd) is no reading: nothing could reach an upstream that way. One that decodes something
    and then breaks off or is cut short is inspected as far as it decodes, and makes the body not whole:
    an upstream reading it that way gets those bytes and an error, and what it does with them is unknown.
    TooLarge once the readings together pass `cap`, so a body costs no more to decode and inspect than one
    sent plain, however many readings it has."""
    if not data:
        return Readings([], True)
    decoded: list[bytes] = []
    whole = broken = False
    room = cap
    for wbits in (_ZLIB, _RAW, _GZIP) if data.startswith(GZIP_MAGIC[:2]) else (_ZLIB, _RAW):
        out, ended, started = _reading(data, wbits, room)
        if out:
            decoded.append(out)
            room -= len(out)
        whole |= ended
        broken |= started and not ended
    return Readings(decoded, whole and not broken)


def _reading(data: bytes, wbits: int, room: int) -> tuple[bytes, bool, bool]:
    """What `data` decodes to read one way; whether it decodes to its end (its output then followed by any
    trailing bytes as they are, as decompress_capped has them); whether it decoded anything (or may have).
    TooLarge past `room` bytes."""
    out = bytearray()
    rest = data
    while True:
        decoder = zlib.decompressobj(wbits)
        try:
            out += decoder.decompress(rest, room + 1 - len(out))
        except zlib.error:
            # The failing call's output is lost: decode again up to the byte the error was found in (zlib
            # leaves the input after it in unconsumed_tail). A few bytes, in the common case.
            failed_at = len(rest) - len(decoder.unconsumed_tail) - 1
            try:
                out += zlib.decompressobj(wbits).decompress(rest[:max(failed_at, 0)], room + 1 - len(out))
            except zlib.error:
                return bytes(out), False, True  # not seen to happen: how far it decoded is unknown
            if len(out) > room:
                raise TooLarge() from None
            return bytes(out), False, bool(out)
        if len(out) > room or decoder.unconsumed_tail:
            raise TooLarge()
        if not decoder.eof:
            return bytes(out), False, bool(out)  # cut short
        rest = decoder.unused_data
        if wbits == _GZIP:
            rest = rest.lstrip(b"\0")
            if rest.startswith(GZIP_MAGIC):
                continue
        out += rest
        if len(out) > room:
            raise TooLarge()
        return bytes(out), True, True


def decodable_prefix(data: bytes, encoding: str, cap: int) -> bytes:
    """What decodes from the start of `data` before it breaks off or turns invalid, at most `cap` bytes.

    For a body that only looks compressed (an upload that starts like gzip, cut short or damaged): `gunzip`
    still prints what it could decode before complaining, so an upstream may read it too."""
    out = bytearray()
    rest = data
    while rest and len(out) < cap:
        decoder = zlib.decompressobj(_wbits(encoding, rest))
        after = b""  # the input past the slice in which the member ended
        try:
            for start in range(0, len(rest), STEP):  # in slices: a fault late in the data keeps what came before
                out += decoder.decompress(rest[start:start + STEP], cap - len(out))
                if decoder.eof:
                    after = rest[start + STEP:]
                    break
                if decoder.unconsumed_tail or len(out) >= cap:
                    return bytes(out[:cap])
        except zlib.error:
            break
        if not decoder.eof:
            break
        rest = decoder.unused_data + after
        if encoding == "deflate":
            break
        rest = rest.lstrip(b"\0")
        if not rest.startswith(GZIP_MAGIC):
            break
    return bytes(out[:cap])


class StreamDecoder:
    """Incremental gzip/deflate for a response body, in pieces of at most STEP bytes.

    Whatever the upstream's chunk boundaries: the first 2 bytes of a deflate body (which tell zlib from
    raw deflate) and the 3 bytes after a gzip member's end (another member, or not) are awaited before
    they are judged. Zero bytes between and after gzip members are skipped, as gzip itself does."""

    def __init__(self, encoding: str) -> None:
        self._encoding = encoding
        self._decoder: zlib._Decompress | None = None
        self._done = False  # the current member (or the deflate stream) has ended
        self._held = b""  # too few bytes yet to judge (see above)

    def feed(self, chunk: bytes) -> Iterator[bytes]:
        data = self._held + chunk if self._held else chunk
        self._held = b""
        while data:
            if self._done:
                if self._encoding == "deflate":
                    raise DecodeError("data after the end of the compressed stream")
                data = data.lstrip(b"\0")
                if len(data) < len(GZIP_MAGIC) and GZIP_MAGIC.startswith(data):
                    self._held = data  # empty, or perhaps the start of the next member
                    return
                if not data.startswith(GZIP_MAGIC):
                    raise DecodeError("data after the end of the compressed stream")
                self._decoder, self._done = None, False
            if self._decoder is None:
                if self._encoding == "deflate" and len(data) < 2:
                    self._held = data
                    return
                self._decoder = zlib.decompressobj(_wbits(self._encoding, data))
            decoder = self._decoder
            try:
                piece = decoder.decompress(data, STEP)
                if piece:
                    yield piece
                # At the end of a member or stream reached on the tail, CPython leaves what follows in both
                # unused_data and unconsumed_tail, and decodes nothing more from it: test eof, or loop forever.
                while decoder.unconsumed_tail and not decoder.eof:
                    piece = decoder.decompress(decoder.unconsumed_tail, STEP)
                    if piece:
                        yield piece
            except zlib.error as exc:
                raise DecodeError(str(exc)) from None
            data = b""
            if decoder.eof:
                self._done = True
                data = decoder.unused_data

    def finish(self) -> bytes:
        if self._held:  # a deflate body of 1 byte, or a gzip member's end followed by part of a magic
            raise DecodeError("the compressed response is truncated" if not self._done
                              else "data after the end of the compressed stream")
        if self._decoder is not None and not self._done:
            try:
                tail = self._decoder.flush()
            except zlib.error as exc:
                raise DecodeError(str(exc)) from None
            if not self._decoder.eof:
                raise DecodeError("the compressed response is truncated")
            return tail
        return b""
