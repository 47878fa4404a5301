"""Whose directories and links the control socket's path goes through, and what aegisd and aegisctl do about it.

The safe-path rule (as OpenSSH's StrictModes): from / down, every directory passed through and every symbolic link
on the way must belong to root or the caller, and one that others can write must be sticky (like /tmp); the socket's
own directory must belong to one of them too, or sit in one nobody else can write (the packaged /run/aegis, owned
by the service's user in root's /run). Another user (uid 65534 here) who owns a directory or link on the way can
put a server of their own at the path; these tests play that user with a relay that keeps every byte it is sent.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.support import assert_failed, status
from tests.e2e.test_socket_safety import (
    Eavesdropper,
    ctl_as_operator,
    needs_root,
    shared_group,
    start_fails,
)
from tests.harness import AEGISCTL, AEGISD, PASSPHRASE, Aegis, Result, free_port

NOBODY = 65534  # the other local user
LOGIN_USER = 12345  # an ordinary login user (past UID_MIN, outside systemd's dynamic range), whose home it is
DAEMON_UID = 61234  # the packaged service's dynamic user (systemd's DynamicUser= range), not the operator's


def sticky(path: Path) -> Path:
    """A shared sticky directory like /tmp, inside the test's own private one."""
    path.mkdir()
    os.chmod(path, 0o1777)  # noqa: S103 - the shared /tmp-like directory under test
    return path


def attackers_directory(path: Path) -> Path:
    path.mkdir(mode=0o755)
    os.chown(path, NOBODY, NOBODY)
    return path


def attackers_link(link: Path, target: Path) -> None:
    link.unlink(missing_ok=True)
    link.symlink_to(target)
    os.lchown(link, NOBODY, NOBODY)


def spy_on(path: Path, aegis: Aegis) -> Eavesdropper:
    """The other user's server at `path`, relaying to the real daemon so that, without the check, aegisctl works."""
    spy = Eavesdropper(path, aegis.socket)
    os.chown(path, NOBODY, NOBODY)
    return spy


def assert_nothing_sent(spy: Eavesdropper, aegis: Aegis) -> None:
    assert spy.connections == 0, "aegisctl connected to the other user's server"
    assert PASSPHRASE.encode() not in spy.received
    assert status(aegis)["state"] == "uninitialized"  # the relay did not pass an init on either
    aegis.assert_no_leaks([PASSPHRASE])


# --- aegisctl ---------------------------------------------------------------------------------------


def test_aegisctl_refuses_a_socket_in_a_login_users_own_directory(aegis: Aegis) -> None:
    """The review's repro: a login user's server at ~/aegisd.sock, their home (0750) in root's /home (0755), nothing
    on the way writable by others. aegisctl sent them the passphrase ("Vault unlocked."): another owner's socket
    directory is trusted only if it is a system account's, as the packaged /run/aegis is (test_packaged_layout...)."""
    needs_root()
    home = aegis.root / "home"
    home.mkdir(mode=0o755)
    user_home = home / "alice"
    user_home.mkdir(mode=0o750)
    os.chown(user_home, LOGIN_USER, LOGIN_USER)
    with Eavesdropper(user_home / "aegisd.sock", aegis.socket) as spy:
        os.chown(spy.path, LOGIN_USER, LOGIN_USER)
        env = {"AEGIS_SOCKET": str(spy.path)}
        result = aegis.ctl("init", "--passphrase-stdin", input=PASSPHRASE + "\n", env=env)
        assert_failed(result, f"its directory {user_home} belongs to uid {LOGIN_USER}", "nor to a system account",
                      "run aegisctl as that user", "nothing was sent", "next: use a directory of your own")
        assert len(result.err.splitlines()) == 2, result.err  # the error line and its `next:` line
        assert_failed(aegis.ctl("unlock", "--passphrase-stdin", input=PASSPHRASE + "\n", env=env), "nor to a system")
        assert_nothing_sent(spy, aegis)


def test_aegisctl_refuses_a_socket_directory_another_user_made_in_a_sticky_one(aegis: Aegis) -> None:
    """The review's first repro: uid 65534 makes the directory (0755, closed to everyone but itself) in /tmp
    before the operator's aegisd would, and serves there; aegisd refuses the directory, aegisctl did not."""
    needs_root()
    squat = attackers_directory(sticky(aegis.root / "tmp") / "aegis-squat")
    with spy_on(squat / "aegisd.sock", aegis) as spy:
        result = aegis.ctl("init", "--passphrase-stdin", input=PASSPHRASE + "\n",
                           env={"AEGIS_SOCKET": str(spy.path)})
        assert_failed(result, f"its directory {squat} belongs to uid 65534", str(aegis.root / "tmp"), "1777",
                      "nothing was sent", "directory of your own")
        assert len(result.err.splitlines()) == 2, result.err  # the error line and its `next:` line
        assert_failed(aegis.ctl("status", env={"AEGIS_SOCKET": str(spy.path)}), "uid 65534")
        assert_nothing_sent(spy, aegis)


