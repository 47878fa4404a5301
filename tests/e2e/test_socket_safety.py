"""Who can put something at the control socket's path, and what aegisd and aegisctl do about it."""

from __future__ import annotations

import os
import socket
import subprocess

from tests.harness import Aegis

START_TIMEOUT = 10.0


def start_fails(aegis: Aegis, *args: str, env: dict[str, str] | None = None) -> str:
    """Start aegisd, expect it to exit 1 at once, and return its log."""
    aegis.log_path.unlink(missing_ok=True)
    aegis.start(*args, env=env, wait=False)
    assert aegis.proc is not None
    try:
        code = aegis.proc.wait(START_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"aegisd started instead of refusing:\n{aegis.log()}") from None
    aegis.proc = None
    log = aegis.log()
    assert code == 1, log
    assert "Traceback" not in log, log
    return log


# --- a failed start leaves another process's socket alone ------------------------------------------


def test_failed_start_does_not_remove_another_process_live_socket(fresh: Aegis) -> None:
    fresh.socket.parent.mkdir(mode=0o700)
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other.bind(str(fresh.socket))  # some other program's server, not an aegisd (it holds no lock)
    other.listen(1)
    try:
        before = os.lstat(fresh.socket)
        log = start_fails(fresh)
        assert "another process is already listening" in log, log
        after = os.lstat(fresh.socket)  # still there: FileNotFoundError here is the bug
        assert (after.st_dev, after.st_ino) == (before.st_dev, before.st_ino)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.connect(str(fresh.socket))  # and still reachable
    finally:
        other.close()

