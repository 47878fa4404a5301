"""The response side of step 11: the agent never reads back the secret the gate injected.

Active for credentials whose body inspection is `warn` or `block`. Header values are redacted whole; a
header whose name holds the secret is dropped. The body streams through a StreamRedactor, which replaces the
secret's forms as they are and then, with every JSON string escape undone (PHP and .NET escape characters of
a secret), again, and holds back at the end of a chunk the run after its last whitespace (at most a power of
two past the longest form, escaped; what it holds must not depend on the secrets), so SSE and NDJSON streams
keep flowing. Redaction changes the body's length, so such a response
loses the upstream's Content-Length and is sent chunked. The gate asks the upstream for `Accept-Encoding:
identity` and the whole body (no Range); a gzip or deflate body sent anyway is decoded, redacted and
forwarded plain; any other encoding cannot be redacted and is refused (502 `response_not_redactable`). The
upstream's reason phrase is not passed on: the agent gets the standard one for the status.

A compressed body is decoded in pieces of at most STEP bytes, and the event loop gets a turn after
each: writing to an agent that keeps reading never waits, so without that one upstream chunk (a few
hundred KB of gzip can hold hundreds of MiB) would be decoded, redacted and written in one go while
every other connection waited.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Protocol

from multidict import CIMultiDict

from aegisd.gate.refusal import Refusal
from aegisd.gate.routing import Route
from aegisd.gate.upstream import UpstreamBroken
from aegisd.gate.wire import status_allows_body
from aegisd.inspection import Inspector, Redaction
from aegisd.inspection.decompress import (
    DECODABLE,
    GZIP_MAGIC,
    DecodeError,
    StreamDecoder,
    decodable_prefix,
    sniffed_encoding,
)

REDACTED_FLAG = "response_redacted"
HEADER_DROPPED_FLAG = "response_header_dropped"  # with REDACTED_FLAG: a header whose name held the secret

log = logging.getLogger("aegisd.gate")


class Flagged(Protocol):
    flags: str
    request_id: str


class UpstreamBodyUndecodable(UpstreamBroken):
    """The upstream's compressed body is corrupt: handled like any other broken upstream body."""


def redaction_for(route: Route, inspector: Inspector) -> Redaction | None:
    """The redaction to apply to this credential's responses, or None when its inspection is off."""
    if route.body_inspection == "off":
        return None
    return inspector.redaction(route.credential_id)


def ask_redactable(headers: CIMultiDict[str]) -> None:
    """Outbound: ask for the whole response, uncompressed, which can be redacted as it streams. No Range or
    If-Range: two ranges that each hold half of an echoed secret would each pass redaction."""
    headers["Accept-Encoding"] = "identity"
    headers.popall("Range", None)
    headers.popall("If-Range", None)


