"""Under systemd (NOTIFY_SOCKET set, Type=notify) aegisd must either say READY=1 or exit at once.

Without systemd-python it could never send READY=1: systemd would time the start out and restart it
in a loop, with nothing in the journal saying why. So aegisd refuses to start, naming the fix, before
it touches its data directory, socket or gate port. (test_daemon_process.py checks the whole notify
protocol when systemd-python is there.)
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import Aegis

FIX = "pip install 'aegis[systemd]'"


@pytest.fixture
def notify_socket(fresh: Aegis) -> Iterator[socket.socket]:
    """A datagram socket bound where NOTIFY_SOCKET points, as systemd's would be."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(fresh.root / "notify.sock"))
    try:
        yield sock
    finally:
        sock.close()


@pytest.fixture
def hidden_systemd(tmp_path: Path) -> dict[str, str]:
    """PYTHONPATH that makes `from systemd import daemon` fail in a subprocess, as if the extra were absent."""
    shim = tmp_path / "shim"
    (shim / "systemd").mkdir(parents=True)
    (shim / "systemd" / "__init__.py").write_text(
        'raise ImportError("systemd-python hidden by the test (no [systemd] extra)")\n')
    path = os.pathsep.join(p for p in (str(shim), os.environ.get("PYTHONPATH", "")) if p)
    env = {"PYTHONPATH": path}
    # The shim really hides it (from the daemon's interpreter, with the daemon's sys.path).
    probe = subprocess.run([sys.executable, "-c", "from systemd import daemon"], env={**os.environ, **env},
                           capture_output=True, text=True, check=False)
    assert probe.returncode != 0 and "hidden by the test" in probe.stderr, probe.stderr
    return env


def received(sock: socket.socket, needle: str, timeout: float) -> list[str]:
    """Datagrams read until one contains `needle` or `timeout` passes."""
    texts: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not any(needle in t for t in texts):
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            texts.append(sock.recv(4096).decode())
        except TimeoutError:
            break
    return texts


def test_ready_is_sent_when_systemd_python_is_installed(fresh: Aegis, notify_socket: socket.socket) -> None:
    pytest.importorskip("systemd.daemon", reason="systemd-python is the optional 'systemd' extra")
    fresh.start(env={"NOTIFY_SOCKET": notify_socket.getsockname()})
    assert any("READY=1" in t for t in received(notify_socket, "READY=1", 15)), fresh.log()
    assert fresh.stop() == 0


def test_without_systemd_python_it_exits_at_once_naming_the_fix(
        fresh: Aegis, notify_socket: socket.socket, hidden_systemd: dict[str, str]) -> None:
    started = time.monotonic()
    fresh.start(env={"NOTIFY_SOCKET": notify_socket.getsockname(), **hidden_systemd}, wait=False)
    assert fresh.proc is not None
    code = fresh.proc.wait(20)
    elapsed = time.monotonic() - started
    fresh.proc = None
    log = fresh.log()
    assert code == 1, log
    assert elapsed < 10, f"took {elapsed:.1f}s to give up"  # systemd's own start timeout is 90 s
    assert FIX in log and "NOTIFY_SOCKET" in log and "systemd-python" in log, log
    assert "Traceback" not in log, log
    assert received(notify_socket, "READY=1", 0.1) == []
    # It did nothing else first: no data directory, no control socket, no gate listener.
    assert not fresh.data_dir.exists()
    assert not fresh.socket.exists()
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", fresh.gate_port)) != 0


def test_without_systemd_python_and_outside_systemd_it_runs(fresh: Aegis, hidden_systemd: dict[str, str]) -> None:
    # The extra is optional: without NOTIFY_SOCKET nothing needs it.
    fresh.start(env=hidden_systemd)
    assert fresh.stop() == 0
    assert "systemd" not in fresh.log().lower()
