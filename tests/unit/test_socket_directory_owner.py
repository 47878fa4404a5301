"""Whose socket directory aegisctl trusts when it is neither root's nor the caller's (paths.safe_directory).

Found by a review: any other user's directory passed as long as its parent was closed to others, such as a login
user's home in root's /home, so that user's server at ~/aegisd.sock got the operator's passphrase. Only a system
account's directory passes now, as the packaged /run/aegis is (the service's DynamicUser= uid, or a system uid
below UID_MIN), and only when nobody but its owner can write it."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from aegisctl.paths import UnsafePath, safe_directory
from aegisd.api import accounts
from aegisd.api.accounts import DYNAMIC_UIDS, system_account, uid_min

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="giving a directory to another uid needs root")

LOGIN_USER = 12345  # an ordinary user: past UID_MIN, outside systemd's dynamic range
SYSTEM_USER = 990  # below UID_MIN, as useradd --system hands out
DYNAMIC_USER = 61234  # systemd's DynamicUser= range, as the packaged unit runs aegisd


@pytest.fixture(autouse=True)
def login_defs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """UID_MIN 1000, as most distributions set it, whatever this machine's /etc/login.defs says."""
    defs = tmp_path / "login.defs"
    defs.write_text("UID_MIN\t\t\t 1000\nUID_MAX\t\t\t60000\n")
    monkeypatch.setattr(accounts, "LOGIN_DEFS", defs)
    return defs


def directory_of(parent: Path, uid: int, mode: int) -> Path:
    """`parent`/run, owned by `uid`, mode `mode`, in `parent` (root's, 0755, like /run or /home)."""
    parent.mkdir(mode=0o755, exist_ok=True)
    os.chmod(parent, 0o755)  # noqa: S103 - root's, others pass through, like /run
    run = parent / "run"
    run.mkdir()
    os.chown(run, uid, uid)
    os.chmod(run, mode)
    return run


@pytest.mark.parametrize(("uid", "mode"), [
    (SYSTEM_USER, 0o750), (DYNAMIC_USER, 0o750), (DYNAMIC_UIDS.start, 0o700), (DYNAMIC_UIDS[-1], 0o755),
])
def test_a_system_accounts_directory_closed_to_others_passes(tmp_path: Path, uid: int, mode: int) -> None:
    """The packaged layouts: /run/aegis owned by the service's dynamic or system uid, 0750 in the socket group."""
    run = directory_of(tmp_path / "root-run", uid, mode)
    assert safe_directory(run) == run


@pytest.mark.parametrize("uid", [LOGIN_USER, 1000, 65534, DYNAMIC_UIDS.start - 1, DYNAMIC_UIDS[-1] + 1])
def test_a_login_users_directory_is_refused_saying_why_and_what_to_do(tmp_path: Path, uid: int) -> None:
    """The review's repro: another user's home (0750 or 0755) in root's /home. That user could serve there."""
    home = directory_of(tmp_path / "home", uid, 0o750)
    with pytest.raises(UnsafePath) as refused:
        safe_directory(home)
    message = refused.value.message
    for needle in (f"its directory {home} belongs to uid {uid}", "not to you or root", "nor to a system account",
                   f"a uid below {uid_min()}", "61184-65519", "run aegisctl as that user"):
        assert needle in message, message
    assert refused.value.chmod is None  # not a mode the caller could fix


@pytest.mark.parametrize("mode", [0o770, 0o757, 0o1777])
def test_a_system_accounts_directory_others_can_write_is_refused(tmp_path: Path, mode: int) -> None:
    run = directory_of(tmp_path / "root-run", DYNAMIC_USER, mode)
    with pytest.raises(UnsafePath, match=rf"belongs to uid {DYNAMIC_USER}, not to you or root, and is .*-writable"):
        safe_directory(run)


def test_a_system_accounts_directory_in_a_directory_others_can_write_is_refused(tmp_path: Path) -> None:
    """As before: in a /tmp-like directory, anyone (a system account too) could have made it."""
    run = directory_of(tmp_path / "tmp", SYSTEM_USER, 0o750)
    os.chmod(run.parent, 0o1777)  # noqa: S103 - the shared sticky parent under test
    with pytest.raises(UnsafePath, match="lets others make directories in it"):
        safe_directory(run)


def test_uid_min_comes_from_login_defs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, login_defs: Path) -> None:
    default = 501 if sys.platform == "darwin" else 1000
    login_defs.write_text("# UID_MIN 10\nUID_MAX 60000\nUID_MIN\t\t\t 500\nSYS_UID_MAX 499\n")
    assert uid_min() == 500
    assert system_account(499) and not system_account(500) and system_account(61184)
    login_defs.write_text("UID_MIN lots\n")  # not a number: the default
    assert uid_min() == default
    monkeypatch.setattr(accounts, "LOGIN_DEFS", tmp_path / "none")
    assert uid_min() == default
    assert not system_account(default) and not system_account(65534) and system_account(0)