class ResponseRedactor:
    """One response: header values redacted at once, the body chunk by chunk."""

    def __init__(self, redaction: Redaction, x: Flagged) -> None:
        self._redaction = redaction
        self._x = x
        self._stream = redaction.stream()
        self._decoder: StreamDecoder | None = None
        self._encoding: str | None = None  # the Content-Encoding the gate decodes, if any
        self._flagged = False
        self.streams_body = False  # set by headers(): the body passes through here, so its length may change

    def headers(self, headers: CIMultiDict[str], method: str, status: int) -> CIMultiDict[str]:
        """The response headers to send, redacted; raises a Refusal if the body cannot be redacted."""
        out = headers
        # One look over every name and value first: nearly every answer has no echo (nor an escape that could
        # spell one), and then nothing is rebuilt. A hit (perhaps one spanning two of them) is settled header by
        # header, both stages each (`redact_all`), and any replacement flags the row. A header whose name holds
        # a form of the secret is dropped whole: its name is what the agent reads it by, and a redacted one
        # would only be another header.
        joined = "\n".join([*headers.keys(), *headers.values()]).encode("utf-8", "surrogateescape")
        if not self._redaction.clean(joined):
            out = CIMultiDict()
            dropped = 0
            for name, value in headers.items():
                if self._redaction.redact_all(name.encode("utf-8", "surrogateescape"))[1]:
                    dropped += 1
                    continue
                redacted, count = self._redaction.redact_all(value.encode("utf-8", "surrogateescape"))
                if count:
                    self._flag()
                    value = redacted.decode("utf-8", "surrogateescape")
                out.add(name, value)
            if dropped:
                self._flag()
                self._x.flags += f",{HEADER_DROPPED_FLAG}"
                log.warning("request %s: dropped %d upstream response header(s) whose name held the credential's "
                            "secret", self._x.request_id, dropped)  # never the name: it holds the secret
        self.streams_body = self.has_body(method, status)
        if self.streams_body:
            encoding = ", ".join(out.getall("Content-Encoding", [])).strip().lower()
            if encoding in DECODABLE:
                self._decoder, self._encoding = StreamDecoder(encoding), encoding
                out.popall("Content-Encoding")
            elif encoding not in ("", "identity"):
                raise Refusal(502, "response_not_redactable", f"the upstream answered with Content-Encoding "
                              f"{encoding!r}, which the gate cannot redact")
        return out

    async def refuse_undeclared_compression(self, body: bytes, cap: int) -> None:
        """A whole answer that is gzip or zlib data without a Content-Encoding saying so (a `.gz` download,
        `application/gzip`), or that a declared Content-Encoding wraps (one level), is refused if what decodes
        of it (its first `cap` bytes, up to where it breaks off if it is damaged or cut short, as gunzip prints
        what it can) holds a form of a secret: the agent can decompress it itself, and redacting the
        compressed bytes would change nothing. Decoding and searching up to `cap` bytes (1 MiB) takes a worker
        thread, not the event loop (found at the 29th stop: 250 ms of the loop for 1 KB of gzip)."""
        if self._encoding is None and sniffed_encoding(body) is None:
            return  # the usual case: a plain answer, told from its first bytes
        if await asyncio.to_thread(self._holds_compressed_secret, body, cap):
            raise Refusal(502, "response_not_redactable", "the upstream's answer is compressed data (without a "
                          "Content-Encoding saying so, or inside the one it declares) that holds a credential's secret")

    def _holds_compressed_secret(self, body: bytes, cap: int) -> bool:
        if self._encoding is not None:  # decoded by the gate: what the agent gets may itself be compressed
            if sniffed_encoding(decodable_prefix(body, self._encoding, cap, enough=len(GZIP_MAGIC))) is None:
                return False  # the usual case, found from the first bytes it decodes to
            body = decodable_prefix(body, self._encoding, cap)
        encoding = sniffed_encoding(body)
        # Only for a form that is there, at a cost that does not depend on what the secrets hold (`Redaction.holds`):
        # refused whenever `clean` was unsure, an escape of any character of the group's secrets was refused, which
        # told an upstream which characters they hold (29th stop).
        return encoding is not None and self._redaction.holds(decodable_prefix(body, encoding, cap))

    @staticmethod
    def has_body(method: str, status: int) -> bool:
        return method != "HEAD" and status_allows_body(status)

    @property
    def decodes(self) -> bool:
        """Whether the body is compressed: one upstream chunk may then become many pieces."""
        return self._decoder is not None

    async def filter(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        """The upstream's body chunks in, the agent's redacted chunks out (the held tail at the end)."""
        decodes = self._decoder is not None
        async for chunk in chunks:
            for piece in self.feed(chunk):
                if piece:
                    yield piece
                if decodes:
                    # The next piece comes from the same chunk: let others run first (after an empty one too,
                    # which stands for input that decoded to nothing: gzip members that hold no data).
                    await asyncio.sleep(0)
        tail = self.finish()
        if tail:
            yield tail

    def feed(self, chunk: bytes) -> Iterator[bytes]:
        """Redacted output for one upstream chunk, in pieces (decoded pieces are bounded in size, and so is the
        input behind each: an empty piece stands for input that decoded to nothing, a turn for others)."""
        pieces = self._decoder.feed(chunk) if self._decoder is not None else iter((chunk,))
        while True:
            try:
                piece = next(pieces)  # one bounded piece at a time: the caller's writes pace the decoder
            except StopIteration:
                return
            except DecodeError:
                raise UpstreamBodyUndecodable("the upstream's compressed body is invalid") from None
            out = self._stream.feed(piece) if piece else b""
            self._check()
            if out or self._decoder is not None:  # a decoded piece, even one held back whole: a turn for others
                yield out

    def finish(self) -> bytes:
        """What is still held back, redacted; call once the upstream body has ended."""
        try:
            tail = self._decoder.finish() if self._decoder is not None else b""
        except DecodeError:
            raise UpstreamBodyUndecodable("the upstream's compressed body is truncated") from None
        out = self._stream.feed(tail) + self._stream.finish()
        self._check()
        return out

    def _check(self) -> None:
        if self._stream.replaced and not self._flagged:
            self._flag()

    def _flag(self) -> None:
        if not self._flagged:
            self._flagged = True
            self._x.flags = f"{self._x.flags},{REDACTED_FLAG}" if self._x.flags else REDACTED_FLAG
