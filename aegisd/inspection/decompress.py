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

import re
import zlib
from collections.abc import Iterator
from typing import NamedTuple

GZIP_MAGIC = b"\x1f\x8b\x08"
DECODABLE = frozenset({"gzip", "x-gzip", "deflate"})
STEP = 64 * 1024
# A decoder is fed slices of the input, this many bytes first and twice as many each time after, up to STEP.
FIRST_SLICE = 64
# Each gzip member after the first costs a few microseconds of Python besides its data (a decoder, a call, a
# look at what follows), so it counts as this many bytes against the cap on what a body decodes to: a body of
# 20-byte empty members decodes to nothing, and would otherwise be bounded only by its own size.
MEMBER_COST = 256
_NONZERO = re.compile(rb"[^\0]")

# zlib (RFC 1950), raw deflate (RFC 1951), and gzip, which zlib's auto-detection (wbits 32 + 15) takes a
# body starting with 1f 8b for; a gzip reading is decoded as gzip bodies are (every member).
_ZLIB, _RAW, _GZIP = zlib.MAX_WBITS, -zlib.MAX_WBITS, 16 + zlib.MAX_WBITS
_FHCRC, _FEXTRA, _FNAME, _FCOMMENT, _RESERVED = 0x02, 0x04, 0x08, 0x10, 0xE0  # a gzip header's flag bits (RFC 1952)
GZIP_TRAILER = 8  # CRC32 and size


class DecodeError(Exception):
    """The data is not valid for its declared encoding."""


class TooLarge(Exception):
    """The decoded data would exceed the cap."""


def _wbits(encoding: str, head: bytes) -> int:
    if encoding != "deflate":
        return _GZIP
    # "deflate" means zlib-wrapped per RFC 9110, but some senders use raw deflate; the header tells.
    return _ZLIB if _zlib_header(head) else _RAW


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
    """The whole decoded body (every gzip member, then any trailing bytes as they are), at most `cap` bytes
    (each gzip member after the first counting MEMBER_COST bytes besides what it decodes to).

    A `deflate` body in the one reading its first two bytes suggest: request bodies use deflate_readings."""
    if not data:
        return b""
    run = _decode(data, _wbits(encoding, data), cap)
    if not run.ended:
        raise DecodeError(run.error)
    return run.out


class Decoded(NamedTuple):
    """One reading of a body: what it decodes to, and how far it got."""

    out: bytes  # whole (then followed by any trailing bytes as they are), or up to where it breaks off
    ended: bool  # decodes to its end
    started: bool  # decoded something, or may have: a reading that fails before its first byte is none
    spent: int  # what it counts against the cap: len(out), plus MEMBER_COST for each gzip member after the first
    error: str = ""  # why it did not end


def gzip_reading(data: bytes, cap: int) -> Decoded:
    """A gzip body (every member, past zero padding) as far as it decodes: whole, or up to where it breaks
    off or is cut short, as `gunzip` prints what it can before it complains. TooLarge past `cap`."""
    return _decode(data, _GZIP, cap)


class Readings(NamedTuple):
    """What each reading of a `deflate` body decodes to, and whether it can be inspected as a whole."""

    decoded: list[bytes]  # every reading that decodes something: whole, or up to where it breaks off
    whole: bool  # some reading decodes to its end, and none breaks off after decoding something


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
        run = _decode(data, wbits, room)
        if run.out:
            decoded.append(run.out)
        room -= run.spent
        whole |= run.ended
        broken |= run.started and not run.ended
    return Readings(decoded, whole and not broken)


def decodable_prefix(data: bytes, encoding: str, cap: int, enough: int | None = None) -> bytes:
    """What decodes from the start of `data` before it breaks off or turns invalid, at most `cap` bytes
    (each gzip member after the first counting MEMBER_COST of them): never TooLarge, never DecodeError.
    With `enough`, decoding stops once at least that many bytes are out (a look at how it starts).

    For data that only looks compressed (an answer that is a `.gz` without a Content-Encoding, perhaps cut
    short or damaged): `gunzip` still prints what it could decode before complaining."""
    return _decode(data, _wbits(encoding, data), cap, truncate=True, enough=enough).out


