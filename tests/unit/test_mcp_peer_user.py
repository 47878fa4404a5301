"""peer_user: the uid behind a loopback TCP connection, read from the kernel's own tables, and the
middleware that serves only the bridge's user and root."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from starlette.types import Message, Receive, Scope, Send

from aegisctl.mcp.peer_user import PeerUnknown, PeerUserGuard, peer_uid, proc_address

LINUX = Path("/proc/net/tcp").exists()


def test_proc_address_matches_the_kernels_notation() -> None:
    assert proc_address("127.0.0.1", 8080) == "0100007F:1F90"
    assert proc_address("::1", 443) == "00000000000000000000000001000000:01BB"
    assert proc_address("::ffff:127.0.0.1", 1) == "0000000000000000FFFF00000100007F:0001"


@pytest.fixture
def loopback_pair() -> Iterator[tuple[tuple[str, int], tuple[str, int]]]:
    """A real connection on 127.0.0.1: (the client's address, the server's address)."""
    with socket.create_server(("127.0.0.1", 0)) as server, socket.create_connection(server.getsockname()) as client:
        accepted, _ = server.accept()
        with accepted:
            yield client.getsockname(), server.getsockname()


@pytest.mark.skipif(not LINUX, reason="the kernel's TCP tables are Linux's /proc/net")
def test_peer_uid_of_a_real_connection_is_ours(
        loopback_pair: tuple[tuple[str, int], tuple[str, int]]) -> None:
    client, server = loopback_pair
    assert peer_uid(client, server) == os.getuid()
    with pytest.raises(PeerUnknown):  # the same client port towards another server: no such connection
        peer_uid(client, (server[0], server[1] ^ 1))


@pytest.mark.skipif(not LINUX or not socket.has_ipv6, reason="needs Linux and IPv6")
def test_peer_uid_over_ipv6_loopback() -> None:
    try:
        server = socket.create_server(("::1", 0), family=socket.AF_INET6)
    except OSError:
        pytest.skip("no ::1 on this host")
    with server, socket.create_connection(server.getsockname()[:2]) as client:
        accepted, _ = server.accept()
        with accepted:
            assert peer_uid(client.getsockname()[:2], server.getsockname()[:2]) == os.getuid()


def _table(tmp_path: Path, uid: int, state: str = "01", inode: int = 4242) -> Path:
    """A /proc/net stand-in holding one connection 127.0.0.1:40000 -> 127.0.0.1:8765 owned by `uid`, in
    `state` (01 is ESTABLISHED; a TIME_WAIT row, 06, says uid 0 and inode 0 whoever owned it)."""
    net = tmp_path / "net"
    net.mkdir(parents=True)
    (net / "tcp").write_text(
        "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
        f"   0: 0100007F:9C40 0100007F:223D {state} 00000000:00000000 00:00000000 00000000  {uid:>5}        0 "
        f"{inode} 1\n")
    return net


def _serve(proc_net: Path, client: tuple[str, int] | None, platform: str = "linux") -> tuple[int, bytes, bool]:
    """One HTTP request through a guard (for uid 1000, reading `proc_net`) in front of an app that answers
    200: (status, body, whether the app was reached)."""
    reached = []
    sent: list[Message] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        reached.append(True)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def record(message: Message) -> None:
        sent.append(message)

    async def receive() -> Message:
        return {"type": "http.request", "body": b""}

    scope: Scope = {"type": "http", "client": client, "server": ("127.0.0.1", 8765), "headers": []}
    anyio.run(PeerUserGuard(app, uid=1000, proc_net=proc_net, platform=platform), scope, receive, record)
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:]), bool(reached)


def test_guard_serves_its_own_user_and_root(tmp_path: Path) -> None:
    for owner in (1000, 0):
        status, _, reached = _serve(_table(tmp_path / str(owner), owner), ("127.0.0.1", 40000))
        assert (status, reached) == (200, True)


def test_guard_refuses_another_user_without_reaching_the_app(tmp_path: Path) -> None:
    status, body, reached = _serve(_table(tmp_path, 1001), ("127.0.0.1", 40000))
    assert (status, reached) == (403, False)
    assert b'"peer_user_refused"' in body and b"uid 1001" in body and b"uid 1000" in body


def test_guard_refuses_a_connection_it_cannot_find(tmp_path: Path) -> None:
    table = _table(tmp_path, 1000)
    for client in (("127.0.0.1", 40001), None):  # not in the table; no peer address at all
        status, body, reached = _serve(table, client)
        assert (status, reached) == (403, False) and b"cannot tell which user" in body


def test_guard_refuses_a_closed_connections_row(tmp_path: Path) -> None:
    """A TIME_WAIT row names no owner (uid 0, inode 0): a client must not pass as root by naming the port of a
    connection it opened and closed."""
    for state, inode in (("06", 0), ("01", 0), ("08", 4242)):
        status, body, reached = _serve(_table(tmp_path / f"{state}-{inode}", 0, state, inode), ("127.0.0.1", 40000))
        assert (status, reached) == (403, False) and b"cannot tell which user" in body, (state, inode)


def test_guard_on_linux_without_the_tables_refuses(tmp_path: Path) -> None:
    """/proc not mounted, or hidden by a sandbox: on Linux that is no reason to serve everyone."""
    status, body, reached = _serve(tmp_path / "absent", ("127.0.0.1", 40000))
    assert (status, reached) == (403, False) and b"cannot read" in body


def test_guard_closes_websockets_before_any_app_sees_them(tmp_path: Path) -> None:
    """The bridge has no websocket route; a websocket is closed before any app sees it, never let past."""
    sent: list[Message] = []
    reached = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        reached.append(True)

    async def record(message: Message) -> None:
        sent.append(message)

    async def receive() -> Message:
        return {"type": "websocket.connect"}

    scope: Scope = {"type": "websocket", "client": ("127.0.0.1", 40000), "server": ("127.0.0.1", 8765), "headers": []}
    anyio.run(PeerUserGuard(app, uid=1000, proc_net=_table(tmp_path, 1000)), scope, receive, record)
    assert sent == [{"type": "websocket.close", "code": 1008}] and not reached


def test_guard_serves_where_the_system_keeps_no_table(tmp_path: Path) -> None:
    """macOS and the like: no /proc/net, so no check (docs/mcp.md says so), rather than no bridge."""
    status, _, reached = _serve(tmp_path / "absent", ("127.0.0.1", 40000), platform="darwin")
    assert (status, reached) == (200, True)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs a named pipe")
def test_peer_uid_stops_reading_at_the_connections_row(tmp_path: Path) -> None:
    """The guard reads the table on the event loop for every request, and the kernel writes it as it is read, a
    row per socket on the machine: the lookup stops at the connection's row rather than read the rest. Here the
    table is a pipe whose writer holds it open after that row; reading to its end would wait for the writer."""
    rows = _table(tmp_path / "file", 1000) / "tcp"
    net = tmp_path / "net"
    net.mkdir()
    os.mkfifo(net / "tcp")
    release, closing = threading.Event(), threading.Event()

    def writer() -> None:
        with (net / "tcp").open("w") as table:
            table.write(rows.read_text())
            table.flush()
            release.wait(5)
            closing.set()  # before the close: a reader that waited for the end sees it set

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        uid = peer_uid(("127.0.0.1", 40000), ("127.0.0.1", 8765), net, "linux")
        read_to_the_end = closing.is_set()
    finally:
        release.set()
        thread.join(10)
    assert uid == 1000 and not read_to_the_end
