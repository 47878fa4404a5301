"""The MCP transports the bridge serves: stdio for a host that starts it, streamable HTTP on loopback.

Over HTTP the MCP endpoint demands `Authorization: Bearer <this bridge's MCP bearer>`: otherwise any
local process, or another user on the machine, could use this agent's grants without a token. The
bearer is the bridge's own, never the agent token: a host sends it to whatever listens on the port,
and a process squatting the port while the bridge is down must not collect a token the gate accepts.
On Linux the endpoint also serves only processes of the bridge's own user and root (peer_user), so a
squatter of another user cannot use a bearer it collected.
"""

from __future__ import annotations

import hmac
import json
import socket
from collections.abc import Callable

import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send

from aegisctl.mcp.gate_client import GateClient
from aegisctl.mcp.peer_user import PeerUserGuard
from aegisctl.mcp.tools import build_server

MCP_PATH = "/mcp"


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
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on", proxy_headers=False)
    await uvicorn.Server(config).serve(sockets=[sock])


class BearerGuard:
    """ASGI middleware: every HTTP request must carry exactly `Authorization: Bearer <MCP bearer>`,
    compared in constant time."""

    def __init__(self, app: ASGIApp, bearer: str) -> None:
        self._app = app
        self._expected = f"Bearer {bearer}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            given = [value for name, value in scope["headers"] if name == b"authorization"]
            if len(given) != 1 or not hmac.compare_digest(given[0], self._expected):
                await _unauthorized(send, "agent_auth_required" if not given else "agent_auth_invalid")
                return
        await self._app(scope, receive, send)


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
