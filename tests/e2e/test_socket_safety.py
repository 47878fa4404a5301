"""Who can put something at the control socket's path, and what aegisd and aegisctl do about it.

aegisctl sends passphrases and API keys over the socket, so whoever can replace the socket (or its
directory's entry) receives them. These tests play that attacker with a real relay that keeps every
byte aegisctl sends, and play the packaged service's operators (another uid, in the socket's group).
"""

from __future__ import annotations

import contextlib
import grp
import os
import shutil
import socket
import stat
import subprocess
import threading
from pathlib import Path
from types import TracebackType

import pytest

from tests.e2e.support import assert_failed, status
from tests.harness import AEGISCTL, PASSPHRASE, Aegis, Result
from tests.upstreams import accepted

OPERATOR_UID = 1234  # an operator who is not the daemon's user, as under the packaged unit's DynamicUser=
START_TIMEOUT = 10.0


def needs_root() -> None:
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv(1) to act as another user")


def shared_group() -> grp.struct_group:
    """A group that is not the daemon's own, as `aegis` is under the packaged unit."""
    for name in ("users", "staff"):
        with contextlib.suppress(KeyError):
            return grp.getgrnam(name)
    others = [g for g in grp.getgrall() if g.gr_gid != os.getgid()]
    if not others:
        pytest.skip("no group other than our own to share the socket with")
    return others[0]


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


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


def ctl_as_operator(aegis: Aegis, *args: str, groups: str | None, input: str | None = None) -> Result:
    """aegisctl run by another uid, in `groups` (comma-separated) or in none."""
    ids = ["setpriv", f"--reuid={OPERATOR_UID}", f"--regid={OPERATOR_UID}"]
    ids.append(f"--groups={groups}" if groups else "--clear-groups")
    proc = subprocess.run([*ids, AEGISCTL, *args], input=input, capture_output=True, text=True,
                          env=aegis.base_env(), timeout=60, check=False)
    aegis.outputs.extend([proc.stdout, proc.stderr])
    return Result(list(args), proc.returncode, proc.stdout, proc.stderr)


class Eavesdropper:
    """The attacker's server: listens on `path`, relays each connection to the real daemon at `target`
    (so the victim sees a working daemon) and keeps every byte the client sent."""

    def __init__(self, path: Path, target: Path) -> None:
        self.path = path
        self.target = target
        self.received = bytearray()
        self.connections = 0
        self._lock = threading.Lock()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(path))
        self._listener.listen(8)
        self._open: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def __enter__(self) -> Eavesdropper:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._listener.close()
        for sock in self._open:
            with contextlib.suppress(OSError):
                sock.close()

    def _accept(self) -> None:
        for client in accepted(self._listener):
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            upstream.connect(str(self.target))
            with self._lock:
                self.connections += 1
                self._open += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, record: bool) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if record:
                    with self._lock:
                        self.received += data
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)


# --- aegisctl checks what is at the socket path before it sends anything ---------------------------


def test_a_swapped_socket_in_a_group_writable_directory_gets_no_passphrase(aegis: Aegis) -> None:
    """The cold review's case: a group member moved aegisd.sock away and bound their own server there."""
    needs_root()
    group = shared_group()
    run = aegis.socket.parent
    # aegisd now refuses such a directory at start; it could still be loosened afterwards, or be another
    # daemon's directory, so aegisctl checks it too.
    os.chown(run, -1, group.gr_gid)
    os.chmod(run, 0o2770)  # noqa: S103 - the unsafe directory under test
    real = run / "aegisd.sock.real"
    aegis.socket.rename(real)
    try:
        with Eavesdropper(aegis.socket, real) as spy:
            result = aegis.ctl("init", "--passphrase-stdin", input=PASSPHRASE + "\n")
            assert_failed(result, str(run), "group-writable", "2770", f"chmod g-w,o-w {run}")
            assert spy.connections == 0, "aegisctl connected to whatever was at the socket path"
            assert PASSPHRASE.encode() not in spy.received
            assert_failed(aegis.ctl("status"), "group-writable")  # every command, not only those with secrets
    finally:
        aegis.socket.unlink(missing_ok=True)
        real.rename(aegis.socket)
        os.chmod(run, 0o700)
    assert status(aegis)["state"] == "uninitialized"
    aegis.assert_no_leaks([PASSPHRASE])


def test_a_symlink_at_the_socket_path_is_refused(aegis: Aegis) -> None:
    trap = aegis.root / "trap"
    trap.mkdir(mode=0o700)
    with Eavesdropper(trap / "evil.sock", aegis.socket) as spy:
        link_dir = aegis.root / "link"
        link_dir.mkdir(mode=0o700)
        link = link_dir / "aegisd.sock"
        link.symlink_to(spy.path)
        result = aegis.ctl("init", "--passphrase-stdin", input=PASSPHRASE + "\n", env={"AEGIS_SOCKET": str(link)})
        assert_failed(result, str(link), "symbolic link", str(spy.path))
        assert spy.connections == 0
        assert PASSPHRASE.encode() not in spy.received
    assert status(aegis)["state"] == "uninitialized"
    aegis.assert_no_leaks([PASSPHRASE])


def test_a_file_that_is_not_a_socket_is_refused(fresh: Aegis) -> None:
    impostor = fresh.root / "impostor"
    impostor.mkdir(mode=0o700)
    (impostor / "aegisd.sock").write_text("not a socket\n")
    result = fresh.ctl("status", env={"AEGIS_SOCKET": str(impostor / "aegisd.sock")})
    assert_failed(result, str(impostor / "aegisd.sock"), "not a socket")


# --- aegisd refuses a socket directory others can write --------------------------------------------


