"""The bridge's only way out: HTTP to the gate with the agent token, like any other agent.

A gate refusal is told apart from an upstream's own error response by its shape: a JSON
`{"error": {"code", "message", "request_id"}}` whose request id equals the response's
`X-Aegis-Request-Id`. The gate strips its headers before forwarding, so an upstream never
learns the request id and cannot pass its own answer off as the gate's. Only a small body is read as a
refusal (the gate's are a few hundred bytes); any other answer, however its JSON is nested, passes through
as the answer it is.
"""

from __future__ import annotations

import asyncio
import json
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import aiohttp
from aiohttp.abc import AbstractStreamWriter
from aiohttp.client_proto import ResponseHandler
from aiohttp.client_reqrep import ClientRequest
from aiohttp.payload import BytesPayload
from aiohttp.tracing import Trace
from multidict import CIMultiDictProxy
from yarl import URL

from aegisctl import __version__
from aegisctl.mcp.gate_trust import GateTrust, GateUntrusted

REQUEST_ID_HEADER = "X-Aegis-Request-Id"
OPERATOR_BODY_LIMIT = 1024 * 1024  # /_aegis answers are small; anything bigger is not the gate
PROXY_TOTAL = 900.0  # a backstop for a whole proxied call; the read timeout catches a stalled gate long before
CONNECT = 10.0  # the gate is on loopback: a connection that takes this long will not come
# The gate relays an upstream's answer head of up to 64 KiB, counting each header as its name and value plus 4 bytes:
# aiohttp's defaults (8190 bytes a line, 128 headers) would refuse an answer the gate delivered, after the request
# was carried out. So any line of the head fits, and a header for every 4 bytes of it (the gate counts at least 5 for
# each of the upstream's, and adds a few of its own).
GATE_HEAD_BYTES = 64 * 1024
# A gate refusal is {"error": {"code", "message", "request_id"}}: usually a few hundred bytes, but its message may
# quote the agent's path (up to the gate's 64 KiB head, more once JSON-escaped). Past this, an answer is the
# upstream's; a deeply nested one is caught by RecursionError, whatever its size.
REFUSAL_BYTES = 512 * 1024
SEND_CHUNK = 64 * 1024  # a request body goes out in pieces of this size, each within the read timeout
# The content codings the bridge decodes itself (aiohttp's own decoding is off: it raised on br or zstd, an answer
# the gate had delivered in full, and let any other coding through as if it were none). The gate decodes these too
# and forwards them plain, but not for a credential whose body inspection is off: then an answer keeps the
# upstream's coding, whichever the model asked for with Accept-Encoding.
DECODED_CODINGS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}
ACCEPT_ENCODING = "gzip, deflate"  # unless the model asks otherwise: only what the bridge can decode
# Compressed input goes to the decoder in slices of at most this size: a member's end copies what follows it in its
# slice, so a body of many tiny gzip members costs this much per member rather than the whole chunk.
INFLATE_SLICE = 4096
# Compressed bytes read for an answer, at most, as a multiple of the result limit: gzip or deflate output is rarely
# much smaller than its input, unless the input is padding (endless empty members, an endless header field) or a
# great many tiny members, which aiohttp's decoder and aegisd's bound too. Past it, what was decoded is the
# (truncated) answer.
WIRE_FACTOR = 4


