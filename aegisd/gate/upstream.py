"""Connections to the real APIs: pooled HTTP/1.1 over strict TLS, no redirects, and an address guard.

The gate's client is deliberately small. It sends one request at a time per connection and parses
answers with llhttp (httptools, the parser Node.js uses), so every framing decision (chunked,
Content-Length, smuggling-shaped headers) is llhttp's; what is ours is the pool, the timeouts and the
flow control. It replaced aiohttp's ClientSession, which cost the gate a third of its CPU per request
for generality the gate never uses (cookies, redirects, auto headers, compression, proxies).

The guard sits between name resolution and connect: a hostname that resolves only to loopback,
private, link-local or metadata addresses is refused unless the allowlist entry itself names such a
place, and the connection dials exactly an address that was checked.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from ipaddress import ip_address

import httptools
from multidict import CIMultiDict, CIMultiDictProxy

from aegisd.gate.body_buffer import BodyBuffer
from aegisd.gate.wire import LAST_CHUNK, HeadError, encode_head, frame_chunk
from aegisd.vault.domains import is_internal_ip

# Methods that carry no body unless one is given (no `Content-Length: 0` is added for them).
_BODILESS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "CONNECT"})
# Methods a stale pooled connection may be retried with (RFC 9110 9.2.2), when the body can be resent.
_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
# Methods many servers expect no body with: one that ignores the Content-Length of such a request (CL.0) would read
# its body as the start of the next request on the connection, so a connection that carried one is not reused.
_BODY_UNEXPECTED = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "DELETE"})
# Of the upstream's response head, of its trailers, and of what it sends in a row without the parser making progress
# (a head, a chunk-size line or trailers still arriving); more is a broken or hostile upstream.
MAX_HEADER_BYTES = 64 * 1024
_HIGH_WATER = 256 * 1024  # body held (BodyBuffer.held) at which the upstream socket stops being read until taken
_IDLE_SECONDS = 15.0  # a pooled connection unused this long is closed rather than reused
_MAX_IDLE_PER_HOST = 128
# Idle connections kept in all, the least recently parked closed first. Under a `*.` allowlist entry the agent
# names the host, so each request could leave a socket behind in a pool of its own: one agent used every file
# descriptor aegisd had in two seconds, and the gate, the control socket and the ledger failed for everyone.
_MAX_IDLE = 256

_NO_HEADERS: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())

Resolver = Callable[[str, int], Awaitable[list[str]]]
# (scheme, host, port, may reach internal addresses, credential id): a pooled connection never carries another
# credential's request, so no desync on it (a body the upstream did not frame) can prefix one of those.
PoolKey = tuple[str, str, int, bool, str]


class UpstreamError(Exception):
    """Reaching or reading the upstream failed; `status`, `code` and the message are safe to show."""

    status = 502
    code = "upstream_error"


class AddressNotAllowed(UpstreamError):
    """Every address the name resolved to is internal, and the entry does not allow that."""

    status = 403
    code = "address_not_allowed"


class UpstreamTLSError(UpstreamError):
    code = "upstream_tls_error"


class UpstreamTimeout(UpstreamError, TimeoutError):
    status = 504
    code = "upstream_timeout"


class UpstreamConnectTimeout(UpstreamError):
    """No connection within the connect timeout: unlike UpstreamTimeout, nothing was sent."""

    status = 504
    code = "upstream_timeout"


class Superseded(UpstreamError):
    """The vault or the policies changed while a new connection was made: the request, judged before, is not
    sent (a lock, revoke or rotation must not be outrun by a slow connect); a retry is judged afresh."""

    status = 503
    code = "changed_in_flight"


class UpstreamBroken(UpstreamError):
    """The upstream closed the connection early or sent something that is not HTTP/1.1."""


async def system_resolver(host: str, port: int) -> list[str]:
    """Every address `host` resolves to, in the resolver's order (IP literals skip the lookup)."""
    try:
        return [str(ip_address(host))]
    except ValueError:
        pass
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        raise UpstreamError("the upstream host name did not resolve") from None
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def tls_context() -> ssl.SSLContext:
    """Verify against the system store, plus SSL_CERT_FILE when set (OpenSSL would use it instead). Loading a
    store costs some 50 ms, so the system's is not loaded again when SSL_CERT_FILE names that same file."""
    context = ssl.create_default_context()
    extra = os.environ.get("SSL_CERT_FILE")
    system = ssl.get_default_verify_paths().openssl_cafile
    if extra and system and os.path.exists(system) and os.path.realpath(system) != os.path.realpath(extra):
        context.load_verify_locations(cafile=system)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def request_head(method: str, target: str, headers: CIMultiDict[str],
                 body: bytes | AsyncIterator[bytes] | None) -> tuple[bytes, bool]:
    """The request line and headers, framing headers set for `body`; and whether the body goes chunked."""
    chunked = False
    if isinstance(body, bytes):
        headers["Content-Length"] = str(len(body))
    elif body is None:
        if method not in _BODILESS and "Content-Length" not in headers:
            headers["Content-Length"] = "0"
    elif "Content-Length" not in headers:
        headers["Transfer-Encoding"] = "chunked"
        chunked = True
    try:
        return encode_head(f"{method} {target} HTTP/1.1", headers.items()), chunked
    except HeadError:
        raise UpstreamError("a header value contains a line break and cannot be sent") from None


