"""Which local user holds an end of a loopback TCP connection, asked of the kernel (Linux): its sock_diag netlink
interface for that one connection, else the rows of /proc/net/tcp{,6}.

The MCP bridge's HTTP transport serves only its own user and root. Its bearer can be collected by a
process of another user that squats the port while the bridge is down; this check keeps such a process
from using the bearer against the real bridge afterwards. Unix sockets would say it with SO_PEERCRED,
but MCP hosts speak HTTP over TCP, and for TCP the kernel says it only through these interfaces. The bridge's
gate client asks the same of the gate's end of each connection before it sends its token there (gate_trust).
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import struct
import sys
from pathlib import Path
from typing import NoReturn

from starlette.types import ASGIApp, Receive, Scope, Send

PROC_NET = Path("/proc/net")
ESTABLISHED = "01"  # the `st` column; a closed connection's TIME_WAIT row says uid 0 and inode 0, whoever it was
SYN_RECV = "03"  # a connection the server's kernel is completing: its row names the listening socket's owner
NETLINK_SOCK_DIAG, SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, TCP_ESTABLISHED = 4, 20, 1, 1  # <linux/sock_diag.h> & co


class PeerUnknown(Exception):
    """The connection is not in the kernel's tables (it closed meanwhile, or is not TCP on this host)."""


class TableUnreadable(PeerUnknown):
    """The kernel's table cannot be read at all (/proc not mounted, or hidden by a sandbox)."""


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
    return socket_uid(client, server, proc_net, platform)


def socket_uid(local: tuple[str, int], remote: tuple[str, int], proc_net: Path = PROC_NET,
               platform: str = sys.platform, *, accepting: bool = False) -> int | None:
    """The uid that owns the socket at `local` of the open TCP connection `local` <-> `remote`, both on this host.

    With `accepting`, `local` may be a server's end that no process has accepted yet (a SYN_RECV row, or an
    ESTABLISHED one without an inode): the kernel then writes the listening socket's owner in its row, and once
    accepted the accepting process's. That owner is the user whose process created the socket (or accepted the
    connection), not necessarily the one whose process will read what is sent: a socket keeps its owner when it
    is handed on, so a listener that root created and gave to a process of another user (systemd socket
    activation with User=, inetd) reads as uid 0 until that process accepts. Only its owner (or root) can set that up.
    None where the system keeps no such table (not Linux); PeerUnknown as for peer_uid.
    """
    if platform != "linux":
        return None
    if proc_net == PROC_NET:  # the kernel's own answer for this one connection, without walking every socket
        uid = _diag_uid(local, remote, accepting)
        if uid is not None:
            return uid
    states = (ESTABLISHED, SYN_RECV) if accepting else (ESTABLISHED,)
    for index, (table, here, there) in enumerate(_rows_to_find(local, remote)):
        uid = _find(proc_net / table, here, there, states, accepting, required=index == 0)
        if uid is not None:
            return uid
    return _unknown(local)


def _diag_uid(local: tuple[str, int], remote: tuple[str, int], accepting: bool) -> int | None:
    """The owner of the ESTABLISHED socket `local` <-> `remote`, asked of the kernel's sock_diag netlink interface
    (what `ss` uses): a hash lookup of this one connection, where /proc/net/tcp walks every bucket of the table
    (milliseconds on a machine with much memory). None when it has no such answer: no netlink (a sandbox), no
    such socket, or one still in SYN_RECV, for which sock_diag writes uid 0 rather than the listener's owner;
    the caller then reads /proc/net, whose rows say it right."""
    family = socket.AF_INET6 if ":" in local[0] or ":" in remote[0] else socket.AF_INET
    try:
        here = socket.inet_pton(family, local[0].split("%", 1)[0]).ljust(16, b"\0")
        there = socket.inet_pton(family, remote[0].split("%", 1)[0]).ljust(16, b"\0")
        wanted = struct.pack("!HH", local[1], remote[1]) + here + there
        # struct inet_diag_req_v2 (family, protocol, ext, pad, states) and its inet_diag_sockid (ports, addresses,
        # interface, cookie: none), behind a netlink header asking for this one socket (no NLM_F_DUMP).
        request = (struct.pack("=BBBBI", family, socket.IPPROTO_TCP, 0, 0, 0xFFFFFFFF) + wanted
                   + struct.pack("=III", 0, 0xFFFFFFFF, 0xFFFFFFFF))
        header = struct.pack("=IHHII", 16 + len(request), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, 1, 0)
        with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as diag:
            diag.settimeout(1.0)
            diag.send(header + request)
            answer = diag.recv(8192)
    except (OSError, ValueError, AttributeError):  # AttributeError: no AF_NETLINK in this Python
        return None
    # nlmsghdr (16 bytes), then struct inet_diag_msg: family, state, timer, retrans, the sockid (48 bytes),
    # expires, rqueue, wqueue, uid, inode.
    if len(answer) < 16 + 72 or struct.unpack_from("=H", answer, 4)[0] != SOCK_DIAG_BY_FAMILY:
        return None  # NLMSG_ERROR: ENOENT when no socket has that address pair
    state = answer[17]
    uid, inode = struct.unpack_from("=II", answer, 16 + 64)
    if answer[20:56] != wanted or state != TCP_ESTABLISHED or (inode == 0 and not accepting):
        return None
    return int(uid)


