"""The gate's server side: one agent connection, its requests parsed by llhttp, each answered in turn.

It replaced aiohttp's server, whose request and response objects cost the gate more CPU per request
than several of its own checks, and whose import held ~14 MiB of the daemon's memory. llhttp (through
httptools, as on the upstream side) makes every framing decision; what is ours is small:

- one task per connection runs the pipeline for one request at a time; a pipelined next request is
  parsed and held, and the agent is not read further until its turn;
- a request body is handed over as it arrives, and the agent is read no faster than it is taken;
- answers are framed by Content-Length, chunked, or for HTTP/1.0 by closing the connection;
- a connection whose request body was not read is kept only if little of it is left to drop, and
  otherwise closed once the rest has arrived (or after LINGER_SECONDS), never with unread data,
  which would make the kernel reset the connection and could destroy the answer in flight;
- what llhttp refuses still becomes a request for the pipeline to refuse and record (400, or 431
  for a head over MAX_HEAD_BYTES: a complete head is measured exactly; one still arriving is measured
  after each read, from the read after the one it began in, so it is cut within a read or two past the
  limit); idle connections are closed by GateServer's sweep.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Mapping
from email.utils import formatdate
from http import HTTPStatus
from typing import Protocol, cast

import httptools
from multidict import CIMultiDict, CIMultiDictProxy

from aegisd.gate.wire import LAST_CHUNK, encode_head, frame_chunk

log = logging.getLogger("aegisd.gate")

MAX_HEAD_BYTES = 64 * 1024  # the request line and headers
DISCARD_MAX = 64 * 1024  # an unread body with at most this much still to come is dropped as it arrives
LINGER_SECONDS = 1.0  # how long a closing connection waits for the rest of a body it will not read
_HIGH_WATER = 256 * 1024  # request body bytes buffered before the agent is read no faster
_LOW_WATER = 64 * 1024
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_REASONS = {status.value: status.phrase for status in HTTPStatus}
_NO_HEADERS: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())


class RequestHandler(Protocol):
    """The pipeline, as a connection sees it: it answers every request through the request's methods."""

    async def handle(self, request: GateRequest) -> None: ...

    async def refuse_malformed(self, request: GateRequest, status: int, message: str) -> None: ...


class AgentGone(ConnectionResetError):
    """The agent's connection closed while the gate was reading from or writing to it."""


class BodyMalformed(ConnectionError):
    """llhttp refused the request body's framing (bad chunk sizes, say) part way through."""


