"""A socket group whose members cannot reach the default socket, because a 0700 directory aegisd did not create lies
above it: the data directory (for DATA_DIR/run/aegisd.sock, when $XDG_RUNTIME_DIR is not set) or $XDG_RUNTIME_DIR
(for $XDG_RUNTIME_DIR/aegis/aegisd.sock). aegisd still serves its own user, but says so at start; `aegisctl doctor`
warns with the same words; and a group member's aegisctl names the directory that stops it, not the socket's own.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.support import assert_failed
from tests.e2e.test_doctor import doctor
from tests.e2e.test_socket_safety import ctl_as_operator, needs_root, shared_group
from tests.harness import Aegis, new_aegis

UNREACHABLE = "cannot reach the control socket"


@dataclass
class DefaultSocket(Aegis):
    """aegisd and aegisctl given no --socket, AEGIS_SOCKET or systemd RUNTIME_DIRECTORY: the socket is where the
    defaults put it, under `xdg_runtime_dir` when it is set, else under the data directory."""

    xdg_runtime_dir: Path | None = None

    @property
    def socket(self) -> Path:
        return (self.xdg_runtime_dir / "aegis" if self.xdg_runtime_dir else self.data_dir / "run") / "aegisd.sock"

    def base_env(self) -> dict[str, str]:
        env = super().base_env()
        for name in ("AEGIS_SOCKET", "RUNTIME_DIRECTORY", "XDG_RUNTIME_DIR"):
            env.pop(name, None)
        if self.xdg_runtime_dir:
            env["XDG_RUNTIME_DIR"] = str(self.xdg_runtime_dir)
        return env


@pytest.fixture(params=["data_dir", "xdg_runtime_dir"])
def default_socket(request: pytest.FixtureRequest) -> Iterator[tuple[DefaultSocket, Path]]:
    """A daemon not yet started whose default socket lies under a 0700 directory of its user's (the second item);
    the test's root is 0711 like /, so only that directory stands in the group's way."""
    needs_root()
    root = new_aegis().root
    os.chmod(root, 0o711)  # noqa: S103 - stands in for / and /tmp: everyone passes through
    aegis = DefaultSocket(root)
    if request.param == "data_dir":
        blocker = aegis.data_dir  # aegisd creates it 0700
    else:
        blocker = aegis.xdg_runtime_dir = root / "xdg"
        blocker.mkdir(mode=0o700)  # as logind makes /run/user/UID
    yield aegis, blocker
    aegis.cleanup()


def test_a_socket_group_that_cannot_pass_a_private_parent_is_warned_about_and_named(
        default_socket: tuple[DefaultSocket, Path]) -> None:
    aegis, blocker = default_socket
    group = shared_group()
    aegis.start("--socket-group", group.gr_name)
    assert os.stat(aegis.socket).st_gid == group.gr_gid  # aegisd did its part: run/ and the socket are the group's

    warnings = [line for line in aegis.log().splitlines() if UNREACHABLE in line]
    assert len(warnings) == 1, aegis.log()
    assert " warning " in warnings[0] and group.gr_name in warnings[0], warnings[0]
    assert f"the directory {blocker} above it (mode 0700" in warnings[0], warnings[0]
    assert "--socket" in warnings[0] and "/run/aegis/aegisd.sock" in warnings[0], warnings[0]

    aegis.init()
    checks, _ = doctor(aegis, 0, as_program=True)  # found as aegisctl finds it: no AEGIS_SOCKET
    assert checks["data_dir"]["status"] == "pass"
    socket = checks["socket"]
    assert socket["status"] == "warn", socket
    assert UNREACHABLE in socket["message"] and f"the directory {blocker} above it" in socket["message"], socket
    assert "--socket" in socket["hint"], socket
    if blocker == aegis.data_dir:  # its fix is not to open it up
        assert "the data directory itself must stay 0700" in socket["hint"] and "chmod" not in socket["hint"], socket
    else:
        assert f"chmod o+x {blocker}" in socket["hint"], socket

    # A member of the group is told which directory stops them: not the socket's own, which lets them in.
    denied = ctl_as_operator(aegis, "status", groups=group.gr_name)
    assert_failed(denied, f"({blocker}, above its directory, cannot be searched: mode 0700", "aegisctl doctor")
    assert f"its directory {aegis.socket.parent} cannot be searched" not in denied.err, denied.err

    if blocker != aegis.data_dir:  # the other fix: let the group (here: everyone) pass, and all is well
        os.chmod(blocker, 0o711)  # noqa: S103 - search only, as the hint says
        assert doctor(aegis, 0, as_program=True)[0]["socket"]["status"] == "pass"
        assert '"unlocked"' in ctl_as_operator(aegis, "status", "--json", groups=group.gr_name).ok().out
        aegis.stop()
        aegis.start("--socket-group", group.gr_name)
        assert len([line for line in aegis.log().splitlines() if UNREACHABLE in line]) == 1  # the first start's


def test_a_user_outside_the_group_is_told_the_sockets_own_directory_stops_them(
        default_socket: tuple[DefaultSocket, Path]) -> None:
    """Every directory above lets the group through (in the group with g+x, or with o+x): no warning, members get
    in, and someone outside the group is told which directory stops them, with the usual hint."""
    aegis, blocker = default_socket
    group = shared_group()
    if blocker == aegis.data_dir:
        blocker.mkdir(mode=0o700)
        os.chown(blocker, -1, group.gr_gid)
        os.chmod(blocker, 0o710)  # noqa: S103 - the group may pass, not list
        stops_outsider, outsider_says = blocker, f"({blocker}, above its directory, cannot be searched: mode 0710"
    else:
        os.chmod(blocker, 0o711)  # noqa: S103 - search only
        run = aegis.socket.parent
        stops_outsider, outsider_says = run, f"(its directory {run} cannot be searched: mode 0750"
    aegis.start("--socket-group", group.gr_name)
    assert UNREACHABLE not in aegis.log()
    assert '"uninitialized"' in ctl_as_operator(aegis, "status", "--json", groups=group.gr_name).ok().out
    outsider = ctl_as_operator(aegis, "status", groups=None)
    assert_failed(outsider, outsider_says, "run as the daemon's user or a member of its socket group")
    assert f"let the group pass, and {stops_outsider} does not" not in outsider.err  # it does: they are not in it
