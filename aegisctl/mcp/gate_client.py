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
        self._session = aiohttp.ClientSession(headers={"User-Agent": f"aegisctl-mcp/{__version__}"},
                                              connector=CheckedConnector(self._trust),
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
                async with self._session.request(method, url, headers=sent, data=data, allow_redirects=False,
                                                 timeout=timeout) as resp:
                    pacer.answered()  # the answer has begun: from here sock_read bounds each wait
                    answer, truncated = await _read(resp, limit)
                    # aiohttp calls a missing Content-Type application/octet-stream; the bridge reads such a body as
                    # UTF-8 text first (results.body_text), so it keeps "none" apart.
                    media_type = resp.content_type if "Content-Type" in resp.headers else ""
                    reply = GateResponse(resp.status, resp.headers, answer, truncated, resp.charset, media_type,
                                         resp.headers.get(REQUEST_ID_HEADER, ""))
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


async def _read(resp: aiohttp.ClientResponse, limit: int) -> tuple[bytes, bool]:
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_any():
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            resp.close()  # drop the connection rather than read (or pool) what the model will not see
            return b"".join(chunks)[:limit], True
    return b"".join(chunks), False


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