def _decode(data: bytes, wbits: int, room: int, truncate: bool = False, enough: int | None = None) -> Decoded:
    """`data` read one way; for gzip every member, past zero padding, then any trailing bytes as they are.

    At most `room` bytes, each gzip member after the first counting MEMBER_COST besides its output: past that
    TooLarge, or with `truncate` what decoded up to it (also once `enough` bytes are out, when given).

    A member's decoder is fed slices of the input, FIRST_SLICE bytes first and doubling up to STEP, so what
    zlib copies at a member's end (the rest of the slice it was given, as unused_data) is at most about the
    member's own size: fed the rest of the body each time, a body of N minimal members (20 bytes each) copied
    about N^2 * 10 bytes and decoded to nothing (10 MiB of them: 344 s)."""
    out = bytearray()
    view = memoryview(data)
    pos = charge = 0

    def over() -> Decoded:
        if not truncate:
            raise TooLarge()
        del out[max(room - charge, 0):]
        return Decoded(bytes(out), False, True, len(out) + charge)

    while True:
        member_wbits, trailer = wbits, 0
        if wbits == _GZIP and (header := _lenient_header(data, pos)):  # read as Python's gzip reads it
            member_wbits, trailer, pos = _RAW, GZIP_TRAILER, pos + header
        member_pos, member_out = pos, len(out)
        decoder = zlib.decompressobj(member_wbits)
        span = FIRST_SLICE
        while not decoder.eof:
            if pos >= len(data):
                return Decoded(bytes(out), False, bool(out), len(out) + charge, "the compressed data is truncated")
            piece = view[pos:pos + span]
            span = min(2 * span, STEP)
            try:
                out += decoder.decompress(piece, room + 1 - charge - len(out))
            except zlib.error as exc:
                # The failing call's output is lost: decode the member again up to the byte the error was found
                # in (zlib leaves the input after it in unconsumed_tail). A CRC or a data error is found in the
                # same slice as the data before it.
                failed_at = pos + len(piece) - len(decoder.unconsumed_tail) - 1
                del out[member_out:]
                try:
                    out += zlib.decompressobj(member_wbits).decompress(view[member_pos:max(failed_at, member_pos)],
                                                                       room + 1 - charge - len(out))
                except zlib.error:  # not seen to happen: how far it decoded is unknown
                    return Decoded(bytes(out), False, True, len(out) + charge, str(exc))
                if len(out) + charge > room:
                    return over()
                return Decoded(bytes(out), False, bool(out), len(out) + charge, str(exc))
            if len(out) + charge > room or (decoder.unconsumed_tail and not decoder.eof):
                return over()
            if enough is not None and len(out) >= enough:
                return Decoded(bytes(out), False, True, len(out) + charge)
            # At a member's end what follows it in the slice is left in unused_data (a bounded copy).
            pos += len(piece) - len(decoder.unused_data) if decoder.eof else len(piece)
        pos = min(pos + trailer, len(data))  # a header zlib would refuse: its CRC32 and size are not checked
        if wbits == _GZIP:
            if not data.startswith(GZIP_MAGIC, pos):
                pos = _past_zeros(data, pos)  # zero padding between gzip members, which gzip itself skips
            if data.startswith(GZIP_MAGIC, pos):
                if len(out) + charge + MEMBER_COST > room:
                    return over()  # what decoded so far fits: with `truncate`, all of it
                charge += MEMBER_COST
                continue
        out += view[pos:pos + room + 1 - charge - len(out)]  # trailing bytes an upstream might still read
        if len(out) + charge > room:
            return over()
        return Decoded(bytes(out), True, True, len(out) + charge)


