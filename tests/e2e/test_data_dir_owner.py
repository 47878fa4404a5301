"""The data directory must belong to the daemon's user: whoever owns it can swap vault.db or ledger.db."""

from __future__ import annotations

import os
import pwd
import subprocess

import pytest

from tests.harness import Aegis

OTHER_UID = 1234


def test_data_directory_owned_by_another_user_is_refused(fresh: Aegis) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to give the directory to another user")
    fresh.data_dir.mkdir(mode=0o700)
    os.chown(fresh.data_dir, OTHER_UID, OTHER_UID)  # private, but not ours: its owner can replace our files
    fresh.start(wait=False)
    assert fresh.proc is not None
    try:
        code = fresh.proc.wait(10)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"aegisd started on another user's data directory:\n{fresh.log()}") from None
    fresh.proc = None
    log = fresh.log()
    assert code == 1, log
    assert "Traceback" not in log, log
    user = pwd.getpwuid(os.geteuid()).pw_name
    assert str(fresh.data_dir) in log and f"uid {OTHER_UID}" in log, log
    assert f"chown -R {user} {fresh.data_dir}" in log, log
    assert not fresh.socket.exists()
    assert list(fresh.data_dir.iterdir()) == []  # nothing created in it