class GateRequest:
    """One request as parsed (method, raw target, headers), its body as it arrives, and its answer."""

    __slots__ = ("_body_allowed", "_buffered", "_chunked", "_chunks", "_close", "_complete", "_conn", "_continued",
                 "_discard", "_error", "_received", "_waiter", "content_length", "finished", "has_body", "headers",
                 "http11", "keep_alive", "malformed", "method", "raw_path", "started")

    def __init__(self, conn: AgentConnection, method: str, raw_path: str, headers: CIMultiDictProxy[str],
                 http11: bool, keep_alive: bool) -> None:
        self._conn = conn
        self.method = method
        self.raw_path = raw_path
        self.headers = headers
        self.http11 = http11
        self.keep_alive = keep_alive
        length = headers.get("Content-Length")
        self.content_length = int(length) if length is not None and "Transfer-Encoding" not in headers else None
        self.has_body = bool(self.content_length) or "Transfer-Encoding" in headers
        self.malformed: tuple[int, str] | None = None  # (status, message) when llhttp refused the request
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = self._received = 0
        self._complete = not self.has_body
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._discard = False
        self.started = self.finished = False
        self._chunked = self._close = self._continued = False
        self._body_allowed = True

    # -- the body ------------------------------------------------------------------------------------

    async def body(self) -> AsyncIterator[bytes]:
        """The body as it arrives; raises AgentGone or BodyMalformed if it ends early or broken."""
        while True:
            if self._chunks:
                chunk = self._chunks.popleft()
                self._buffered -= len(chunk)
                if self._buffered <= _LOW_WATER:
                    self._conn.body_taken()
                yield chunk
            elif self._error is not None:
                raise self._error
            elif self._complete:
                return
            else:
                self._waiter = self._conn.loop.create_future()
                self._conn.waiting_since = self._conn.loop.time()
                try:
                    await self._waiter
                finally:
                    self._waiter = None
                    self._conn.waiting_since = None

    @property
    def body_complete(self) -> bool:
        return self._complete and self._error is None

    def _feed(self, data: bytes) -> None:
        self._received += len(data)
        if self._discard:
            return
        self._chunks.append(data)
        self._buffered += len(data)
        self._wake()

    def _end(self, error: BaseException | None = None) -> None:
        if not self._complete:
            self._complete = True
            self._error = error
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _left_to_drop(self) -> int | None:
        """Body bytes still to come, if known; None for a chunked body (however much it still has)."""
        if self._complete:
            return 0
        return None if self.content_length is None else self.content_length - self._received

    def _drop_rest(self) -> None:
        self._discard = True
        self._chunks.clear()
        self._buffered = 0
        self._conn.body_taken()

    # -- the answer ------------------------------------------------------------------------------------

    async def send_continue(self) -> None:
        """Answer `Expect: 100-continue` (an HTTP/1.1 client waiting to send its body)."""
        if self.http11 and not self.started and not self._continued and self._received == 0 and not self._complete:
            self._continued = True
            self._conn.write(_CONTINUE)

    async def respond(self, status: int, body: bytes, headers: Mapping[str, str], *,
                      reason: str | None = None, close: bool = False) -> None:
        """The whole answer in one write, framed by its Content-Length (no body bytes for a HEAD; neither
        body nor length for a 1xx, 204 or 304)."""
        self._begin(close)
        bodiless = status in (204, 304) or status < 200
        framing = [] if bodiless else [("Content-Length", str(len(body)))]
        head = self._head(status, reason, headers, framing)
        self.started = True
        self._conn.write(head if self.method == "HEAD" or bodiless else head + body)
        self.finished = True
        await self._conn.drain()

    async def start(self, status: int, headers: Mapping[str, str], *, reason: str | None = None,
                    content_length: int | None = None) -> None:
        """Send the answer's head; its body follows through `write` (ignored where the answer can have
        none: HEAD, 1xx, 204, 304) and ends with `end`."""
        self._begin(False)
        framing: list[tuple[str, str]] = []
        if self.method == "HEAD" or status in (204, 304) or status < 200:
            self._body_allowed = False
            if content_length is not None and status != 204:
                framing.append(("Content-Length", str(content_length)))
        elif content_length is not None:
            framing.append(("Content-Length", str(content_length)))
        elif self.http11:
            framing.append(("Transfer-Encoding", "chunked"))
            self._chunked = True
        else:  # HTTP/1.0 knows no chunks: the body ends where the connection does
            self._close = True
        head = self._head(status, reason, headers, framing)
        self.started = True
        self._conn.write(head)
        await self._conn.drain()

    async def write(self, chunk: bytes) -> None:
        if not chunk or not self._body_allowed:
            return
        self._conn.write(frame_chunk(chunk) if self._chunked else chunk)
        await self._conn.drain()

    async def end(self) -> None:
        if self._chunked:
            self._conn.write(LAST_CHUNK)
        self.finished = True
        await self._conn.drain()

    def abort(self) -> None:
        """Cut the connection: the agent sees a truncated answer, never a falsely complete one."""
        self._conn.abort()

    def _begin(self, close: bool) -> None:
        if self.started:
            raise RuntimeError("this request's answer has already begun")
        conn = self._conn
        if conn.closed:
            raise AgentGone("the agent closed the connection")
        left = self._left_to_drop()
        self._close = (close or not self.keep_alive or conn.closing or (conn.ends_after_this and not conn._queued)
                       or left is None or left > DISCARD_MAX or self._error is not None)

    def _head(self, status: int, reason: str | None, headers: Mapping[str, str],
              framing: list[tuple[str, str]]) -> bytes:
        fields = list(headers.items())  # every value of a repeated field (a CIMultiDict's items)
        if "Date" not in headers:  # case-insensitive in a CIMultiDict; the gate's own answers never set it
            framing.append(("Date", http_date()))
        if self._close:
            framing.append(("Connection", "close"))
        elif not self.http11:
            framing.append(("Connection", "keep-alive"))
        fields += framing
        return encode_head(f"HTTP/1.1 {status} {reason or _REASONS.get(status, 'Unknown')}", fields)


_date = (0, "")


def http_date() -> str:
    """The Date field's value, formatted once a second."""
    global _date
    now = int(time.time())
    if _date[0] != now:
        _date = (now, formatdate(now, usegmt=True))
    return _date[1]


