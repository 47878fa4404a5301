"""The control socket's start failures: one SocketError naming the path and the cause, nothing left serving."""

from __future__ import annotations

import asyncio
import fcntl
import os
import socket
import stat
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from aegisd.control.server import ControlServer
from aegisd.control.socket import ControlSocket, SocketError


def test_a_directory_at_the_lock_path_is_a_socket_error(tmp_path: Path) -> None:
    path = tmp_path / "run" / "aegisd.sock"
    path.parent.mkdir(mode=0o700)
    path.with_name("aegisd.sock.lock").mkdir()
    with pytest.raises(SocketError, match=rf"cannot open the socket's lock file {path}\.lock: Is a directory"):
        ControlSocket(path).prepare()


def test_a_failed_secure_stops_grpc_and_removes_the_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """secure() runs after grpc started: a failure there must not leave grpc serving a socket with the wrong mode."""
    path = tmp_path / "run" / "aegisd.sock"
    real_chmod = os.chmod

    def chmod(target: Any, mode: int, *args: Any, **kwargs: Any) -> None:
        if Path(target) == path:
            raise PermissionError(1, "Operation not permitted")
        real_chmod(target, mode, *args, **kwargs)

    monkeypatch.setattr(os, "chmod", chmod)
    config = SimpleNamespace(socket_path=path, socket_mode=0o600, socket_group=None, data_dir=tmp_path)

    async def start() -> bool:
        server = ControlServer(SimpleNamespace(config=config))  # type: ignore[arg-type]  # made in the loop it serves
        with pytest.raises(SocketError, match=f"cannot set the group and mode of {path}: Operation not permitted"):
            await server.start()
        return await server._server.wait_for_termination(timeout=1)  # True if it timed out: grpc still runs

    assert asyncio.run(start()) is False
    assert not path.exists()
    with socket.socket(socket.AF_UNIX) as probe, pytest.raises(FileNotFoundError):
        probe.connect(str(path))
    fd = os.open(path.with_name("aegisd.sock.lock"), os.O_RDWR)  # the lock was dropped: a next start may take it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)


def test_a_sticky_shared_socket_directory_gets_no_chmod_advice(tmp_path: Path) -> None:
    """Like /tmp: `chmod g-w,o-w` there would break the system, so the advice is a directory of aegisd's own."""
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)  # noqa: S103 - the shared directory under test
    with pytest.raises(SocketError) as caught:
        ControlSocket(shared / "aegisd.sock").prepare()
    message = str(caught.value)
    assert "world-writable (mode 1777)" in message and "sticky" in message, message
    assert "chmod" not in message and "$XDG_RUNTIME_DIR/aegis" in message, message
    assert stat.S_IMODE(shared.stat().st_mode) == 0o1777


def test_a_group_writable_socket_directory_of_aegisds_user_keeps_the_chmod_advice(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    os.chmod(run, 0o770)  # noqa: S103 - the group-writable directory under test
    with pytest.raises(SocketError, match=rf"group-writable \(mode 0770\).*`chmod g-w,o-w {run}`"):
        ControlSocket(run / "aegisd.sock").prepare()


def test_a_socket_directory_of_another_user_gets_no_chmod_advice(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"
    run.mkdir()
    os.chmod(run, 0o777)  # noqa: S103 - the shared directory under test
    monkeypatch.setattr(os, "geteuid", lambda: run.stat().st_uid + 1)
    with pytest.raises(SocketError) as caught:
        ControlSocket(run / "aegisd.sock").prepare()
    message = str(caught.value)
    assert "belongs to uid" in message and "chmod" not in message and "directory of its own" in message, message