class UpstreamResponse(asyncio.Protocol):
    """One connection to one upstream; between `request` and `release` it carries one exchange.

    As an asyncio protocol it receives bytes and feeds them to the exchange's llhttp parser; as the
    pipeline's view of the answer it offers status, headers and the body (`read` or `chunks`).
    """

    def __init__(self, pool: UpstreamPool, key: PoolKey) -> None:
        self._pool = pool
        self._loop = pool.loop
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        # The upstream ended the stream itself (_ended_in_order): the end of a body that runs to the close.
        self._eof = False
        self._drain: asyncio.Future[None] | None = None
        # While writes are paused: when the upstream last took some of the request (the pause, or a look that found
        # the write buffer smaller), and how much the buffer held then; _check_time compares the two.
        self._drain_since = 0.0
        self._drain_left = 0
        self._begin("GET")

    def _begin(self, method: str) -> None:
        """Fresh per-exchange state: a new parser, so nothing of the previous answer carries over."""
        self._parser = httptools.HttpResponseParser(self)
        self._head = method == "HEAD"
        self._body_unexpected = False  # a body went out with a method in _BODY_UNEXPECTED: not reused after
        self._headers_done: asyncio.Future[None] = self._loop.create_future()
        self._raw: list[tuple[bytes, bytes]] = []
        self._header_bytes = 0  # of the fields of the head (then of the trailers) parsed so far
        self._progress = 0  # the parser's progress: a head complete, a chunk-size line, body bytes, the answer's end
        self._stalled = 0  # bytes read since the parser last made progress
        self._reason = b""
        self._interim = False
        self._body = BodyBuffer()
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False
        self._complete = False
        self._close_delimited = False
        self._chunked = self._expect_chunk = False  # the body's framing as decided in on_headers_complete
        self._keep_alive = False
        self._error: BaseException | None = None
        self._got_bytes = False
        self._last_read = self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._body_task: asyncio.Task[None] | None = None
        self.status = 0
        self.reason = ""
        self.headers: CIMultiDictProxy[str] = _NO_HEADERS
        self.content_length: int | None = None
        self.transfer_coded = False  # the body carries a transfer coding other than chunked (see on_headers_complete)

    # -- the exchange, as the pipeline sees it ----------------------------------------------------

    async def read(self) -> bytes:
        """The whole body (the caller knows it is small: a declared length it accepted). What arrived is taken at
        each turn, as `chunks` does: held in tiny reads, a small body would pass the high-water mark (each piece
        counts its overhead) and pause the socket for good, which `read` alone would never resume."""
        pieces: list[bytes] = []
        while not self._complete:
            failure = self._failure()
            if failure is not None:
                raise failure
            if self._body:
                pieces.append(self._take())
            await self._wait()
        pieces.append(self._body.take())
        return b"".join(pieces)

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives, chunk by chunk, with the upstream read only as fast as it is taken."""
        while True:
            if self._body:
                yield self._take()  # all that arrived since the last turn, as one piece
            elif self._complete:
                failure = self._failure()
                if failure is not None:  # it ended because it failed: never a falsely complete body
                    raise failure
                return
            else:
                await self._wait()

    def _take(self) -> bytes:
        """Everything held, and the upstream read again if it was paused for it."""
        data = self._body.take()
        if self._paused and self.transport is not None:
            self._paused = False
            self._last_read = self._loop.time()  # our own pause is not the upstream's silence
            self.transport.resume_reading()
        return data

    def release(self) -> None:
        """End the exchange: a complete keep-alive answer returns the connection to the pool."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        # A paused connection would stay paused in the pool: its next answer would never be read.
        reusable = (self._complete and self._keep_alive and not self._head and not self.closed
                    and not self._paused and self._error is None and not self._body_unexpected
                    and (self._body_task is None or self._body_task.done()))
        if self._body_task is not None and not self._body_task.done():
            self._body_task.cancel()
        if reusable:
            self._pool._park(self)
        else:
            self.close()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    # -- sending ----------------------------------------------------------------------------------

    def send(self, method: str, head: bytes, body: bytes | AsyncIterator[bytes] | None, chunked: bool,
             timeouts: tuple[float, float]) -> None:
        """Write the request (a streamed body goes on in a task) and start the answer's timers."""
        self._begin(method)
        self._body_unexpected = bool(body) and method in _BODY_UNEXPECTED  # a streamed body counts, even empty
        assert self.transport is not None
        if isinstance(body, bytes) and len(body) <= 16384:
            self.transport.write(head + body)  # one write, one segment, for the usual small request
        else:
            self.transport.write(head)
            if isinstance(body, bytes):
                self.transport.write(body)
            elif body is not None:
                self._body_task = self._loop.create_task(self._send_body(body, chunked))
        read_timeout, total_timeout = timeouts
        now = self._last_read = self._loop.time()
        self._read_timeout = read_timeout
        self._deadline = now + total_timeout
        self._timer = self._loop.call_at(min(self._deadline, now + read_timeout), self._check_time)

    async def _send_body(self, body: AsyncIterator[bytes], chunked: bool) -> None:
        try:
            async for chunk in body:
                if self.closed:
                    return
                if chunk:
                    assert self.transport is not None
                    self.transport.write(frame_chunk(chunk) if chunked else chunk)
                    if self._drain is not None:
                        await self._drain
            if chunked and not self.closed and self.transport is not None:
                self.transport.write(LAST_CHUNK)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the agent's side failed (too large, hung up): the exchange fails
            self._fail(exc if not self._headers_done.done() else UpstreamBroken("the request body failed"))
            self.close()

    def pause_writing(self) -> None:
        if self._drain is None:
            self._drain = self._loop.create_future()
            self._drain_since = self._loop.time()
            self._drain_left = self.transport.get_write_buffer_size() if self.transport is not None else 0

    def resume_writing(self) -> None:
        drain, self._drain = self._drain, None
        if drain is not None and not drain.done():
            drain.set_result(None)

    # -- receiving --------------------------------------------------------------------------------

    async def wait_headers(self) -> None:
        await self._headers_done

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self._complete or self.idle_since:  # nothing may arrive between exchanges
            self.close()
            return
        self._got_bytes = True
        self._last_read = self._loop.time()
        progress = self._progress
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamBroken("the upstream switched protocols"))
            self.close()
        except httptools.HttpParserError as exc:
            cause = exc.__context__
            self._fail(cause if isinstance(cause, UpstreamError) else
                       UpstreamBroken("the upstream sent a malformed HTTP response"))
            self.close()
            return
        if self._progress != progress:
            self._stalled = 0
            return
        # The whole read went into a head, a chunk-size line or trailers, which llhttp and httptools hold without
        # limit (httptools grows a field's value by concatenation: quadratic in its length, on the event loop), and
        # the read timeout never fires while bytes come. Counted per read: the bytes after the last progress in a
        # read are not, so a stretch without progress is cut within MAX_HEADER_BYTES plus one read.
        self._stalled += len(data)
        if self._stalled > MAX_HEADER_BYTES and not self._complete:
            self._fail(UpstreamBroken("the upstream's response headers are too large" if not self._headers_done.done()
                                      else "the upstream's chunk framing or trailers are too large"))
            self.close()

    def eof_received(self) -> bool:
        self._eof = self._ended_in_order()
        return False

    def _ended_in_order(self) -> bool:
        """Whether the upstream's end is its own: a FIN on plain TCP; over TLS, only its close_notify. uvloop calls
        eof_received for nothing else, the stock loop for a bare TCP close too, which anyone on the path can send:
        after a close_notify the TLS object reads as ended (b""), after a bare close it wants more. (Everything it
        had decrypted was delivered before eof_received; a byte it still held would count as no orderly end.)"""
        ssl_object = self.transport.get_extra_info("ssl_object") if self.transport is not None else None
        if ssl_object is None:
            return True
        try:
            return bool(ssl_object.read(1) == b"")
        except ssl.SSLError:  # SSLWantReadError: no close_notify came
            return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._pool._forget(self)
        resume = self._drain
        if resume is not None and not resume.done():
            resume.set_exception(ConnectionResetError("the upstream closed the connection"))
            resume.exception()  # retrieved: nobody may be waiting on it
        if self._complete:
            return
        if self._close_delimited and self._headers_done.done() and exc is None and self._error is None:
            if self._eof:
                self._finish(keep_alive=False)  # the body ran to an orderly end of the connection, as announced
                return
            if self.transport is not None and self.transport.get_extra_info("sslcontext") is not None:
                # A TCP close without the TLS close_notify: anyone on the path can send one, so it is no end
                self._fail(UpstreamBroken("the upstream's TLS connection ended without close_notify: the answer may "
                                          "be cut"))
                return
        self._fail(UpstreamBroken("the upstream closed the connection before its answer was complete"))

    def _pause_if_full(self) -> None:
        if not self._paused and self._body.held > _HIGH_WATER and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    # llhttp callbacks (httptools calls these while feed_data runs)

    def on_message_begin(self) -> None:
        if self._complete:  # the start of an answer nobody asked for: the connection is not reused
            self._keep_alive = False

    def on_status(self, data: bytes) -> None:
        self._reason += data

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value) + 4
        if self._headers_done.done():  # a trailer field (or a field of an answer nobody asked for): never kept
            if self._header_bytes > MAX_HEADER_BYTES:
                raise UpstreamBroken("the upstream's chunk framing or trailers are too large")
            return
        if self._header_bytes > MAX_HEADER_BYTES:
            raise UpstreamBroken("the upstream's response headers are too large")
        self._raw.append((name, value))

    def on_headers_complete(self) -> None:
        self._progress += 1
        if self._complete:  # a second answer nobody asked for: the connection is not reused
            self._keep_alive = False
            return
        status = self._parser.get_status_code()
        if status == 101:  # the gate never forwards Upgrade, so no switch was asked for: a broken upstream
            raise UpstreamBroken("the upstream switched protocols unasked")
        if 100 <= status < 200:  # an interim answer (103 Early Hints): wait for the real one
            self._interim, self._raw, self._reason, self._header_bytes = True, [], b"", 0
            return
        headers: CIMultiDict[str] = CIMultiDict(
            (name.decode("latin-1"), value.decode("utf-8", "surrogateescape")) for name, value in self._raw)
        self._header_bytes = 0  # the trailers, if any, have a limit of their own
        self.status, self.headers = status, CIMultiDictProxy(headers)
        self.reason = self._reason.decode("latin-1")
        length = headers.get("Content-Length")
        # Chunked only as one field whose whole value is `chunked` (trailing spaces aside, which llhttp skips
        # too): llhttp reads that as chunked whatever else it does. Anything else is not parsed here, since a
        # reading of ours could differ from llhttp's (it keeps a value's trailing tab and empty list elements:
        # `chunked,` is no chunked coding to it, and the chunk-size lines come with the body), and is
        # `transfer_coded`: llhttp removes at most the chunked framing, any other coding stays on the body and
        # Transfer-Encoding, hop-by-hop, is not forwarded, so the pipeline refuses it. on_chunk_header and
        # on_body hold llhttp to the framing decided here.
        codings = [value for name, value in self._raw if name.lower() == b"transfer-encoding"]
        chunked = len(codings) == 1 and codings[0].rstrip(b" ").lower() == b"chunked"
        self._chunked = self._expect_chunk = chunked
        self.transfer_coded = bool(codings) and not chunked
        no_body = self._head or status in (204, 304)
        # A Content-Length beside a Transfer-Encoding is an error in llhttp's strict mode; never taken here.
        self.content_length = int(length) if length is not None and not codings else None
        self._close_delimited = not no_body and not chunked and (length is None or bool(codings))
        if not self._headers_done.done():
            self._headers_done.set_result(None)
        if self._head:  # llhttp cannot be told a HEAD answer has no body: the exchange ends here
            self._finish(keep_alive=False)

    def on_chunk_header(self) -> None:
        self._progress += 1
        if self._complete:
            return
        if not self._chunked:  # llhttp frames the body as chunked where the gate took it to run to the close
            raise UpstreamBroken("the upstream's Transfer-Encoding framing is ambiguous")
        self._expect_chunk = False

    def on_body(self, data: bytes) -> None:
        self._progress += 1
        if self._complete:
            return
        if self._expect_chunk:  # taken for chunked, yet llhttp hands over body bytes before any chunk header
            raise UpstreamBroken("the upstream's Transfer-Encoding framing is ambiguous")
        self._body.put(data)
        self._pause_if_full()
        self._wake()

    def on_message_complete(self) -> None:
        self._progress += 1
        if self._interim:
            self._interim = False
            return
        if not self._complete:
            self._finish(keep_alive=self._parser.should_keep_alive())

    # -- state ------------------------------------------------------------------------------------

    def _finish(self, keep_alive: bool) -> None:
        self._complete, self._keep_alive = True, keep_alive
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._wake()

    def _fail(self, exc: BaseException) -> None:
        if self._error is None and not self._complete:
            self._error = exc
        if not self._headers_done.done():
            self._headers_done.set_exception(exc)
            self._headers_done.exception()  # retrieved: nobody awaits it once the exchange was abandoned
        self._wake()

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait(self) -> None:
        """Until more body, the end, or a failure (raised once the buffered body has been taken)."""
        if self._error is None:
            self._waiter = self._loop.create_future()
            await self._waiter
        failure = self._failure()
        if failure is not None and not self._body:
            raise failure

    def _failure(self) -> BaseException | None:
        return self._error

    def _check_time(self) -> None:
        """The one timer of an exchange: the total deadline, or silence longer than the read timeout."""
        self._timer = None
        if self._complete:
            return
        now = self._loop.time()
        silent_since = self._last_read
        uploading = self._body_task is not None and not self._body_task.done()
        not_reading = uploading and self._drain is not None
        if not_reading:
            # The body waits on the upstream to take what was written: while it takes none, it is silent too.
            # Whatever it took since the last look (the write buffer shrank) counts as of now.
            left = self.transport.get_write_buffer_size() if self.transport is not None else 0
            if left < self._drain_left:
                self._drain_since, self._drain_left = now, left
            silent_since = max(silent_since, self._drain_since)
            uploading = False
        silent_until = silent_since + self._read_timeout
        waiting_on_us = self._paused or uploading  # the agent is slow to read, or still sending its body
        if now >= self._deadline or (now >= silent_until and not waiting_on_us):
            self._fail(UpstreamTimeout("the upstream stopped reading the request body" if not_reading
                                       else "the upstream did not answer in time"))
            self.close()
            return
        # While the agent is slow to read or still sending its body (not held up by the upstream not reading it),
        # silence is not the upstream's: look again later.
        wake = now + self._read_timeout if waiting_on_us else silent_until
        self._timer = self._loop.call_at(min(self._deadline, wake), self._check_time)


