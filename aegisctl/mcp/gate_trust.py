"""Whom the bridge sends its agent token to: the process at the other end of each new connection to the gate.

While aegisd is down (before it starts, during a restart, after a crash) any local user can listen on the gate's
port and collect the token of every agent that calls it, then use it against the real gate. So, on Linux, before a
new connection carries anything, the bridge asks the kernel (sock_diag, else its TCP tables: peer_user) who owns the
gate's end of that very connection (the listening socket's owner until aegisd accepts it, then aegisd's) and goes on
only for its own user, root, or the owner of aegisd's control socket, which it finds from the socket's path (as
`aegisctl` does) without connecting to it. Checking the connection itself, not the port beforehand, leaves no moment
between the check and the connection in which the listener could change.

What the kernel names is the user whose process created the listening socket (accepted the connection, once it
has), not necessarily the one whose process reads from it: a socket keeps its owner when it is handed on. So a
listener that root created and gave to a process of another user (systemd socket activation with User=, inetd)
reads as root's, which is trusted, and that process would read the token. Only a trusted user (root, in practice)
can set that up; the check does not cover it.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import socket
import stat
import sys
from collections.abc import Mapping
from pathlib import Path

from aegisctl.mcp.peer_user import PROC_NET, PeerUnknown, TableUnreadable, socket_uid
from aegisctl.paths import PathError, UnsafePath, resolve_socket, safe_directory

# The gate's end of a fresh loopback connection is in the tables by the time connect() returns; these short waits
# only cover a kernel that completes the handshake on another CPU a moment later.
RETRIES = (0.001, 0.01, 0.05)


class GateUntrusted(Exception):
    """The gate's end of the connection belongs to a user the bridge does not trust, or cannot be found."""


class GateTrust:
    """Checks the gate's end of a connection before the token is sent on it."""

    def __init__(self, config_path: str | None = None, env: Mapping[str, str] | None = None,
                 proc_net: Path = PROC_NET, platform: str = sys.platform, uid: int | None = None) -> None:
        self._config_path = config_path
        self._env = env
        self._proc_net = proc_net
        self._platform = platform
        self._own = {os.getuid(), os.geteuid()} if uid is None else {uid}

    async def verify(self, sock: socket.socket | None) -> None:
        """Return if the process at the other end of `sock` may receive the agent token; else GateUntrusted."""
        if self._platform != "linux":
            return  # no such tables: docs/mcp.md says the check is not made there
        if sock is None:
            raise GateUntrusted("the bridge cannot tell which process it connected to (no socket); the agent token "
                                "was not sent")
        try:
            gate, ours = sock.getpeername()[:2], sock.getsockname()[:2]
        except OSError as exc:
            raise GateUntrusted(f"the connection to the gate closed at once ({exc.strerror}); the agent token was "
                                "not sent") from None
        uid = await self._owner(gate, ours)
        if uid is None or uid in self._own or uid == 0:
            return
        socket_path, socket_owner = self.control_socket_owner()
        if uid == socket_owner:
            return
        raise GateUntrusted(f"the process listening on the gate's address {_shown(gate)} runs as {_user(uid)}, "
                            f"which is not this bridge's user ({_user(min(self._own))}), root, or the owner of "
                            f"aegisd's control socket ({_socket_said(socket_path, socket_owner)}); the agent token "
                            "was not sent. While aegisd is down, another user can listen on its gate port to "
                            "collect agent tokens")

    async def _owner(self, gate: tuple[str, int], ours: tuple[str, int]) -> int | None:
        for delay in (*RETRIES, None):
            try:
                return socket_uid(gate, ours, self._proc_net, self._platform, accepting=True)
            except PeerUnknown as exc:
                if delay is None or isinstance(exc, TableUnreadable):
                    raise GateUntrusted(f"the bridge cannot tell which user listens on the gate's address "
                                        f"{_shown(gate)} ({exc}), so the agent token was not sent") from None
                await asyncio.sleep(delay)
        return None  # not reached: the last round returns or raises

    def control_socket_owner(self) -> tuple[Path | None, int | None]:
        """aegisd's control socket as aegisctl finds it, and its owner (None if it is not there or not aegisd's).

        The owner of a socket in a directory that group or others can write proves nothing (anyone could have
        put it there; aegisd refuses such a directory), nor does a socket not owned by its directory's owner
        (aegisd requires its directory to be its own). Where the socket is hidden in a directory this user may
        not search (the packaged /run/aegis, 0750 in the admins' group), that directory's owner stands for it.
        """
        env = os.environ if self._env is None else self._env
        try:
            path = resolve_socket(None, self._config_path, env)  # aegisctl's own choice, a hidden system socket too
        except PathError:
            return None, None
        try:  # a path that someone else could re-point (their directory or symlink on the way) names no one
            directory = os.lstat(safe_directory(path.parent))
        except (UnsafePath, OSError):
            return path, None
        if not stat.S_ISDIR(directory.st_mode) or directory.st_mode & 0o022:
            return path, None
        try:
            info = os.lstat(path)
        except PermissionError:
            return path, directory.st_uid
        except OSError:
            return path, None
        if not stat.S_ISSOCK(info.st_mode) or info.st_uid != directory.st_uid:
            return path, None
        return path, info.st_uid


def _shown(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _user(uid: int) -> str:
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def _socket_said(path: Path | None, owner: int | None) -> str:
    if path is None:
        return "not found"
    return f"{path}, {_user(owner)}" if owner is not None else f"{path}: none there"
