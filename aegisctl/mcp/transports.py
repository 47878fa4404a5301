"""The MCP transports the bridge serves: stdio for a host that starts it, streamable HTTP on loopback.

Over HTTP the MCP endpoint demands `Authorization: Bearer <this bridge's MCP bearer>`: otherwise any
local process, or another user on the machine, could use this agent's grants without a token. The
bearer is the bridge's own, never the agent token: a host sends it to whatever listens on the port,
and a process squatting the port while the bridge is down must not collect a token the gate accepts.
On Linux the endpoint also serves only processes of the bridge's own user and root (peer_user), so a
squatter of another user cannot use a bearer it collected. That check runs as each connection is accepted,
before uvicorn reads a byte of it (AcceptGuard): uvicorn sets no deadline on a request head that never
ends, so another user's connections, held open with half a head each, would otherwise pile up until the
bridge has no file descriptor left to accept its own host's connection.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import socket
from collections.abc import Callable
from typing import Any, ClassVar, cast

import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from aegisctl.mcp.gate_client import GateClient
from aegisctl.mcp.peer_user import PeerUserGuard, forbidden_response, peer_refusal
from aegisctl.mcp.tools import build_server

MCP_PATH = "/mcp"
LINGER = 2.0  # seconds a refused connection is given to read its 403 before it is closed
LINGERING_MAX = 32  # refused connections given that time at once; past this many, one is closed at once


class ListenError(Exception):
    """The HTTP transport cannot bind its address."""


async def serve_stdio(gate: GateClient) -> None:
    await build_server(gate).run_stdio_async()


async def serve_http(gate: GateClient, bearer: str, host: str, port: int, ready: Callable[[str], None]) -> None:
    """Bind first (so a busy port fails before anything is announced), then call `ready(url)` and serve."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise ListenError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    app = PeerUserGuard(BearerGuard(build_server(gate).streamable_http_app(streamable_http_path=MCP_PATH, host=host),
                                    bearer))
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    ready(f"http://{shown}:{sock.getsockname()[1]}{MCP_PATH}")
    # No proxy headers: PeerUserGuard must see the socket's own peer, which X-Forwarded-For would replace.
    # AcceptGuard: uvicorn's own HTTP protocol, for the connections of this user's and root's processes only.
    # A subclass per server, so the refused connections lingering are this server's alone.
    guard = type("ServerAcceptGuard", (AcceptGuard,), {"lingering": set()})
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on", proxy_headers=False,
                            http=guard)
    await uvicorn.Server(config).serve(sockets=[sock])


class AcceptGuard(asyncio.Protocol):
    """Who connected, checked as the connection is accepted: a connection of this user's or root's process is
    handed to uvicorn's HTTP protocol; any other gets the same 403 `peer_user_refused` as from PeerUserGuard,
    written at once, and is closed without a byte of it being read or parsed. The answer's connection lingers
    LINGER seconds (at most LINGERING_MAX at once, the rest are closed at once) so that a client whose request
    is still arriving reads the 403 rather than a reset; whatever it sends meanwhile is dropped unread."""

    lingering: ClassVar[set[AcceptGuard]] = set()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._made = (args, kwargs)  # uvicorn's arguments for its own protocol, passed on as they came
        self._closer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        stream = cast(asyncio.Transport, transport)
        try:
            self._admit(stream)
        except BaseException:  # never an accepted connection left open and unread (a uvicorn that changed, say)
            stream.abort()
            raise

    def _admit(self, stream: asyncio.Transport) -> None:
        refusal = peer_refusal(_address(stream.get_extra_info("peername")),
                               _address(stream.get_extra_info("sockname")), os.getuid())
        if refusal is None:
            args, kwargs = self._made
            served = AutoHTTPProtocol(*args, **kwargs)
            stream.set_protocol(served)
            served.connection_made(stream)
            return
        stream.write(forbidden_response(refusal))
        if len(self.lingering) >= LINGERING_MAX or not stream.can_write_eof():
            stream.close()
            return
        stream.write_eof()
        self.lingering.add(self)
        self._closer = asyncio.get_running_loop().call_later(LINGER, stream.close)

    def data_received(self, data: bytes) -> None:
        pass  # a refused connection's request: never read

    def eof_received(self) -> bool:
        return False  # the client has read its answer and is done: close

    def connection_lost(self, exc: Exception | None) -> None:
        self.lingering.discard(self)
        if self._closer is not None:
            self._closer.cancel()


def _address(name: Any) -> tuple[str, int] | None:
    """(host, port) of a socket name; None for anything else (an AF_UNIX name, none at all)."""
    if isinstance(name, tuple) and len(name) >= 2 and isinstance(name[0], str) and isinstance(name[1], int):
        return name[0], name[1]
    return None


class BearerGuard:
    """ASGI middleware: every HTTP request must carry exactly one `Authorization: Bearer <MCP bearer>`, the
    bearer compared in constant time. The scheme is case-insensitive and may be followed by more than one space
    (RFC 9110 11.4, 11.6.2): a host that sends `bearer <MCP bearer>` is not refused."""

    def __init__(self, app: ASGIApp, bearer: str) -> None:
        self._app = app
        self._expected = bearer.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            given = [value for name, value in scope["headers"] if name == b"authorization"]
            if len(given) != 1 or not self._matches(given[0]):
                await _unauthorized(send, "agent_auth_required" if not given else "agent_auth_invalid")
                return
        await self._app(scope, receive, send)

    def _matches(self, field: bytes) -> bool:
        """Whether an Authorization field is this bridge's bearer: `<scheme> <bearer>`, the scheme `Bearer` in any
        case, as hosts may send it."""
        scheme, _, credentials = field.partition(b" ")
        bearer = credentials.lstrip(b" ")
        # Both compared whatever the scheme, so the time taken says nothing of the bearer.
        return hmac.compare_digest(bearer, self._expected) & (scheme.lower() == b"bearer")


async def _unauthorized(send: Send, code: str) -> None:
    message = ("send this bridge's MCP bearer as Authorization: Bearer <bearer>; `aegisctl mcp config HOST "
               "--transport http` prints the host's entry" if code == "agent_auth_required"
               else "the bearer is not this bridge's MCP bearer (the agent token is not accepted here); "
               "`aegisctl mcp config HOST --transport http` prints the host's entry")
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    await send({"type": "http.response.start", "status": 401,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"www-authenticate", b'Bearer realm="aegis-mcp"')]})
    await send({"type": "http.response.body", "body": body})