class UpstreamPool:
    """Idle keep-alive connections per PoolKey: (scheme, host, port, may-reach-internal-addresses, credential)."""

    def __init__(self, *, connect_timeout: float = 10.0, read_timeout: float = 120.0, total_timeout: float = 600.0,
                 resolver: Resolver = system_resolver) -> None:
        self.connect_timeout = connect_timeout
        self._timeouts = (read_timeout, total_timeout)  # between reads, and for the whole exchange
        # Made for the first TLS connection, beside the event loop: loading the CA store takes 50-100 ms, which a
        # start, and a daemon that only reaches plain-http upstreams, need not pay.
        self._tls: ssl.SSLContext | None = None
        self._tls_loading: asyncio.Lock | None = None
        self._resolve = resolver
        self._idle: dict[PoolKey, list[UpstreamResponse]] = {}
        self._parked: dict[UpstreamResponse, None] = {}  # every idle connection, the least recently parked first
        self._open: set[UpstreamResponse] = set()
        self._sweeper: asyncio.TimerHandle | None = None  # closes what stays idle too long, traffic or not
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    async def request(self, method: str, scheme: str, host: str, port: int, target: str,
                      headers: CIMultiDict[str], body: bytes | AsyncIterator[bytes] | None,
                      allow_internal: bool, credential: str,
                      still_current: Callable[[], bool] = lambda: True) -> UpstreamResponse:
        """Send one request and return once the answer's headers are in; call `release` after the body.

        `credential` (the credential's id) is part of the pool key: a connection is reused only for requests
        that carry the same credential. `still_current` is asked after a new connection is made (DNS, TCP, TLS:
        up to the connect timeout), right before the request, which carries the credential, is written to it."""
        head, chunked = request_head(method, target, headers, body)
        key = (scheme, host, port, allow_internal, credential)
        conn = self._idle_connection(key)
        replayable = not isinstance(body, AsyncIterator) and method in _IDEMPOTENT
        if conn is not None:
            try:
                conn.send(method, head, body, chunked, self._timeouts)
                await conn.wait_headers()
                return conn
            except UpstreamBroken:
                conn.release()
                if conn._got_bytes or not replayable:
                    raise
                # The upstream closed the idle connection just as it was reused: once more, on a fresh one.
                try:
                    conn = await self._connect(key)
                except UpstreamError as exc:  # the request went out once already: not "nothing was sent"
                    raise UpstreamBroken(str(exc)) from None
                if not still_current():  # refused as on a first connect: only an idempotent request gets here
                    conn.release()
                    raise Superseded("the vault, the policies or the clock changed while the gate reconnected "
                                     "upstream (a pooled connection had closed); nothing more sent: retry") from None
            except BaseException:
                conn.release()
                raise
        else:
            conn = await self._connect(key)
            if not still_current():
                conn.release()  # unused; release parks only a finished exchange, so this one is closed
                raise Superseded("the vault, the policies or the clock (an expiry, a time window) changed while "
                                 "the gate connected upstream; nothing was sent: retry")
        try:
            conn.send(method, head, body, chunked, self._timeouts)
            await conn.wait_headers()
        except BaseException:
            conn.release()
            raise
        return conn

    def _idle_connection(self, key: PoolKey) -> UpstreamResponse | None:
        idle = self._idle.get(key)
        now = self.loop.time()
        while idle:
            conn = self._unpark(idle[-1])  # the most recently parked
            if not conn.closed and now - conn.idle_since < _IDLE_SECONDS:
                conn.idle_since = 0.0
                return conn
            conn.close()
        return None

    async def _connect(self, key: PoolKey) -> UpstreamResponse:
        scheme, host, port, allow_internal, _ = key
        try:
            async with asyncio.timeout(self.connect_timeout):
                addresses = await self._resolve(host, port)
                if not allow_internal:
                    addresses = [a for a in addresses if not is_internal_ip(ip_address(a))]
                    if not addresses:
                        raise AddressNotAllowed(f"{host} resolves only to internal addresses; allowlist the "
                                                "address itself to permit it")
                return await self._dial(key, addresses, scheme == "https")
        except TimeoutError:
            raise UpstreamConnectTimeout("the upstream did not answer in time") from None

    async def _tls_context(self) -> ssl.SSLContext:
        if self._tls is None:
            if self._tls_loading is None:
                self._tls_loading = asyncio.Lock()
            async with self._tls_loading:
                if self._tls is None:
                    self._tls = await self.loop.run_in_executor(None, tls_context)
        return self._tls

    async def _dial(self, key: PoolKey, addresses: list[str], tls: bool) -> UpstreamResponse:
        """Connect to the first checked address that answers."""
        host, port = key[1], key[2]
        failure: UpstreamError = UpstreamError("could not connect to the upstream")
        context = await self._tls_context() if tls else None
        for address in addresses:
            try:
                _, conn = await self.loop.create_connection(
                    lambda: UpstreamResponse(self, key), address, port,
                    ssl=context, server_hostname=host if tls else None)
            except ssl.SSLCertVerificationError:
                raise UpstreamTLSError("the upstream's TLS certificate failed verification") from None
            except ssl.SSLError as exc:  # OpenSSL's reason says why (WRONG_VERSION_NUMBER: plain HTTP on that port)
                failure = UpstreamTLSError(f"the TLS handshake with the upstream failed ({exc.reason or 'no reason'})")
            except OSError as exc:  # the errno's name (ECONNREFUSED, ENETUNREACH) says why; neither holds a secret
                why = errno.errorcode.get(exc.errno or 0, "no errno")
                failure = UpstreamError(f"could not connect to the upstream ({why})")
            else:
                self._open.add(conn)
                return conn
        raise failure

    def _park(self, conn: UpstreamResponse) -> None:
        idle = self._idle.setdefault(conn.key, [])
        if len(idle) >= _MAX_IDLE_PER_HOST:
            conn.close()
            return
        if len(self._parked) >= _MAX_IDLE:
            self._unpark(next(iter(self._parked))).close()
            idle = self._idle.setdefault(conn.key, [])  # the one closed may have been its pool's last
        conn.idle_since = self.loop.time()
        idle.append(conn)
        self._parked[conn] = None
        if self._sweeper is None:
            self._sweeper = self.loop.call_later(_IDLE_SECONDS, self._sweep)

    def _unpark(self, conn: UpstreamResponse) -> UpstreamResponse:
        """Take `conn` out of the idle ones, its pool's list and the parking order."""
        del self._parked[conn]
        idle = self._idle[conn.key]
        if idle[-1] is conn:  # the reuse of the newest, on the hot path: no scan
            idle.pop()
        else:
            idle.remove(conn)
        if not idle:
            del self._idle[conn.key]
        return conn

    def _sweep(self) -> None:
        """Close connections idle too long, so unused pools do not hold sockets open; again while any is idle."""
        self._sweeper = None
        now = self.loop.time()
        for conn in [c for c in self._parked if c.closed or now - c.idle_since >= _IDLE_SECONDS]:
            self._unpark(conn).close()
        if self._parked:
            self._sweeper = self.loop.call_later(_IDLE_SECONDS, self._sweep)

    def _forget(self, conn: UpstreamResponse) -> None:
        self._open.discard(conn)
        if conn in self._parked:  # closed by the upstream while idle: no longer one of the idle kept
            self._unpark(conn)

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for conn in list(self._open):
            conn.close()
        self._idle.clear()
        self._parked.clear()
        await asyncio.sleep(0)