class BridgeError(Exception):
    """A call that got no usable answer from the gate; `code` is stable, for the model to act on."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Refusal:
    """The gate refused the call at one of its steps."""

    status: int
    code: str
    message: str
    request_id: str
    retry_after: str | None = None


@dataclass
class GateResponse:
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes
    truncated: bool
    charset: str | None
    content_type: str  # the media type, lower-case; "" when the answer has no Content-Type
    request_id: str
    # The Content-Encoding still on `body`, as the gate relayed it: a coding the bridge does not decode (br, zstd,
    # several), or gzip/deflate data that does not decode; "" when the body is plain (decoded, or never encoded).
    encoded: str = ""
    refusal: Refusal | None = field(default=None)
    document: dict[str, Any] = field(default_factory=dict)  # an operator endpoint's JSON answer


class CheckedConnector(aiohttp.TCPConnector):
    """aiohttp's connector, checking the gate's end of each new connection before anything is sent on it
    (gate_trust); a pooled connection was checked when it was made."""

    def __init__(self, trust: GateTrust) -> None:
        # The check hooks the one method through which TCPConnector makes every connection; were it renamed in
        # an aiohttp release, the bridge must fail here rather than send tokens unchecked.
        if "_create_connection" not in vars(aiohttp.TCPConnector):
            raise RuntimeError("this aiohttp has no TCPConnector._create_connection; the gate check cannot run")
        super().__init__()
        self._trust = trust

    async def _create_connection(self, req: ClientRequest, traces: list[Trace],
                                 timeout: aiohttp.ClientTimeout) -> ResponseHandler:
        proto = await super()._create_connection(req, traces, timeout)
        try:
            transport = proto.transport
            await self._trust.verify(transport.get_extra_info("socket") if transport is not None else None)
        except GateUntrusted as exc:
            proto.close()
            raise BridgeError("gate_untrusted", str(exc)) from None
        except BaseException:
            proto.close()
            raise
        return proto


class GateClient:
    """One pooled aiohttp session to the gate, carrying this agent's token on every request.

    A /_aegis answer must come whole within `gate_timeout` seconds; a proxied call may wait at most
    `read_timeout` seconds for each read (the gate's own upstream timeouts are shorter), so a stalled
    gate is a prompt `gate_timeout` error, never a tool call that hangs.
    """

    def __init__(self, base_url: str, token: str, gate_timeout: float = 10.0, read_timeout: float = 150.0,
                 trust: GateTrust | None = None) -> None:
        self.base_url = base_url
        self._token = token
        self._trust = trust or GateTrust()
        self._operator_timeout = aiohttp.ClientTimeout(total=gate_timeout, sock_connect=min(CONNECT, gate_timeout))
        self._proxy_timeout = aiohttp.ClientTimeout(total=PROXY_TOTAL, sock_connect=min(CONNECT, read_timeout),
                                                    sock_read=read_timeout)
        self._send_timeout = read_timeout
        self._operator_limit = f"{gate_timeout:g} s (AEGIS_MCP_GATE_TIMEOUT)"
        self._proxy_limit = f"{read_timeout:g} s between reads (AEGIS_MCP_READ_TIMEOUT), or {PROXY_TOTAL:g} s in all"
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> GateClient:
        self._session = aiohttp.ClientSession(headers={"User-Agent": f"aegisctl-mcp/{__version__}",
                                                       "Accept-Encoding": ACCEPT_ENCODING},
                                              connector=CheckedConnector(self._trust), auto_decompress=False,
                                              max_line_size=GATE_HEAD_BYTES, max_field_size=GATE_HEAD_BYTES,
                                              max_headers=GATE_HEAD_BYTES // 4)
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._session is not None:
            await self._session.close()

    async def request(self, method: str, target: str, headers: dict[str, str], body: bytes | None,
                      limit: int) -> GateResponse:
        """Send one request; read at most `limit` bytes of the answer (`truncated` says if there was more)."""
        return await self._request(method, target, headers, body, limit, self._proxy_timeout, self._proxy_limit)

    async def _request(self, method: str, target: str, headers: dict[str, str], body: bytes | None,
                       limit: int, timeout: aiohttp.ClientTimeout, waited: str) -> GateResponse:
        assert self._session is not None, "use GateClient as an async context manager"
        sent = {**headers, "X-Aegis-Agent": self._token}
        url = URL(self.base_url + target, encoded=True)
        try:
            # aiohttp's sock_read bounds only the reads: a gate that stops reading a large body would hold the
            # call until the 900 s backstop. So the body goes out in pieces, and a piece that cannot leave
            # within the read timeout (the gate's receive buffer stays full) ends the call as gate_timeout.
            async with asyncio.timeout(None) as deadline:
                pacer = SendDeadline(deadline, self._send_timeout)
                data = PacedBody(body, pacer) if body else body
                # skip_auto_headers: aiohttp would label a body the model sent without a Content-Type
                # application/octet-stream, a type the model never chose; one the model gives is sent as given.
                async with self._session.request(method, url, headers=sent, data=data, allow_redirects=False,
                                                 timeout=timeout, skip_auto_headers=("Content-Type",)) as resp:
                    pacer.answered()  # the answer has begun: from here sock_read bounds each wait
                    answer, truncated, encoded = await _read(resp, limit)
                    # aiohttp calls a missing Content-Type application/octet-stream; the bridge reads such a body as
                    # UTF-8 text first (results.body_text), so it keeps "none" apart.
                    media_type = resp.content_type if "Content-Type" in resp.headers else ""
                    reply = GateResponse(resp.status, resp.headers, answer, truncated, resp.charset, media_type,
                                         resp.headers.get(REQUEST_ID_HEADER, ""), encoded)
        except aiohttp.ClientConnectorError as exc:
            raise BridgeError("gate_unreachable", f"cannot reach the Aegis gate at {self.base_url} "
                              f"({exc.strerror or type(exc).__name__}); is aegisd running?") from None
        except TimeoutError as exc:
            # Past the connect, the request may have gone out and been forwarded, as for outcome_unknown below.
            sent_already = "" if isinstance(exc, aiohttp.ConnectionTimeoutError) else (
                "; the request may already have been carried out: check before sending it again")
            raise BridgeError("gate_timeout", f"the Aegis gate at {self.base_url} did not answer within "
                              f"{waited}; it may be stalled: check aegisd (`aegisctl status`, "
                              f"its log){sent_already}") from None
        except aiohttp.ClientPayloadError:
            raise BridgeError("response_incomplete", "the response was cut off before its end (the upstream "
                              "failed mid-body, or the gate could not record it in the audit ledger)") from None
        except (aiohttp.ClientError, OSError) as exc:
            # Connected, so the request may have gone out and been forwarded: "unreachable" would invite a retry, and
            # a write carried out twice.
            raise BridgeError("outcome_unknown", f"the connection to the Aegis gate at {self.base_url} failed "
                              f"before its answer could be read ({type(exc).__name__}); the request may already have "
                              "been carried out: check before sending it again") from None
        except ValueError as exc:  # aiohttp's own check of what goes on the wire (a control character in a header)
            raise BridgeError("invalid_argument", f"the request cannot be sent as given: {exc}") from None
        if not truncated:
            reply.refusal = _refusal(reply)
        return reply

    async def operator(self, endpoint: str) -> GateResponse:
        """GET one of the gate's own endpoints (`/_aegis/...`): a refusal, or its JSON object in `document`."""
        reply = await self._request("GET", f"/_aegis/{endpoint}", {}, None, OPERATOR_BODY_LIMIT,
                                    self._operator_timeout, self._operator_limit)
        if reply.refusal is not None:
            return reply
        try:
            document = json.loads(reply.body) if reply.status == 200 and not reply.truncated else None
        except (ValueError, RecursionError):
            document = None
        if not isinstance(document, dict):
            raise BridgeError("gate_error", f"/_aegis/{endpoint} answered HTTP {reply.status} without the JSON "
                              f"the gate sends; is {self.base_url} really the Aegis gate?")
        reply.document = document
        return reply


class SendDeadline:
    """The deadline for sending a request body: `limit` seconds without progress (a piece handed over, or bytes
    leaving the connection's write buffer), none once all is sent or the answer has begun. It moves `deadline`,
    the asyncio.timeout around the whole request."""

    def __init__(self, deadline: asyncio.Timeout, limit: float) -> None:
        self._deadline = deadline
        self._limit = limit
        self._answered = False

    @property
    def limit(self) -> float:
        return self._limit

    def piece(self) -> None:
        """Progress: `limit` seconds from now."""
        if not self._answered:
            self._deadline.reschedule(asyncio.get_running_loop().time() + self._limit)

    def sent(self) -> None:
        if not self._answered:
            self._deadline.reschedule(None)

    def answered(self) -> None:
        self._answered = True
        self._deadline.reschedule(None)


class PacedBody(BytesPayload):
    """A bytes body (the same on the wire: Content-Length, no chunks) written in pieces of SEND_CHUNK bytes.
    aiohttp's writer waits for the socket to drain after each, so a gate that stopped reading leaves a piece
    waiting past its deadline. Bytes, so aiohttp can send it again should it retry on a fresh connection."""

    def __init__(self, value: bytes, pacer: SendDeadline) -> None:
        super().__init__(value)
        self._pacer = pacer

    async def write(self, writer: AbstractStreamWriter) -> None:
        await self.write_with_length(writer, None)

    async def write_with_length(self, writer: AbstractStreamWriter, content_length: int | None) -> None:
        value = self._value if content_length is None else self._value[:content_length]
        transport = getattr(writer, "transport", None)
        written = 0
        # aiohttp's writer waits for its buffer to drain from 64 KiB down to 16 KiB, so one piece's wait can cover
        # more than one piece: a gate reading slowly but steadily shows as the buffer shrinking, watched here.
        watch = asyncio.ensure_future(self._watch(transport, lambda: written)) if transport is not None else None
        try:
            for start in range(0, len(value), SEND_CHUNK):
                self._pacer.piece()
                piece = value[start : start + SEND_CHUNK]
                written += len(piece)
                await writer.write(piece)
        finally:
            if watch is not None:
                watch.cancel()
        self._pacer.sent()

    async def _watch(self, transport: asyncio.WriteTransport, written: Callable[[], int]) -> None:
        """Count as progress every byte that left the write buffer since the last look (a quarter of the limit)."""
        left = 0
        while True:
            await asyncio.sleep(self._pacer.limit / 4)
            now = written() - transport.get_write_buffer_size()
            if now > left:
                left = now
                self._pacer.piece()


async def _read(resp: aiohttp.ClientResponse, limit: int) -> tuple[bytes, bool, str]:
    """At most `limit` bytes of the answer's body, decoded when its Content-Encoding is one of DECODED_CODINGS:
    (body, whether there was more, the Content-Encoding still on the body). Decoded output is bounded as it is
    made, so a gzip bomb costs `limit` bytes, not what it expands to. A body that does not decode comes back as
    received (up to `limit` bytes), still encoded."""
    encoded = ", ".join(resp.headers.getall("Content-Encoding", ()))
    codings = content_codings(encoded)
    encoded = encoded if codings else ""
    inflater = Inflater(codings[0]) if decodable(encoded) else None
    received = bytearray()  # the body as it came, up to limit + 1 bytes: what is shown if it does not decode
    decoded = bytearray()
    wire = 0  # compressed bytes read: bounded too, or endless empty gzip members would be read (and decoded) for ever
    try:
        async for chunk in resp.content.iter_any():
            wire += len(chunk)
            if len(received) <= limit:
                received += chunk[: limit + 1 - len(received)]
            if inflater is not None:
                decoded += inflater.feed(chunk, limit + 1 - len(decoded))
                if len(decoded) > limit:
                    break
                if wire > WIRE_FACTOR * limit + INFLATE_SLICE:  # far more sent than it decodes to: cut it there
                    resp.close()
                    return bytes(decoded), True, ""
            elif len(received) > limit:
                break
        else:
            if inflater is not None:
                inflater.finish()
    except zlib.error:
        inflater = None  # not the gzip or deflate data it says it is: shown as received, still encoded
        if len(received) <= limit:
            async for chunk in resp.content.iter_any():
                received += chunk[: limit + 1 - len(received)]
                if len(received) > limit:
                    break
    body = decoded if inflater is not None else received
    truncated = len(body) > limit
    if truncated:
        resp.close()  # drop the connection rather than read (or pool) what the model will not see
    return bytes(body[:limit]), truncated, "" if inflater is not None else encoded


def content_codings(encoded: str) -> list[str]:
    """The codings a Content-Encoding value (its fields joined with ", ") names, lower-case, without identity."""
    names = (name.strip().lower() for name in encoded.split(","))
    return [name for name in names if name and name != "identity"]


def decodable(encoded: str) -> bool:
    """Whether the bridge decodes a body in this Content-Encoding: one coding, and one of DECODED_CODINGS."""
    codings = content_codings(encoded)
    return len(codings) == 1 and codings[0] in DECODED_CODINGS


class Inflater:
    """Decodes a body in one of DECODED_CODINGS as it arrives, as gzip(1) does: members one after another (zero
    bytes between them skipped), and for deflate either the zlib format RFC 9110 names or raw deflate, which some
    servers send under that name. zlib.error when the data is not what it claims, or ends inside a member."""

    def __init__(self, coding: str) -> None:
        self._gzip = coding != "deflate"
        self._wbits = DECODED_CODINGS[coding]
        self._member: zlib._Decompress | None = None  # the member being decoded
        self._members = 0  # members begun
        self._held = b""  # deflate: input held until its first two bytes tell zlib format from raw

    def feed(self, data: bytes, room: int) -> bytes:
        """What `data` decodes to, stopping once `room` bytes are made (the rest of the input is then dropped:
        the caller reads no further)."""
        out: list[bytes] = []
        made = 0
        data, self._held = self._held + data, b""
        carried = b""  # the start of a deflate member, too short to tell its format, carried into the next slice
        at = 0
        while at < len(data) and made < room:
            piece, carried = carried + data[at : at + INFLATE_SLICE], b""
            at += INFLATE_SLICE
            while piece and made < room:
                if self._member is None:
                    if self._gzip and self._members:
                        piece = piece.lstrip(b"\0")  # padding between members, which gzip(1) skips
                        if not piece:
                            break
                    elif not self._gzip and len(piece) < 2:
                        if at < len(data):
                            carried = piece
                        else:
                            self._held = piece  # wait for the next chunk
                        break
                    self._members += 1
                    self._member = zlib.decompressobj(self._wbits if self._gzip or _zlib_header(piece) else
                                                      -zlib.MAX_WBITS)
                made_now = self._member.decompress(piece, room - made)
                out.append(made_now)
                made += len(made_now)
                if self._member.eof:
                    piece = self._member.unused_data
                    self._member = None
                else:
                    piece = self._member.unconsumed_tail
        return b"".join(out)

    def finish(self) -> None:
        """zlib.error unless the body ended where a member did (or held no member at all)."""
        if self._held or (self._member is not None and not self._member.eof):
            raise zlib.error("the compressed body ends inside a member")


def _zlib_header(data: bytes) -> bool:
    """Whether `data` starts with a zlib header (RFC 1950): deflate with a window of at most 32 KiB, and a check."""
    return data[0] & 0x0F == 8 and data[0] >> 4 <= 7 and (data[0] << 8 | data[1]) % 31 == 0


def _refusal(reply: GateResponse) -> Refusal | None:
    if (reply.status < 400 or not reply.request_id or reply.content_type != "application/json"
            or len(reply.body) > REFUSAL_BYTES or not reply.body.lstrip().startswith(b"{")):
        return None  # not the gate's small flat object: an upstream's answer, passed through as one
    try:
        error = json.loads(reply.body).get("error")
    except (ValueError, AttributeError, RecursionError):  # RecursionError: nested past Python's parser
        return None
    if not isinstance(error, dict) or error.get("request_id") != reply.request_id:
        return None
    code, message = error.get("code"), error.get("message")
    if not isinstance(code, str) or not isinstance(message, str):
        return None
    return Refusal(reply.status, code, message, reply.request_id, reply.headers.get("Retry-After"))
