"""The gate's server side: one agent connection, its requests parsed by llhttp, each answered in turn.

It replaced aiohttp's server, whose request and response objects cost the gate more CPU per request
than several of its own checks, and whose import held ~14 MiB of the daemon's memory. llhttp (through
httptools, as on the upstream side) makes every framing decision; what is ours is small:

- one task per connection runs the pipeline for one request at a time; a pipelined next request is
  parsed and held, and the agent is not read further until its turn. llhttp is fed a read in slices
  (at most PARSE_AHEAD bytes, cut after a head's end; a body of known length in one piece) and no
  further once a request waits its turn: the rest of that read is kept as bytes and parsed when the
  queue has drained, so a read full of tiny requests cannot become thousands of parsed ones;
- a request body is handed over as it arrives, and the agent is read no faster than it is taken;
- answers are framed by Content-Length, chunked, or for HTTP/1.0 by closing the connection;
- a connection whose request body was not read is kept only if little of it is left to drop; when it
  closes it first reads and drops what the agent still sends, until the request's end, the agent's
  own close or LINGER_SECONDS, so that unread data does not make the kernel reset the connection
  and destroy the answer in flight;
- what llhttp refuses still becomes a request for the pipeline to refuse and record (400; 431 for a
  head over MAX_HEAD_BYTES; 505 for a version other than 1.0 and 1.1). Header fields, trailer fields
  and any read in which the parser makes no progress (a head, a chunk's framing or trailers still
  arriving) count against MAX_HEAD_BYTES, so no part of a request outside its body grows unbounded;
- past AgentConnections.most open connections, a new one is reset as soon as it is accepted, so agents
  cannot take every file descriptor the daemon needs for upstreams and its control socket;
- GateServer's sweep ends whatever keeps the gate waiting on the agent longer than its idle timeout:
  a next request's head, body bytes, an agent that stopped reading its answer, a close that does not
  complete. A body framed by the close (HTTP/1.0) that has to be cut is cut with a reset, so the cut
  cannot pass for its end.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import socket
import struct
import time
from collections.abc import AsyncIterator, Mapping
from email.utils import formatdate
from http import HTTPStatus
from typing import Protocol, cast

import httptools
from multidict import CIMultiDict, CIMultiDictProxy

from aegisd.gate.body_buffer import BodyBuffer
from aegisd.gate.wire import LAST_CHUNK, encode_head, frame_chunk, status_allows_body

log = logging.getLogger("aegisd.gate")

MAX_HEAD_BYTES = 64 * 1024  # the request line and headers; as much again for a chunked body's trailers
# What each header field counts against MAX_HEAD_BYTES beside its name and value: about what holding it costs
# until the head is complete (a tuple of two bytes objects). Counting only the bytes sent let a head of 10,000 empty
# fields (`a:`) hold 0.8 MiB, before any token was checked, on each of a thousand connections.
FIELD_OVERHEAD = 64
DISCARD_MAX = 64 * 1024  # an unread body with at most this much still to come is dropped as it arrives
LINGER_SECONDS = 1.0  # how long a closing connection reads and drops what the agent still sends
# After a probe (see AgentConnection.probe), when to look whether the agent's system answered it with a reset.
PROBE_CHECKS = (0.02, 0.2, 2.0)
_HIGH_WATER = 256 * 1024  # request body held (BodyBuffer.held) before the agent is read no faster
_LOW_WATER = 64 * 1024
# llhttp is fed at most this much past a head's end at a time while no request waits its turn (a read this size or
# smaller, the usual single request, in one go): bounds the requests parsed ahead of their answer to what fits in it.
PARSE_AHEAD = 4 * 1024
_HEAD_END = b"\r\n\r\n"  # where a head (or a chunked body's trailers) ends: a cut there splits no request's body
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_REASONS = {status.value: status.phrase for status in HTTPStatus}
_NO_HEADERS: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())
_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on with 0 s: closing sends a reset
_TOO_LARGE = f"the request's head (or its chunk framing and trailers) is larger than {MAX_HEAD_BYTES} bytes"


class AgentConnections:
    """The gate's open agent connections with their serving tasks, and the most it keeps open at once.

    At the cap, a new connection takes the place of the oldest idle one on which no agent has authenticated, else
    of the oldest other one no agent has (a process with no token cannot keep agents out by holding connections
    open, idle or kept busy); only when every open connection is an agent's, or one whose request is between its
    head and the gate's first look at it, is the new one reset."""

    REPORT_EVERY = 60.0  # seconds between two warnings about refused connections

    def __init__(self, most: int | None = None) -> None:
        self.open: set[AgentConnection] = set()
        self.unvouched: dict[AgentConnection, None] = {}  # open, and no agent authenticated on its latest request;
        # oldest first
        self.tasks: set[asyncio.Task[None]] = set()  # each connection's serving task, until it ends
        self.most = most  # None: no cap
        self.refused = 0  # connections reset because `most` were open
        self.evicted = 0  # idle connections without an agent reset to make room for a new one
        self._reported_at: float | None = None
        self._reported = (0, 0)  # `refused` and `evicted` when the last warning was logged
        self._report_due: asyncio.TimerHandle | None = None

    def admit(self, conn: AgentConnection) -> bool:
        """Count `conn` as open, making room at the cap if an idle connection has no agent, or count it refused;
        the caller resets a refused one."""
        if self.most is not None and len(self.open) >= self.most:
            spare = next((c for c in self.unvouched if c.idle_between_requests), None) or next(
                (c for c in self.unvouched if not c.head_untaken), None)  # busy with what named no agent: a
            # scrape, a refusal, a pipeline of them left unread, a body left unsent after one
            if spare is None:
                self.refused += 1
                self._due()
                return False
            spare.evict()
            self.evicted += 1
            self._due()
        self.open.add(conn)
        self.unvouched[conn] = None
        return True

    def _due(self) -> None:
        now = time.monotonic()
        if self._reported_at is None or now - self._reported_at >= self.REPORT_EVERY:
            self._report()
        elif self._report_due is None:  # the rest of this burst is reported when the minute is up
            self._report_due = asyncio.get_running_loop().call_later(
                self._reported_at + self.REPORT_EVERY - now, self._report)

    def _report(self) -> None:
        self._report_due = None
        refused, evicted = self.refused - self._reported[0], self.evicted - self._reported[1]
        if evicted:
            log.warning("the gate reset %d agent connection(s) on which no agent had authenticated, to make "
                        "room for new ones: %d are open, the most [gate] max_connections allows", evicted,
                        self.most)
        if refused:
            log.warning("the gate reset %d new agent connection(s): %d are open, the most [gate] max_connections "
                        "allows", refused, len(self.open))
        if refused or evicted:
            self._reported_at, self._reported = time.monotonic(), (self.refused, self.evicted)

    def forget(self, conn: AgentConnection) -> None:
        self.open.discard(conn)
        self.unvouched.pop(conn, None)