def _rows_to_find(local: tuple[str, int], remote: tuple[str, int]) -> list[tuple[str, str, str]]:
    """(table, local, remote) as the kernel may write the connection. An IPv4 connection (or one between
    IPv4-mapped addresses) is in `tcp` for an AF_INET socket and in `tcp6`, mapped, for an AF_INET6 one (a
    dual-stack server, or a client that connected to ::ffff:127.0.0.1)."""
    here, there = _ipv4(local[0]), _ipv4(remote[0])
    if here is None or there is None:
        return [("tcp6", proc_address(*local), proc_address(*remote))]
    return [("tcp", proc_address(here, local[1]), proc_address(there, remote[1])),
            ("tcp6", proc_address("::ffff:" + here, local[1]), proc_address("::ffff:" + there, remote[1]))]


def _ipv4(host: str) -> str | None:
    """The IPv4 address `host` is or maps (::ffff:a.b.c.d); None for any other IPv6 address."""
    if ":" not in host:
        return host
    address = ipaddress.IPv6Address(host.split("%", 1)[0])
    return str(address.ipv4_mapped) if address.ipv4_mapped is not None else None


def _find(table: Path, local: str, remote: str, states: tuple[str, ...], accepting: bool,
          required: bool) -> int | None:
    # Read line by line and stop at the row: this runs on the event loop, and the kernel writes the table as it
    # is read, a row per socket on the machine.
    try:
        with table.open(encoding="ascii", errors="replace") as rows:
            for line in rows:
                if local not in line:  # cheap test first: most rows are other connections
                    continue
                fields = line.split()
                # sl local_address rem_address st tx_queue:rx_queue tr:tm->when retrnsmt uid timeout inode ...
                if (len(fields) > 9 and fields[1] == local and fields[2] == remote and fields[3] in states
                        and (accepting or fields[9] != "0")):
                    return int(fields[7])
    except FileNotFoundError:
        if required:
            raise TableUnreadable(f"cannot read {table}: it does not exist") from None
    except OSError as exc:
        if required:
            raise TableUnreadable(f"cannot read {table}: {exc.strerror or exc}") from None
    return None


def _unknown(end: tuple[str, int]) -> NoReturn:
    raise PeerUnknown(f"no TCP connection from {end[0]}:{end[1]} in the kernel's tables")


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
        return peer_refusal(client, server, self._uid, self._proc_net, self._platform)


def peer_refusal(client: tuple[str, int] | None, server: tuple[str, int] | None, uid: int,
                 proc_net: Path = PROC_NET, platform: str = sys.platform) -> str | None:
    """Why the connection `client` -> `server` is not served (its process runs as neither `uid` nor root, or
    cannot be told), or None when it is."""
    if client is None or server is None:
        return "this bridge cannot tell which user connected (no peer address); it serves only its own user"
    try:
        peer = peer_uid(client, server, proc_net, platform)
    except (PeerUnknown, OSError, ValueError) as exc:
        return f"this bridge cannot tell which user connected ({exc}); it serves only its own user"
    if peer is None or peer in (uid, 0):
        return None
    return (f"this bridge serves only the processes of its own user (uid {uid}) and root; "
            f"this connection comes from uid {peer}")


def forbidden_response(message: str) -> bytes:
    """A whole HTTP/1.1 403 answer, closing the connection, for a connection refused before it is read."""
    body = json.dumps({"error": {"code": "peer_user_refused", "message": message}}).encode()
    head = (f"HTTP/1.1 403 Forbidden\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n")
    return head.encode() + body


async def _forbidden(send: Send, message: str) -> None:
    body = json.dumps({"error": {"code": "peer_user_refused", "message": message}}).encode()
    await send({"type": "http.response.start", "status": 403,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
