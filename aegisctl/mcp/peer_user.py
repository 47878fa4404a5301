"""Which local user holds the other end of a loopback TCP connection, read from /proc/net/tcp{,6} (Linux).

The MCP bridge's HTTP transport serves only its own user and root. Its bearer can be collected by a
process of another user that squats the port while the bridge is down; this check keeps such a process
from using the bearer against the real bridge afterwards. Unix sockets would say it with SO_PEERCRED,
but MCP hosts speak HTTP over TCP, and for TCP the kernel says it only through these tables.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import NoReturn

from starlette.types import ASGIApp, Receive, Scope, Send

PROC_NET = Path("/proc/net")


class PeerUnknown(Exception):
    """The connection is not in the kernel's tables (it closed meanwhile, or is not TCP on this host)."""


def proc_address(host: str, port: int) -> str:
    """`host:port` as /proc/net/tcp{,6} writes it: the address's 32-bit words in host byte order, in hex."""
    if ":" in host:
        raw = socket.inet_pton(socket.AF_INET6, host.split("%", 1)[0])
    else:
        raw = socket.inet_pton(socket.AF_INET, host)
    words = (int.from_bytes(raw[i : i + 4], "little") for i in range(0, len(raw), 4))
    return "".join(f"{word:08X}" for word in words) + f":{port:04X}"


def peer_uid(client: tuple[str, int], server: tuple[str, int], proc_net: Path = PROC_NET) -> int | None:
    """The uid that owns the client's socket of the connection `client` -> `server`, both on this host.

    None where the system keeps no such table (not Linux): the caller cannot tell, and says so in its docs.
    Raises PeerUnknown when the table exists but holds no such connection.
    """
    table = proc_net / ("tcp6" if ":" in client[0] else "tcp")
    try:
        lines = table.read_text().splitlines()[1:]
    except FileNotFoundError:
        return None if not proc_net.is_dir() else _unknown(client)
    local, remote = proc_address(*client), proc_address(*server)
    for line in lines:
        fields = line.split()
        # sl local_address rem_address st tx_queue:rx_queue tr:tm->when retrnsmt uid ...
        if len(fields) > 7 and fields[1] == local and fields[2] == remote:
            return int(fields[7])
    return _unknown(client)


def _unknown(client: tuple[str, int]) -> NoReturn:
    raise PeerUnknown(f"no TCP connection from {client[0]}:{client[1]} in the kernel's tables")


class PeerUserGuard:
    """ASGI middleware: an HTTP request is served only if the process that connected runs as this
    process's user or as root (who can read the bearer file anyway); anything else gets 403."""

    def __init__(self, app: ASGIApp, uid: int | None = None, proc_net: Path = PROC_NET) -> None:
        self._app = app
        self._uid = os.getuid() if uid is None else uid
        self._proc_net = proc_net

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            refusal = self._refusal(scope.get("client"), scope.get("server"))
            if refusal is not None:
                await _forbidden(send, refusal)
                return
        await self._app(scope, receive, send)

    def _refusal(self, client: tuple[str, int] | None, server: tuple[str, int] | None) -> str | None:
        if client is None or server is None:
            return "this bridge cannot tell which user connected (no peer address); it serves only its own user"
        try:
            uid = peer_uid(client, server, self._proc_net)
        except (PeerUnknown, OSError, ValueError) as exc:
            return f"this bridge cannot tell which user connected ({exc}); it serves only its own user"
        if uid is None or uid in (self._uid, 0):
            return None
        return (f"this bridge serves only the processes of its own user (uid {self._uid}) and root; "
                f"this connection comes from uid {uid}")


async def _forbidden(send: Send, message: str) -> None:
    body = json.dumps({"error": {"code": "peer_user_refused", "message": message}}).encode()
    await send({"type": "http.response.start", "status": 403,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