class RequestHandler(Protocol):
    """The pipeline, as a connection sees it: it answers every request through the request's methods."""

    async def handle(self, request: GateRequest) -> None: ...

    async def refuse_malformed(self, request: GateRequest, status: int, message: str) -> None: ...


class AgentGone(ConnectionResetError):
    """The agent's connection closed while the gate was reading from or writing to it."""


class BodyMalformed(ConnectionError):
    """llhttp refused the request body's framing (bad chunk sizes, say) part way through."""


class _FieldsTooLarge(Exception):
    """Raised in llhttp's header callback: header or trailer fields past MAX_HEAD_BYTES."""


class GateRequest:
    """One request as parsed (method, raw target, headers), its body as it arrives, and its answer."""

    __slots__ = ("_body", "_body_allowed", "_chunked", "_close", "_complete", "_conn", "_continued",
                 "_cut", "_discard", "_error", "_probed", "_received", "_waiter", "_watcher", "body_wait_since",
                 "content_length", "finished", "has_body", "headers", "http11", "keep_alive", "malformed", "method",
                 "raw_path", "started")

    def __init__(self, conn: AgentConnection, method: str, raw_path: str, headers: CIMultiDictProxy[str],
                 http11: bool, keep_alive: bool) -> None:
        self._conn = conn
        self.method = method
        self.raw_path = raw_path
        self.headers = headers
        self.http11 = http11
        self.keep_alive = keep_alive
        length = headers.get("Content-Length")  # llhttp refuses it beside a Transfer-Encoding
        self.content_length = int(length) if length is not None else None
        self.has_body = bool(self.content_length) or "Transfer-Encoding" in headers
        self.malformed: tuple[int, str] | None = None  # (status, message) when llhttp refused the request
        self._body = BodyBuffer()
        self._received = 0
        self._complete = not self.has_body
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self.body_wait_since: float | None = None  # for the idle sweep: since when `body` waits for bytes
        self._discard = False
        self.started = self.finished = False
        self._chunked = self._close = self._continued = False
        self._body_allowed = True
        self._watcher: asyncio.Task[None] | None = None  # the task waiting on the upstream for this request
        self._cut = False  # the agent's leaving cancelled `_watcher`
        self._probed = False  # a 100 Continue went out to tell a half-close from a close

    # -- the body ------------------------------------------------------------------------------------

    async def body(self) -> AsyncIterator[bytes]:
        """The body as it arrives; raises AgentGone or BodyMalformed if it ends early or broken."""
        while True:
            if self._body:
                chunk = self._body.take()  # all that arrived since the last turn, as one piece
                self._conn.update_reading()
                yield chunk
            elif self._error is not None:
                raise self._error
            elif self._complete:
                if self.content_length is not None and self._received != self.content_length:
                    raise BodyMalformed("the body ended before its declared Content-Length")  # never a short body
                return
            else:
                self._waiter = self._conn.loop.create_future()
                self.body_wait_since = self._conn.loop.time()
                try:
                    await self._waiter
                finally:
                    self._waiter = None
                    self.body_wait_since = None

    @property
    def agent_left(self) -> bool:
        """The agent's connection has closed (a reset, or a close the gate saw): no answer can reach it."""
        return self._conn.closed

    def vouch(self, agent_named: bool) -> None:
        """Say whether this request authenticated as an agent (AgentConnection.vouch)."""
        self._conn.vouch(agent_named)

    @property
    def body_complete(self) -> bool:
        return self._complete and self._error is None

    def _feed(self, data: bytes) -> None:
        self._received += len(data)
        if self._discard:
            return
        self._body.put(data)
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
        self._body.clear()
        self._conn.update_reading()

    # -- the agent leaving while the upstream is awaited -----------------------------------------------

    def watch(self) -> None:
        """Until `unwatch`, the agent's leaving cancels the connection's task, which answers this request and
        now waits on the upstream (its answer's head, or the next piece of its body): the exchange is dropped
        then, not when the upstream answers nobody. Cheap: no task or future of its own, two attribute writes.
        A CancelledError meanwhile goes to `left`."""
        conn = self._conn
        self._watcher = conn.task
        if conn._eof and not conn.closed and not self._probed:  # it sent its end before this wait began
            conn.probe(self)

    def unwatch(self) -> None:
        self._watcher = None

    def left(self) -> bool:
        """On a CancelledError between `watch` and `unwatch`: True when the agent's leaving caused it (and
        no stop as well), the cancellation then taken back; False for any other, which the caller re-raises."""
        task, self._watcher = self._watcher, None
        if not self._cut:
            return False
        self._cut = False
        return task is None or task.uncancel() == 0

    def _agent_left(self) -> None:
        watcher = self._watcher
        if watcher is not None and not self._cut:
            self._cut = True
            watcher.cancel()

    # -- the answer ------------------------------------------------------------------------------------

    def send_continue(self) -> None:
        """Answer `Expect: 100-continue` (an HTTP/1.1 client waiting to send its body), once."""
        if self.http11 and not self.started and not self._continued and self._received == 0 and not self._complete:
            self._continued = True
            self._conn.write(_CONTINUE)

    async def respond(self, status: int, body: bytes, headers: Mapping[str, str], *,
                      reason: str | None = None, close: bool = False) -> None:
        """The whole answer in one write, framed by its Content-Length (no body bytes for a HEAD; neither
        body nor length for a 1xx, 204 or 304)."""
        self._begin(close)
        bodiless = not status_allows_body(status)
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
        if self.method == "HEAD" or not status_allows_body(status):
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

    @property
    def cut_open(self) -> bool:
        """An answer whose body is under way: cut now, it must end in a reset. An orderly close is the end of an
        answer framed by the close (HTTP/1.0, no length), and an agent that ignores a Content-Length or the chunked
        framing takes whatever came before one for the whole answer."""
        return self.started and not self.finished and self._body_allowed

    def _begin(self, close: bool) -> None:
        if self.started:
            raise RuntimeError("this request's answer has already begun")
        conn = self._conn
        if conn.closed:
            raise AgentGone("the agent closed the connection")
        left = self._left_to_drop()
        self._close = (close or not self.keep_alive or conn.closing or (conn.ends_after_this and not conn.has_queued)
                       or left is None or left > DISCARD_MAX or self._error is not None
                       or (left > 0 and self._awaits_continue()))

    def _awaits_continue(self) -> bool:
        """The agent holds its body back until a `100 Continue` that was never sent: it will not come, and
        whatever the agent sends next is a new request, not this body."""
        return (not self._continued and self._received == 0
                and self.headers.get("Expect", "").lower() == "100-continue")

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
        if not (reason and reason.isascii() and reason.isprintable()):  # an upstream's odd bytes stay there
            reason = _REASONS.get(status, "Unknown")
        return encode_head(f"HTTP/1.1 {status} {reason}", fields)


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

    def __init__(self, handler: RequestHandler, connections: AgentConnections) -> None:
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
        self._head_fields = self._trailer_fields = 0  # bytes of this message's header / trailer fields
        self._events = 0  # the parser's progress: a message begun or ended, a head complete, body bytes
        self._stalled = 0  # bytes read since the parser last made progress
        self._url = b""
        self._raw: list[tuple[bytes, bytes]] = []
        self._broken = False  # llhttp failed: nothing more is parsed on this connection
        self._held = b""  # read but not yet parsed (from `_held_at`): a request waits its turn, reading is paused
        self._held_at = 0
        self._eof = False
        self._eof_held = False  # the agent's end came while bytes were held: taken once they are parsed
        self.closed = False
        self.closing = False
        self.vouched = False  # the latest request on it authenticated as an agent
        self.waiting_since: float | None = None  # since when the gate waits for a next request
        self._write_blocked_since: float | None = None  # since when an answer waits for the agent to read
        self._closing_since: float | None = None
        self.last_read = 0.0
        self._linger: asyncio.TimerHandle | None = None
        self._probing: asyncio.TimerHandle | None = None
        self.task: asyncio.Task[None] | None = None

    # -- asyncio ---------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is one without subclassing it
        if not self._connections.admit(self):
            self.closed = True
            _reset_on_close(self.transport)  # even if the agent has sent nothing yet: never an orderly close
            self.transport.abort()
            return
        self.last_read = self.loop.time()
        self.task = self.loop.create_task(self._serve())
        self._connections.tasks.add(self.task)
        self.task.add_done_callback(self._connections.tasks.discard)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._connections.forget(self)
        if self._linger is not None:
            self._linger.cancel()
        if self._probing is not None:
            self._probing.cancel()
        if self._current is not None:  # a wait on the upstream for this agent ends now
            self._current._agent_left()
        gone = AgentGone("the agent closed the connection")
        if self._parsing is not None:
            self._parsing._end(gone)
        for request in self._queued:
            request._end(gone)
        self._held = b""
        self._deliver(None)
        self.resume_writing()

    def data_received(self, data: bytes) -> None:
        self.last_read = self.loop.time()
        if self._broken:
            return  # read and dropped: a closing connection must not leave unread data behind
        if self._held:  # a read already on its way when reading paused: parsed after what came before it
            data = self._held[self._held_at:] + data
            self._held = b""
        self._parse(data, 0)

    def _parse(self, data: bytes, at: int) -> None:
        """Feed llhttp `data` from `at` until a request waits its turn, then hold the rest (reading is paused
        then). A read (or its rest) of at most PARSE_AHEAD bytes is fed whole, and a body of known length up to
        its end; a longer stretch is cut after the first CRLF CRLF in its first PARSE_AHEAD bytes (strict llhttp
        ends every head, and every chunked body, with one), so a read of many small requests is parsed one
        request at a time. Where the cuts fall is no framing decision: llhttp makes those, whatever the cuts."""
        size = len(data)
        while at < size:
            if self._queued:  # a request waits its turn: parse no further until it has had it
                self._held, self._held_at = data, at
                return
            parsing = self._parsing
            left = 0 if parsing is None or parsing.content_length is None else parsing._left_to_drop() or 0
            if left > 0:
                end = min(at + left, size)
            elif parsing is not None and parsing.content_length is None:  # a chunked body: PARSE_AHEAD at a time,
                # not cut at each CRLF CRLF in its data (a body of blank lines was a feed per line), and a chunk
                # line or trailer is still bounded by the bytes parsed without progress
                end = min(at + PARSE_AHEAD, size)
            elif size - at <= PARSE_AHEAD:
                end = size
            else:
                end = data.find(_HEAD_END, at, at + PARSE_AHEAD)
                end = end + len(_HEAD_END) if end >= 0 else at + PARSE_AHEAD
            events = self._events
            try:
                self._parser.feed_data(data if at == 0 and end == size else memoryview(data)[at:end])
            except httptools.HttpParserUpgrade:  # Upgrade or CONNECT: answered, then the connection ends
                self._stop_parsing()
                return
            except httptools.HttpParserError as exc:
                cause = exc.__context__
                if isinstance(cause, _FieldsTooLarge):
                    self._malformed(431, _TOO_LARGE)
                elif cause is not None:  # a bug of ours in a callback, not the agent's fault
                    log.error("a gate parser callback failed: %s", type(cause).__name__)
                    self._malformed(400, "the gate could not parse the request")
                else:
                    self._malformed(400, f"the request is not valid HTTP/1.1 ({_llhttp_reason(exc)})")
                return
            if self._events != events:
                self._stalled = 0
            else:  # the whole slice went into a head, a chunk's framing or trailers: bounded like a head
                self._stalled += end - at
                if self._stalled > MAX_HEAD_BYTES:
                    self._malformed(431, _TOO_LARGE)
                    return
            if self._broken:  # a callback refused the request (505, a coding): nothing after it is parsed
                return
            at = end

    def _parse_held(self) -> None:
        """The queue has drained: parse what was held, up to the next request to wait its turn."""
        data, at = self._held, self._held_at
        self._held = b""
        self._parse(data, at)
        if self._eof_held and not self._held:
            self._eof_held = False
            self._ended()

    def eof_received(self) -> bool:
        """The agent will send nothing more; answer what it asked, then close (keeps half-closed clients)."""
        self._eof = True
        if self._held:  # its requests still held are parsed first: `_parse_held` ends what they leave open
            self._eof_held = True
        else:
            self._ended()
        return True

    def _ended(self) -> None:
        """The agent's end, once every byte before it is parsed: a request whose body is still to come fails."""
        if self._parsing is not None:
            self._parsing._end(AgentGone("the agent ended the request early"))
            self._parsing = None
        if self.closing:
            self._close_now()
        elif self._current is None and not self._queued:
            self._deliver(None)
        elif self._current is not None and self._current._watcher is not None and not self._current._probed:
            self.probe(self._current)  # the request waits on the upstream: is the agent still there for it?

    def pause_writing(self) -> None:
        if self._drain is None:
            self._drain = self.loop.create_future()

    def resume_writing(self) -> None:
        drain, self._drain = self._drain, None
        if drain is not None and not drain.done():
            drain.set_result(None)

    # -- llhttp's callbacks ---------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._events += 1
        self._head_open = True
        self._head_fields = self._trailer_fields = 0
        self._url = b""
        self._raw = []

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > MAX_HEAD_BYTES:  # a head with no fields is bounded here (on_header counts the rest)
            raise _FieldsTooLarge()

    def on_header(self, name: bytes, value: bytes) -> None:
        size = len(name) + len(value) + FIELD_OVERHEAD
        if self._head_open:
            self._head_fields += size
            if self._head_fields + len(self._url) > MAX_HEAD_BYTES:
                raise _FieldsTooLarge()
            self._raw.append((name, value))
        else:  # a trailer field of a chunked body: counted, never kept (nothing of it is forwarded)
            self._trailer_fields += size
            if self._trailer_fields > MAX_HEAD_BYTES:
                raise _FieldsTooLarge()

    def on_headers_complete(self) -> None:
        self._events += 1
        self._head_open = False
        if self._broken:  # parsing stopped earlier in this read (505, a refused coding): nothing after it counts
            self._raw = []
            return
        parser = self._parser
        headers = CIMultiDict((name.decode("latin-1"), value.decode("utf-8", "surrogateescape"))
                              for name, value in self._raw)
        self._raw = []
        version = parser.get_http_version()
        request = GateRequest(self, parser.get_method().decode("ascii"), self._url.decode("utf-8", "surrogateescape"),
                              CIMultiDictProxy(headers), version == "1.1", parser.should_keep_alive())
        if version not in ("1.1", "1.0"):
            request.malformed = (505, f"HTTP/{version} is not supported; use HTTP/1.1")
            self._stop_parsing()
        elif "Transfer-Encoding" in headers and _codings(headers) != "chunked":
            request.malformed = (400, "a request body may be sent with Transfer-Encoding: chunked and no other coding")
            self._stop_parsing()
        elif request.has_body and parser.should_upgrade():
            # llhttp hands over no body after an Upgrade (or CONNECT) head: forwarded, the declared length would
            # frame whatever the agent sends next on the upstream connection as a request of its own.
            request.malformed = (400, "a request asking for a protocol upgrade (Connection: Upgrade) cannot carry a "
                                 "body through the gate")
            self._stop_parsing()
        self._parsing = None if request.body_complete else request
        if not self.closing:
            self._deliver(request)

    def on_body(self, data: bytes) -> None:
        self._events += 1
        request = self._parsing
        if request is not None:
            request._feed(data)
            if request._body.held > _HIGH_WATER:
                self._pause_reading()

    def on_message_complete(self) -> None:
        self._events += 1
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
                if self._held and not self._queued and not self.closing:
                    self._parse_held()  # at most up to the next request to wait its turn
                self.update_reading()
            else:
                self._next = self.loop.create_future()
                self.waiting_since = self.loop.time()
                try:
                    request = await self._next
                finally:
                    self._next = None
                    self.waiting_since = None
            if request is None or self.closing:  # no more, or the sweep closed it as the request came
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
            self.waiting_since = None  # no longer waiting, though `_serve` has not woken yet
        elif request is not None:
            self._queued.append(request)
            self.update_reading()

    def _malformed(self, status: int, message: str) -> None:
        """llhttp refused what the agent sent: the request being read fails (refused whole if it has not
        begun), or a stand-in request is refused."""
        method = _method_or_empty(self._parser) if self._head_open and self._url else ""  # else a stale one
        self._stop_parsing()
        request = self._parsing
        if request is not None:
            self._parsing = None
            if request is not self._current:  # not begun: never handed to the pipeline as a request
                request.malformed = (status, message)
            request._end(BodyMalformed("the request body's framing is malformed"))
            return
        stand_in = GateRequest(self, method, "", _NO_HEADERS, True, False)
        stand_in.malformed = (status, message)
        self._deliver(stand_in)

    def _stop_parsing(self) -> None:
        self._broken = True
        self._head_open = False

    # -- flow control ------------------------------------------------------------------------------------

    def _pause_reading(self) -> None:
        if not self._paused and self.transport is not None and not self.closed:
            self._paused = True
            self.transport.pause_reading()

    def update_reading(self) -> None:
        """Read the agent unless a request waits its turn or a body is buffered past the high-water mark
        (and, once paused for that, until it is back under the low-water mark)."""
        parsing = self._parsing
        full = parsing is not None and parsing._body.held > (_LOW_WATER if self._paused else _HIGH_WATER)
        if self._queued or full:
            self._pause_reading()
        elif self._paused and self.transport is not None and not self.closed:
            self._paused = False
            self.last_read = self.loop.time()  # our own pause is not the agent's silence
            self.transport.resume_reading()

    @property
    def has_queued(self) -> bool:
        return bool(self._queued)

    def write(self, data: bytes) -> None:
        if self.closed or self.transport is None or self.transport.is_closing():
            raise AgentGone("the agent closed the connection")
        self.transport.write(data)

    async def drain(self) -> None:
        if self._drain is not None:
            self._write_blocked_since = self.loop.time()
            try:
                await self._drain
            finally:
                self._write_blocked_since = None
            if self.closed:
                raise AgentGone("the agent closed the connection")

    def probe(self, request: GateRequest) -> None:
        """The agent sent its end (a FIN) while `request` waits on the upstream. A half-close (it still reads
        its answer; some clients do that) and a close look alike until something is sent, so the agent gets a
        `100 Continue`, which an HTTP/1.1 client must skip: a closed agent's system answers it with a reset,
        which the socket's pending error shows, and the connection is dropped (connection_lost ends the wait).
        Not for an HTTP/1.0 agent (no 1xx may be sent to it), nor once the answer has begun: those are served on."""
        request._probed = True
        transport = self.transport
        if (not request.http11 or request.started or not request.body_complete or self.closed or transport is None
                or transport.is_closing()):
            return
        request._continued = True
        transport.write(_CONTINUE)
        if self._probing is not None:
            self._probing.cancel()
        self._probing = self.loop.call_later(PROBE_CHECKS[0], self._check_probe, 0)

    def _check_probe(self, step: int) -> None:
        self._probing = None
        if self.closed or self.transport is None:
            return
        sock = self.transport.get_extra_info("socket")
        try:
            failed = sock is not None and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != 0
        except OSError:
            failed = True
        if failed:
            log.debug("an agent closed its connection while its request waited on the upstream")
            self.abort()
        elif step + 1 < len(PROBE_CHECKS):
            self._probing = self.loop.call_later(PROBE_CHECKS[step + 1] - PROBE_CHECKS[step], self._check_probe,
                                                 step + 1)

    # -- closing -----------------------------------------------------------------------------------------

    def _close_after(self, request: GateRequest) -> None:
        """Close once the request is over: at once if nothing more will come; otherwise after reading and
        dropping what still comes, until the request's end, the agent's close or LINGER_SECONDS."""
        if self._eof or (request._complete and not self._broken):
            self._close_now()
            return
        self.closing = True
        self._closing_since = self.loop.time()
        request._drop_rest()
        self.update_reading()
        self._linger = self.loop.call_later(LINGER_SECONDS, self._close_now)

    def _close_now(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.closing = True
            self._closing_since = self._closing_since or self.loop.time()
            self.transport.close()  # once what is buffered is sent; the sweep aborts it if that stalls

    def idle_for(self, now: float) -> float:
        """How long the gate has waited on the agent: for a next request's whole head (since the last
        answer: a trickled head makes no progress), for body bytes (since the last came), for it to read
        its answer, or for a close to complete."""
        waits = [] if self._write_blocked_since is None else [self._write_blocked_since]
        if self._closing_since is not None:  # a close has its linger before it is overdue
            waits.append(self._closing_since + LINGER_SECONDS)
        current = self._current
        if current is None:
            if self.waiting_since is not None:
                waits.append(self.waiting_since)
        elif current.body_wait_since is not None:
            waits.append(max(current.body_wait_since, self.last_read))
        return now - min(waits) if waits else 0.0

    def vouch(self, agent_named: bool) -> None:
        """Whether the latest request on this connection authenticated as an agent: until one has, the
        connection is one the cap may reset to make room for another (AgentConnections.admit)."""
        if agent_named is self.vouched:
            return
        self.vouched = agent_named
        if agent_named:
            self._connections.unvouched.pop(self, None)
        elif not self.closed:
            self._connections.unvouched[self] = None

    @property
    def idle_between_requests(self) -> bool:
        """No request is being answered, waits its turn, or sends its body, and no byte read waits to be parsed:
        at most a head is on its way."""
        return (self._current is None and not self._queued and self._parsing is None and not self._held
                and (self._next is None or not self._next.done()))  # done: a head read, `_serve` not yet woken

    @property
    def head_untaken(self) -> bool:
        """A request's head was read and handed over, but `_serve` has not looked at it yet: it may be an agent's
        first request, whose authentication comes in the turn `_serve` takes it. (A request queued behind one being
        answered is not protected: a pipeline of tokenless requests left unread must stay evictable.)"""
        return self._current is None and (bool(self._queued) or (self._next is not None and self._next.done()))

    def evict(self) -> None:
        """Reset this idle connection to make room for a new one (the cap is full); it stops counting at once."""
        self._connections.forget(self)
        if self.transport is not None and not self.closed:
            _reset_on_close(self.transport)
            self.transport.abort()

    @property
    def ends_after_this(self) -> bool:
        """Nothing more will be read: the agent half-closed, or parsing stopped (malformed, Upgrade)."""
        return self._eof or self._broken

    def end(self) -> None:
        """End the connection now: an idle one with an orderly close; one with a request under way, or
        whose close stalls, dropped (the idle sweep, and a stop past its grace)."""
        if self._current is None and not self.closing:
            self._close_now()
        else:
            self.abort()

    def abort(self) -> None:
        """Drop the connection and what is still unsent; as a reset when it cuts an answer under way, so that no
        agent takes the part it got for the whole. A reset also drops what the gate's kernel still holds unsent
        (the end of an earlier pipelined answer the agent has not read yet), which the agent then sees cut by it
        as well, never falsely complete (on Linux, what already reached the agent's system stays readable ahead
        of the reset)."""
        if self.transport is None or self.closed:
            return
        if self._current is not None and self._current.cut_open:
            _reset_on_close(self.transport)
        self.transport.abort()


def _codings(headers: CIMultiDict[str]) -> str:
    return ",".join(headers.getall("Transfer-Encoding")).strip().lower()


def _llhttp_reason(exc: Exception) -> str:
    """llhttp's own description (a fixed text from its source, never the agent's bytes), in lower case."""
    text = str(exc.args[0]) if exc.args else type(exc).__name__
    return text.rstrip(".")[:80].lower() or "malformed"


def _method_or_empty(parser: httptools.HttpRequestParser) -> str:
    try:
        return str(parser.get_method().decode("ascii"))
    except (httptools.HttpParserError, UnicodeDecodeError):
        return ""


def _reset_on_close(transport: asyncio.Transport) -> None:
    """Make closing the connection send a reset (SO_LINGER 0 s), which an agent cannot take for an orderly end."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError, ValueError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