def _lenient_header(data: bytes, pos: int) -> int:
    """The length of the gzip header at `pos` when zlib would refuse it and Python's gzip (and so an upstream,
    and the agent fetching the upload back) reads it: reserved flag bits set, or a header CRC, which zlib
    checks and gzip does not. Then the member is inflated raw after it. 0 for any other header, whole or cut
    short, which zlib reads (or refuses) as gzip does."""
    if len(data) < pos + 10 or not data.startswith(GZIP_MAGIC, pos) or not data[pos + 3] & (_FHCRC | _RESERVED):
        return 0
    flags, at = data[pos + 3], pos + 10
    if flags & _FEXTRA:
        if len(data) < at + 2:
            return 0
        at += 2 + int.from_bytes(data[at:at + 2], "little")
    for field in (_FNAME, _FCOMMENT):
        if flags & field:
            end = data.find(b"\0", at)
            if end < 0:
                return 0
            at = end + 1
    if flags & _FHCRC:
        at += 2
    return at - pos if at <= len(data) else 0


def _past_zeros(data: bytes, pos: int) -> int:
    nonzero = _NONZERO.search(data, pos)
    return nonzero.start() if nonzero else len(data)


class StreamDecoder:
    """Incremental gzip/deflate for a response body, in pieces of at most STEP bytes.

    Whatever the upstream's chunk boundaries: the first 2 bytes of a deflate body (which tell zlib from
    raw deflate) and the 3 bytes after a gzip member's end (another member, or not) are awaited before
    they are judged. Zero bytes between and after gzip members are skipped, as gzip itself does.

    Decoders are fed slices of each chunk as `_decode` feeds them (so a member's end copies at most about its
    own size), and an empty piece is yielded after every STEP bytes of input (each member counting
    MEMBER_COST) that decoded to nothing, however it was chunked: members that decode to nothing still give
    the caller its turn."""

    def __init__(self, encoding: str) -> None:
        self._encoding = encoding
        self._decoder: zlib._Decompress | None = None
        self._done = False  # the current member (or the deflate stream) has ended
        self._held = b""  # too few bytes yet to judge (see above)
        self._span = FIRST_SLICE  # the next slice to feed the current member's decoder
        self._idle = 0  # input (each new member counting MEMBER_COST) since the last piece, across chunks

    def feed(self, chunk: bytes) -> Iterator[bytes]:
        data = self._held + chunk if self._held else chunk
        self._held = b""
        view = memoryview(data)
        pos = 0
        while pos < len(data):
            if self._done:
                if self._encoding == "deflate":
                    raise DecodeError("data after the end of the compressed stream")
                if not data.startswith(GZIP_MAGIC, pos):
                    pos = _past_zeros(data, pos)
                if len(data) - pos < len(GZIP_MAGIC) and GZIP_MAGIC.startswith(data[pos:]):
                    self._held = data[pos:]  # empty, or perhaps the start of the next member
                    return
                if not data.startswith(GZIP_MAGIC, pos):
                    raise DecodeError("data after the end of the compressed stream")
                self._decoder, self._done, self._span = None, False, FIRST_SLICE
                self._idle += MEMBER_COST
            if self._decoder is None:
                if self._encoding == "deflate" and len(data) - pos < 2:
                    self._held = data[pos:]
                    return
                self._decoder = zlib.decompressobj(_wbits(self._encoding, data[pos:pos + 2]))
            decoder = self._decoder
            piece_in = view[pos:pos + self._span]
            self._span = min(2 * self._span, STEP)
            try:
                piece = decoder.decompress(piece_in, STEP)
                if piece:
                    self._idle = 0
                    yield piece
                # At the end of a member or stream reached on the tail, CPython leaves what follows in both
                # unused_data and unconsumed_tail, and decodes nothing more from it: test eof, or loop forever.
                while decoder.unconsumed_tail and not decoder.eof:
                    piece = decoder.decompress(decoder.unconsumed_tail, STEP)
                    if piece:
                        self._idle = 0
                        yield piece
            except zlib.error as exc:
                raise DecodeError(str(exc)) from None
            # What follows a member's end in its slice is in unused_data; otherwise the slice was all consumed.
            used = len(piece_in) - len(decoder.unused_data) if decoder.eof else len(piece_in)
            pos += used
            self._idle += used
            if decoder.eof:
                self._done = True
            if self._idle >= STEP:
                self._idle = 0
                yield b""

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