def test_aegisctl_refuses_a_path_through_another_users_symlink(aegis: Aegis) -> None:
    """The review's second repro: uid 65534's link names the directory; pointing at the real daemon today, it can be
    re-pointed (`ln -sfn`) at a directory of its owner's at any time, so it is refused either way."""
    needs_root()
    link = sticky(aegis.root / "tmp") / "aegis-link"
    attackers_link(link, aegis.socket.parent)
    via_link = {"AEGIS_SOCKET": str(link / "aegisd.sock")}
    assert_failed(aegis.ctl("status", env=via_link), f"{link} is a symbolic link owned by uid 65534",
                  "nothing was sent")
    evil = attackers_directory(aegis.root / "tmp" / "aegis-evil")
    with spy_on(evil / "aegisd.sock", aegis) as spy:
        attackers_link(link, evil)
        result = aegis.ctl("init", "--passphrase-stdin", input=PASSPHRASE + "\n", env=via_link)
        assert_failed(result, str(link), "symbolic link owned by uid 65534", "nothing was sent")
        assert_nothing_sent(spy, aegis)


def test_aegisctl_refuses_a_path_through_another_users_directory(aegis: Aegis) -> None:
    """Higher up: a directory of uid 65534's on the way, even with directories of root's below it (its owner can
    rename them away and put their own in their place)."""
    needs_root()
    home = attackers_directory(aegis.root / "home")
    inner = home / "inner"
    inner.mkdir(mode=0o700)
    with spy_on(inner / "aegisd.sock", aegis) as spy:
        result = aegis.ctl("init", "--passphrase-stdin", input=PASSPHRASE + "\n",
                           env={"AEGIS_SOCKET": str(spy.path)})
        assert_failed(result, f"{home} on the way to it belongs to uid 65534", "nothing was sent")
        assert_nothing_sent(spy, aegis)


def test_a_trusted_symlink_on_the_way_is_followed(aegis: Aegis) -> None:
    """A link of root's or one's own (like /var/run -> /run) is followed, and its target checked the same way."""
    alias = aegis.root / "alias"
    alias.symlink_to(aegis.socket.parent)
    hop = aegis.root / "hop"
    hop.symlink_to("alias")  # relative, and a link to a link
    assert aegis.ctl("status", env={"AEGIS_SOCKET": str(hop / "aegisd.sock")}).ok()
    os.chmod(aegis.socket.parent, 0o770)  # noqa: S103 - the target is judged, not the link
    try:
        assert_failed(aegis.ctl("status", env={"AEGIS_SOCKET": str(hop / "aegisd.sock")}), "group-writable")
    finally:
        os.chmod(aegis.socket.parent, 0o700)


def test_a_nul_in_the_config_files_socket_is_a_clear_error(fresh: Aegis) -> None:
    """TOML can spell a NUL; it was a `ValueError: embedded null byte` traceback."""
    config = fresh.root / "aegisd.toml"
    config.write_text('socket = "/tmp/a\\u0000b"\n')
    for how in (["--config", str(config)], []):
        env = {"AEGIS_SOCKET": "", "AEGIS_CONFIG": str(config)}
        result = fresh.ctl(*how, "unlock", "--passphrase-stdin", input=PASSPHRASE + "\n", env=env)
        assert_failed(result, "NUL character", str(config), code=2)
        assert_failed(fresh.ctl(*how, "status", env=env), "NUL character", code=2)
    fresh.assert_no_leaks([PASSPHRASE])


# --- aegisd -----------------------------------------------------------------------------------------


def test_aegisd_refuses_a_socket_directory_reached_through_another_users_symlink(fresh: Aegis) -> None:
    """aegisd followed the link (stat) to a directory of its own and served there, for the link's owner to re-point."""
    needs_root()
    real = fresh.root / "real"
    real.mkdir(mode=0o700)
    link = sticky(fresh.root / "tmp") / "aegis-link"
    attackers_link(link, real)
    log = start_fails(fresh, "--socket", str(link / "aegisd.sock"))
    assert f"{link} is a symbolic link owned by uid 65534" in log and "directory of its own" in log, log
    assert list(real.iterdir()) == []


def test_aegisd_refuses_a_socket_directory_below_another_users_directory(fresh: Aegis) -> None:
    needs_root()
    home = attackers_directory(fresh.root / "home")
    log = start_fails(fresh, "--socket", str(home / "aegis" / "aegisd.sock"))
    assert f"{home}, above socket directory {home / 'aegis'}, belongs to uid 65534" in log, log
    assert not (home / "aegis").exists()  # refused before anything was made there


# --- what must keep working: the packaged layout, a directory of one's own under /tmp ------------------


