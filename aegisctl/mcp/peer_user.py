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
import sys
from pathlib import Path
from typing import NoReturn

from starlette.types import ASGIApp, Receive, Scope, Send

PROC_NET = Path("/proc/net")
ESTABLISHED = "01"  # the `st` column; a closed connection's TIME_WAIT row says uid 0 and inode 0, whoever it was


class PeerUnknown(Exception):
    """The connection is not in the kernel's tables (it closed meanwhile, or is not TCP on this host)."""


def proc_address(host: str, port: int) -> str:
    """`host:port` as /proc/net/tcp{,6} writes it: the address's 32-bit words in host byte order, in hex."""
    if ":" in host:
        raw = socket.inet_pton(socket.AF_INET6, host.split("%", 1)[0])
    else:
        raw = socket.inet_pton(socket.AF_INET, host)
    words = (int.from_bytes(raw[i : i + 4], sys.byteorder) for i in range(0, len(raw), 4))
    return "".join(f"{word:08X}" for word in words) + f":{port:04X}"


def peer_uid(client: tuple[str, int], server: tuple[str, int], proc_net: Path = PROC_NET,
             platform: str = sys.platform) -> int | None:
    """The uid that owns the client's socket of the open connection `client` -> `server`, both on this host.

    None where the system keeps no such table (not Linux): the caller cannot tell, and says so in its docs.
    On Linux a missing table (/proc not mounted, a sandbox that hides it) is no excuse: PeerUnknown, as for
    a connection the table does not hold open (closed meanwhile, or never this one).
    """
    if platform != "linux":
        return None
    table = proc_net / ("tcp6" if ":" in client[0] else "tcp")
    local, remote = proc_address(*client), proc_address(*server)
    # Read line by line and stop at the row: this runs on the event loop for every HTTP request, and the kernel
    # writes the table as it is read, a row per socket on the machine.
    try:
        with table.open(encoding="ascii", errors="replace") as rows:
            for line in rows:
                if local not in line:  # cheap test first: most rows are other connections
                    continue
                fields = line.split()
                # sl local_address rem_address st tx_queue:rx_queue tr:tm->when retrnsmt uid timeout inode ...
                if (len(fields) > 9 and fields[1] == local and fields[2] == remote and fields[3] == ESTABLISHED
                        and fields[9] != "0"):
                    return int(fields[7])
    except OSError as exc:
        raise PeerUnknown(f"cannot read {table}: {exc.strerror or exc}") from None
    return _unknown(client)


def _unknown(client: tuple[str, int]) -> NoReturn:
    raise PeerUnknown(f"no TCP connection from {client[0]}:{client[1]} in the kernel's tables")


class PeerUserGuard:
    """ASGI middleware: an HTTP request is served only if the process that connected runs as this
    process's user or as root (who can read the bearer file anyway); anything else gets 403.

    It trusts `scope["client"]` to be the socket's own peer address: the server must not rewrite it from
    proxy headers (uvicorn's proxy_headers, on by default for loopback peers, must be off), or a client
    could name another process's connection with X-Forwarded-For.
    """

    def __init__(self, app: ASGIApp, uid: int | None = None, proc_net: Path = PROC_NET,
                 platform: str = sys.platform) -> None:
        self._app = app
        self._uid = os.getuid() if uid is None else uid
        self._proc_net = proc_net
        self._platform = platform

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":  # the bridge serves none; closed here rather than let past the check
            await send({"type": "websocket.close", "code": 1008})
            return
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
            uid = peer_uid(client, server, self._proc_net, self._platform)
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