@pytest.mark.parametrize(("dir_mode", "words"), [(0o2770, "group-writable"), (0o1777, "world-writable")],
                         ids=["group-writable", "world-writable-sticky"])
def test_daemon_refuses_a_socket_directory_others_can_write(fresh: Aegis, dir_mode: int, words: str) -> None:
    needs_root()
    run = fresh.socket.parent
    run.mkdir(mode=0o700)
    os.chown(run, -1, shared_group().gr_gid)
    os.chmod(run, dir_mode)
    log = start_fails(fresh)
    assert str(run) in log and words in log, log
    if dir_mode & 0o1000:  # shared like /tmp: closing it would break its other users
        assert "chmod" not in log and "directory of its own" in log, log
    else:
        assert f"chmod g-w,o-w {run}" in log, log
    assert not fresh.socket.exists()
    assert mode(run) == dir_mode  # refused, not "fixed" behind the operator's back


# --- --socket-group never changes a directory aegisd did not create --------------------------------


def test_socket_group_does_not_open_up_a_preexisting_private_directory(fresh: Aegis) -> None:
    """Like a user's 0700 $XDG_RUNTIME_DIR, with other programs' sockets in it."""
    needs_root()
    group = shared_group()
    private = fresh.socket.parent
    private.mkdir(mode=0o700)
    (private / "other-program.sock").write_text("")
    before = os.stat(private)
    log = start_fails(fresh, "--socket-group", group.gr_name)
    assert str(private) in log and group.gr_name in log and "/run/aegis" in log, log
    after = os.stat(private)
    assert (stat.S_IMODE(after.st_mode), after.st_gid) == (stat.S_IMODE(before.st_mode), before.st_gid)
    assert not fresh.socket.exists()


def test_packaged_layout_lets_group_operators_in_and_no_one_else(fresh: Aegis) -> None:
    """As systemd sets it up: /run/aegis made before the start, owned by the daemon's uid, group `aegis`, 0750
    (RuntimeDirectoryMode=); the operator is another uid in that group. aegisctl must not demand that the
    socket be the operator's own."""
    needs_root()
    group = shared_group()
    os.chmod(fresh.root, 0o711)  # noqa: S103 - stands in for /run: the operator passes through it
    run = fresh.socket.parent
    run.mkdir(mode=0o700)
    os.chown(run, -1, group.gr_gid)
    os.chmod(run, 0o750)  # noqa: S103 - as RuntimeDirectoryMode=0750 makes it
    config = fresh.root / "aegisd.toml"
    config.write_text(f'socket_group = "{group.gr_name}"\n')  # as packaging/systemd/aegisd.toml sets it
    fresh.start("--config", str(config))
    assert (mode(run), os.stat(run).st_gid) == (0o750, group.gr_gid)  # left as systemd made it
    assert (mode(fresh.socket), os.stat(fresh.socket).st_gid) == (0o660, group.gr_gid)

    assert '"uninitialized"' in ctl_as_operator(fresh, "status", "--json", groups=group.gr_name).ok().out
    assert_failed(ctl_as_operator(fresh, "status", groups=None), "no permission")


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


def test_an_unusable_lock_file_is_one_clear_error(fresh: Aegis) -> None:
    """Found by a review: a directory at the socket's lock path ended the start in an IsADirectoryError traceback."""
    fresh.socket.parent.mkdir(mode=0o700)
    lock = fresh.socket.with_name(fresh.socket.name + ".lock")
    lock.mkdir()
    log = start_fails(fresh)  # exit 1, no traceback
    errors = [line for line in log.splitlines() if line.startswith("aegisd: error:")]
    assert errors == [f"aegisd: error: cannot open the socket's lock file {lock}: Is a directory; remove whatever "
                      "is there or choose another --socket"], log
    assert not fresh.socket.exists() and lock.is_dir()


def test_start_refuses_at_once_a_live_socket_whose_backlog_is_full(fresh: Aegis) -> None:
    """A server at the socket path that accepts nothing: probing it must not block aegisd's start forever."""
    fresh.socket.parent.mkdir(mode=0o700)
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other.bind(str(fresh.socket))
    other.listen(0)
    waiting: list[socket.socket] = []
    try:
        while True:  # fill its accept queue: the next blocking connect() would wait for ever
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            client.setblocking(False)
            waiting.append(client)
            try:
                client.connect(str(fresh.socket))
            except BlockingIOError:
                break
        log = start_fails(fresh)
        assert "another process is already listening" in log, log
        assert stat.S_ISSOCK(os.lstat(fresh.socket).st_mode)  # left alone
    finally:
        for client in waiting:
            client.close()
        other.close()


def test_socket_group_members_reach_a_socket_under_directories_aegisd_creates(fresh: Aegis) -> None:
    """--socket in a path of which several directories are missing: aegisd creates them all, each in the socket
    group and 0750 like the socket's own directory, so the group can reach the socket and no one else can."""
    needs_root()
    group = shared_group()
    os.chmod(fresh.root, 0o711)  # noqa: S103 - stands in for /run: the operator passes through it
    top = fresh.root / "srv"
    deep = top / "aegis" / "run" / "aegisd.sock"
    fresh.env["AEGIS_SOCKET"] = str(deep)
    fresh.start("--socket-group", group.gr_name)
    for directory in (top, top / "aegis", deep.parent):
        info = os.stat(directory)
        assert (stat.S_IMODE(info.st_mode), info.st_gid) == (0o750, group.gr_gid), directory
    assert '"uninitialized"' in ctl_as_operator(fresh, "status", "--json", groups=group.gr_name).ok().out
    assert_failed(ctl_as_operator(fresh, "status", groups=None), "no permission")