@pytest.fixture
def as_daemon_user(fresh: Aegis) -> Iterator[Aegis]:
    """`fresh`, to be started as DAEMON_UID (as the packaged unit's DynamicUser= runs it), its root 0711 like /run."""
    needs_root()
    os.chmod(fresh.root, 0o711)  # noqa: S103 - stands in for /run: others pass through, only root writes
    fresh.data_dir.mkdir(mode=0o700)
    os.chown(fresh.data_dir, DAEMON_UID, DAEMON_UID)
    yield fresh
    if fresh.proc is not None and fresh.proc.poll() is None:
        fresh.proc.send_signal(signal.SIGTERM)
        fresh.proc.wait(15)
    fresh.proc = None


def as_user(uid: int, gid: int) -> list[str]:
    return ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups"]


def start_as(aegis: Aegis, gid: int, *args: str, env: dict[str, str] | None = None) -> None:
    """Start aegisd as DAEMON_UID (primary group `gid`, as Group= sets it) and wait until it serves."""
    aegis.gate_port = aegis.gate_port or free_port()
    with aegis.log_path.open("ab") as log:
        aegis._log_offset = log.tell()
        aegis.proc = subprocess.Popen([*as_user(DAEMON_UID, gid), AEGISD, *args], env=aegis.base_env() | (env or {}),
                                      stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    aegis.wait_ready()


def ctl_as_daemon_user(aegis: Aegis, *args: str, env: dict[str, str] | None = None) -> Result:
    proc = subprocess.run([*as_user(DAEMON_UID, DAEMON_UID), AEGISCTL, *args], capture_output=True, text=True,
                          env=aegis.base_env() | (env or {}), timeout=60, check=False)
    aegis.outputs.extend([proc.stdout, proc.stderr])
    return Result(list(args), proc.returncode, proc.stdout, proc.stderr)


def test_packaged_layout_a_directory_of_the_services_user_in_roots_is_accepted(as_daemon_user: Aegis) -> None:
    """As systemd sets it up: /run/aegis owned by the service's dynamic user, group aegis, 0750, inside root's /run.
    Neither root nor an operator in the group owns it, but only root could have made it there."""
    aegis, group = as_daemon_user, shared_group()
    run = aegis.socket.parent
    run.mkdir()
    os.chown(run, DAEMON_UID, group.gr_gid)
    os.chmod(run, 0o750)  # noqa: S103 - as RuntimeDirectoryMode=0750 makes it
    start_as(aegis, group.gr_gid, "--socket-group", group.gr_name)
    assert os.stat(aegis.socket).st_uid == DAEMON_UID
    assert '"uninitialized"' in aegis.ctl("status", "--json").ok().out  # root
    assert '"uninitialized"' in ctl_as_operator(aegis, "status", "--json", groups=group.gr_name).ok().out
    assert_failed(ctl_as_operator(aegis, "status", groups=None), "no permission")
    # The same directory in a parent others can write (like /tmp) could be anyone's: refused, nothing sent.
    os.chmod(aegis.root, 0o1777)  # noqa: S103 - the shared parent under test
    try:
        assert_failed(ctl_as_operator(aegis, "init", "--passphrase-stdin", input=PASSPHRASE + "\n",
                                      groups=group.gr_name), f"its directory {run} belongs to uid {DAEMON_UID}")
        assert_failed(aegis.ctl("status"), f"its directory {run} belongs to uid {DAEMON_UID}", "nothing was sent")
    finally:
        os.chmod(aegis.root, 0o711)  # noqa: S103 - back to /run's
    assert '"uninitialized"' in aegis.ctl("status", "--json").ok().out
    aegis.assert_no_leaks([PASSPHRASE])


def test_a_users_own_socket_directory_under_tmp_keeps_working(as_daemon_user: Aegis) -> None:
    """A user who is not root, with --socket in a directory of their own that aegisd makes in a sticky /tmp."""
    aegis = as_daemon_user
    socket_path = sticky(aegis.root / "tmp") / "mine" / "aegisd.sock"
    aegis.env["AEGIS_SOCKET"] = str(socket_path)
    start_as(aegis, DAEMON_UID)
    assert os.stat(socket_path.parent).st_uid == DAEMON_UID
    assert '"uninitialized"' in ctl_as_daemon_user(aegis, "status", "--json").ok().out


def test_the_per_user_default_socket_keeps_working(as_daemon_user: Aegis) -> None:
    """$XDG_RUNTIME_DIR/aegis/aegisd.sock: the user's own 0700 directory in root's /run/user, for a user not root."""
    aegis = as_daemon_user
    xdg = aegis.root / "user"
    xdg.mkdir(mode=0o700)
    os.chown(xdg, DAEMON_UID, DAEMON_UID)
    env = {"AEGIS_SOCKET": "", "XDG_RUNTIME_DIR": str(xdg)}
    aegis.env["AEGIS_SOCKET"] = str(xdg / "aegis" / "aegisd.sock")  # where wait_ready looks
    start_as(aegis, DAEMON_UID, env=env)
    assert (xdg / "aegis" / "aegisd.sock").exists()
    assert '"uninitialized"' in ctl_as_daemon_user(aegis, "status", "--json", env=env).ok().out