class AgentConnection(asyncio.Protocol):
    """One agent's TCP connection: parses with llhttp, runs `handler` for each request in turn."""

    def __init__(self, handler: RequestHandler, connections: set[AgentConnection]) -> None:
        self._handler = handler
        self._connections = connections
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._parsing: GateRequest | None = None  # the request whose body the parser is reading
        self._current: GateRequest | None = None  # the request being answered
        self._queued: collections.deque[GateRequest] = collections.deque()
        self._next: asyncio.Future[GateRequest | None] | None = None
        self._drain: asyncio.Future[None] | None = None
        self._paused = False
        self._head_open = False
        self._head_fed = self._head_fields = 0  # bytes fed while a head stays open; its fields' bytes
        self._url = b""
        self._raw: list[tuple[bytes, bytes]] = []
        self._broken = False  # llhttp failed: nothing more is parsed on this connection
        self._eof = False
        self.closed = False
        self.closing = False
        self.waiting_since: float | None = None  # since when the gate waits for the agent, for the idle sweep
        self.last_read = 0.0
        self._linger: asyncio.TimerHandle | None = None
        self.task: asyncio.Task[None] | None = None

    # -- asyncio ---------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is one without subclassing it
        self._connections.add(self)
        self.last_read = self.loop.time()
        self.task = self.loop.create_task(self._serve())

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._connections.discard(self)
        if self._linger is not None:
            self._linger.cancel()
        gone = AgentGone("the agent closed the connection")
        if self._parsing is not None:
            self._parsing._end(gone)
        for request in self._queued:
            request._end(gone)
        self._deliver(None)
        self.resume_writing()

    def data_received(self, data: bytes) -> None:
        self.last_read = self.loop.time()
        if self._broken:
            return
        head_was_open = self._head_open
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:  # Upgrade or CONNECT: the request is answered, then the connection ends
            self._stop_parsing()
        except httptools.HttpParserError as exc:
            self._malformed(400, f"the request is not valid HTTP/1.1 ({_llhttp_reason(exc)})")
            return
        if head_was_open and self._head_open:
            self._head_fed += len(data)
            if self._head_fed > MAX_HEAD_BYTES:
                self._malformed(431, f"the request line and headers are larger than {MAX_HEAD_BYTES} bytes")

    def eof_received(self) -> bool:
        """The agent will send nothing more; answer what it asked, then close (keeps half-closed clients)."""
        self._eof = True
        if self._parsing is not None:
            self._parsing._end(AgentGone("the agent ended the request early"))
            self._parsing = None
        if self._current is None and not self._queued:
            self._deliver(None)
        return True

    def pause_writing(self) -> None:
        if self._drain is None:
            self._drain = self.loop.create_future()

    def resume_writing(self) -> None:
        drain, self._drain = self._drain, None
        if drain is not None and not drain.done():
            drain.set_result(None)

    # -- llhttp's callbacks ---------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._head_open = True
        self._head_fed = self._head_fields = 0
        self._url = b""
        self._raw = []

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_fields += len(name) + len(value) + 4
        self._raw.append((name, value))

    def on_headers_complete(self) -> None:
        self._head_open = False
        parser = self._parser
        headers = CIMultiDict((name.decode("latin-1"), value.decode("utf-8", "surrogateescape"))
                              for name, value in self._raw)
        request = GateRequest(self, parser.get_method().decode("ascii"), self._url.decode("utf-8", "surrogateescape"),
                              CIMultiDictProxy(headers), parser.get_http_version() == "1.1",
                              parser.should_keep_alive())
        self._raw = []
        if self._head_fields + len(self._url) > MAX_HEAD_BYTES:
            request.malformed = (431, f"the request line and headers are larger than {MAX_HEAD_BYTES} bytes")
            self._stop_parsing()
        self._parsing = None if request.body_complete else request
        if not self.closing:
            self._deliver(request)

    def on_body(self, data: bytes) -> None:
        request = self._parsing
        if request is not None:
            request._feed(data)
            if request._buffered > _HIGH_WATER:
                self._pause_reading()

    def on_message_complete(self) -> None:
        request, self._parsing = self._parsing, None
        if request is not None:
            request._end()
        if self.closing:
            self._close_now()

    # -- serving -----------------------------------------------------------------------------------------

    async def _serve(self) -> None:
        while True:
            if self._queued:
                request: GateRequest | None = self._queued.popleft()
                self._update_reading()
            else:
                self._next = self.loop.create_future()
                self.waiting_since = self.loop.time()
                try:
                    request = await self._next
                finally:
                    self._next = None
                    self.waiting_since = None
            if request is None:
                self._close_now()
                return
            self._current = request
            await self._answer(request)
            self._current = None
            if self.closed:
                return
            if request._close or not request.finished or (self.ends_after_this and not self._queued):
                self._close_after(request)
                return
            request._drop_rest()  # unread: what is buffered (reading resumes) and what is still to come

    async def _answer(self, request: GateRequest) -> None:
        try:
            if request.malformed is not None:
                await self._handler.refuse_malformed(request, *request.malformed)
            else:
                await self._handler.handle(request)
        except ConnectionError:
            pass  # the agent left; the pipeline has recorded what it could
        except Exception as exc:  # a bug: say so, and never leave the agent waiting on a half answer
            log.error("the gate failed on a request: %s", type(exc).__name__)  # the type only: no data
            if not request.started and not self.closed:
                with contextlib.suppress(ConnectionError):
                    await request.respond(500, b"", {}, close=True)
        if not request.finished and not self.closed:
            self.abort()

    def _deliver(self, request: GateRequest | None) -> None:
        """Hand a parsed request (None: there will be no more) to `_serve`, or hold it until its turn."""
        waiter = self._next
        if waiter is not None and not waiter.done():
            waiter.set_result(request)
        elif request is not None:
            self._queued.append(request)
            self._update_reading()

    def _malformed(self, status: int, message: str) -> None:
        """llhttp refused what the agent sent: the body being read fails, or a stand-in request is refused."""
        method = _method_or_empty(self._parser) if self._head_open and self._url else ""  # else a stale one
        self._stop_parsing()
        request = self._parsing
        if request is not None:
            self._parsing = None
            if request is not self._current and request._received == 0:  # llhttp refused it right after its head
                request.malformed = (status, message)                    # (`Transfer-Encoding: gzip`): not begun
            request._end(BodyMalformed("the request body's framing is malformed"))
            return
        stand_in = GateRequest(self, method, "", _NO_HEADERS, True, False)
        stand_in.malformed = (status, message)
        self._deliver(stand_in)

    def _stop_parsing(self) -> None:
        self._broken = True
        self._head_open = False

    # -- flow control ------------------------------------------------------------------------------------

    def body_taken(self) -> None:
        self._update_reading()

    def _pause_reading(self) -> None:
        if not self._paused and self.transport is not None and not self.closed:
            self._paused = True
            self.transport.pause_reading()

    def _update_reading(self) -> None:
        """Read the agent unless a request waits its turn or a body is buffered past the high-water mark
        (and, once paused for that, until it is back under the low-water mark)."""
        parsing = self._parsing
        full = parsing is not None and parsing._buffered > (_LOW_WATER if self._paused else _HIGH_WATER)
        if self._queued or full:
            self._pause_reading()
        elif self._paused and self.transport is not None and not self.closed:
            self._paused = False
            self.last_read = self.loop.time()  # our own pause is not the agent's silence
            self.transport.resume_reading()

    def write(self, data: bytes) -> None:
        if self.closed or self.transport is None or self.transport.is_closing():
            raise AgentGone("the agent closed the connection")
        self.transport.write(data)

    async def drain(self) -> None:
        if self._drain is not None:
            await self._drain
            if self.closed:
                raise AgentGone("the agent closed the connection")

    # -- closing -----------------------------------------------------------------------------------------

    def _close_after(self, request: GateRequest) -> None:
        """Close once the request is over: at once if its body has all arrived, else when it has (or soon)."""
        if request._complete or self._broken or self._eof:
            self._close_now()
            return
        self.closing = True
        request._drop_rest()
        self._linger = self.loop.call_later(LINGER_SECONDS, self._close_now)

    def _close_now(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def idle_for(self, now: float) -> float:
        """How long the gate has waited on the agent: for a next request's head, since the last answer
        (a trickled head makes no progress); for body bytes, since the last bytes came."""
        since = self.waiting_since
        if since is None:
            return 0.0
        return now - (since if self._current is None else max(since, self.last_read))

    @property
    def ends_after_this(self) -> bool:
        """Nothing more will be read: the agent half-closed, or parsing stopped (malformed, Upgrade)."""
        return self._eof or self._broken

    @property
    def waiting_for_request(self) -> bool:
        return self._current is None

    def close_idle(self) -> None:
        """Close now if no request is being answered (shutdown, or an idle keep-alive connection)."""
        if self._current is None:
            self.closing = True
            self._close_now()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


def _llhttp_reason(exc: Exception) -> str:
    """llhttp's own description (a fixed text from its source, never the agent's bytes), in lower case."""
    text = str(exc.args[0]) if exc.args else type(exc).__name__
    return text.rstrip(".")[:80].lower() or "malformed"


def _method_or_empty(parser: httptools.HttpRequestParser) -> str:
    try:
        return str(parser.get_method().decode("ascii"))
    except (httptools.HttpParserError, UnicodeDecodeError):
        return ""
