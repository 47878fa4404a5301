"""The control socket: permissions, shared-admin group, health service, one daemon per socket,
stale sockets, and a clear error when no daemon runs."""

from __future__ import annotations

import grp
import json
import os
import signal
import socket
import stat

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.e2e.support import assert_failed, status
from tests.harness import PASSPHRASE, Aegis, new_aegis


def mode(path: os.PathLike[str] | str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def admin_group() -> grp.struct_group:
    """A group to hand the socket to: one that is not our primary group when we may use one."""
    primary = os.getgid()
    if os.geteuid() == 0:
        candidates = [g for g in grp.getgrall() if g.gr_gid != primary]
    else:
        candidates = [grp.getgrgid(g) for g in os.getgroups() if g != primary]
    return candidates[0] if candidates else grp.getgrgid(primary)


def test_default_permissions_are_private(aegis: Aegis) -> None:
    assert stat.S_ISSOCK(os.stat(aegis.socket).st_mode)
    assert mode(aegis.socket.parent) == 0o700
    assert mode(aegis.socket) == 0o600
    assert os.stat(aegis.socket).st_uid == os.geteuid()
    assert mode(aegis.data_dir) == 0o700


def test_socket_group_and_mode_for_shared_admin(fresh: Aegis) -> None:
    group = admin_group()
    fresh.start("--socket-group", group.gr_name, "--socket-mode", "0660")
    info = os.stat(fresh.socket)
    assert stat.S_IMODE(info.st_mode) == 0o660
    assert info.st_gid == group.gr_gid
    parent = os.stat(fresh.socket.parent)
    assert parent.st_gid == group.gr_gid
    assert stat.S_IMODE(parent.st_mode) & 0o007 == 0  # never reachable by other users
    assert status(fresh)["state"] == "uninitialized"


def test_socket_group_from_environment(fresh: Aegis) -> None:
    group = admin_group()
    fresh.start(env={"AEGIS_SOCKET_GROUP": group.gr_name})
    info = os.stat(fresh.socket)
    assert stat.S_IMODE(info.st_mode) == 0o660  # a group implies 0660
    assert info.st_gid == group.gr_gid


def test_bad_socket_settings_are_refused_at_start(fresh: Aegis) -> None:
    cases = [
        (("--socket-mode", "0666"), "must not grant access to other users"),
        (("--socket-mode", "0400"), "owner read and write"),
        (("--socket-mode", "rw-rw----"), "octal"),
        (("--socket-group", "aegis-no-such-group-xyz"), "does not exist"),
    ]
    for args, message in cases:
        fresh.log_path.unlink(missing_ok=True)
        fresh.start(*args, wait=False)
        assert fresh.proc is not None
        code = fresh.proc.wait(15)
        fresh.proc = None
        log = fresh.log()
        assert code in (1, 2), log
        assert message in log, log
        assert "Traceback" not in log, log
        assert not fresh.socket.exists()


def test_health_service_answers_serving(aegis: Aegis) -> None:
    with grpc.insecure_channel(f"unix:{aegis.socket}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "aegis.v1.VaultService", "aegis.v1.CredentialService"):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
        try:
            stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.NOT_FOUND
        else:
            raise AssertionError("an unknown service must not be reported healthy")


def test_a_stop_ends_health_watches_with_not_serving(aegis: Aegis) -> None:
    """Found at the 27th stop: grpc's health servicer kept a `Watch` open after it reported NOT_SERVING, so one
    open watch held aegisd's stop for the control server's whole grace (10 s). A watch now says NOT_SERVING and
    ends, and the stop is not held. (Two clean-clone CI runs of the 28th stop saw the watch end with nothing after
    SERVING: the stop had begun while SERVING was being written; tests/unit/test_control_health.py has that case.)"""
    with grpc.insecure_channel(f"unix:{aegis.socket}") as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=30)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        assert aegis.proc is not None
        aegis.proc.send_signal(signal.SIGTERM)
        assert [reply.status for reply in watch] == [health_pb2.HealthCheckResponse.NOT_SERVING]
        # Not held for the grace by the watch (an exit, not a timing bound).
        assert aegis.stop(timeout=8) == 0
    assert "Traceback" not in aegis.log(), aegis.log()


def test_second_daemon_on_same_socket_refuses_and_first_keeps_working(aegis: Aegis) -> None:
    second = new_aegis()
    try:
        second.env["AEGIS_SOCKET"] = str(aegis.socket)  # same socket, its own data directory
        second.start(wait=False)
        assert second.proc is not None
        assert second.proc.wait(15) == 1
        second.proc = None
        assert "already serving" in second.log() and str(aegis.socket) in second.log()
        assert "Traceback" not in second.log()
    finally:
        second.cleanup()
    assert aegis.socket.exists()
    assert status(aegis)["state"] == "uninitialized"
    aegis.init()
    assert status(aegis)["state"] == "unlocked"
    aegis.assert_no_leaks([PASSPHRASE])


def test_second_daemon_on_same_data_dir_refuses(aegis: Aegis) -> None:
    second = new_aegis()
    try:
        second.env["AEGIS_DATA_DIR"] = str(aegis.data_dir)  # same data, its own socket
        second.start(wait=False)
        assert second.proc is not None
        assert second.proc.wait(15) == 1
        second.proc = None
        assert "already using data directory" in second.log()
        assert not second.socket.exists()
    finally:
        second.cleanup()
    assert status(aegis)["state"] == "uninitialized"


def test_stale_socket_file_is_replaced(fresh: Aegis) -> None:
    fresh.socket.parent.mkdir(mode=0o700, parents=True)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(fresh.socket))  # a real socket file with nobody listening: what a crash leaves
    stale.close()
    assert fresh.socket.exists()
    fresh.start()
    assert status(fresh)["state"] == "uninitialized"
    assert mode(fresh.socket) == 0o600


def test_socket_left_by_a_killed_daemon_is_replaced(aegis: Aegis) -> None:
    assert aegis.proc is not None
    aegis.proc.send_signal(signal.SIGKILL)
    aegis.proc.wait(10)
    aegis.proc = None
    assert aegis.socket.exists()  # nothing cleaned up after kill -9
    result = aegis.ctl("status")
    assert_failed(result, "cannot reach aegisd", "start it")
    aegis.start()
    aegis.init()
    assert status(aegis)["state"] == "unlocked"
    aegis.assert_no_leaks([PASSPHRASE])


def test_non_socket_file_at_socket_path_is_not_removed(fresh: Aegis) -> None:
    fresh.socket.parent.mkdir(mode=0o700, parents=True)
    fresh.socket.write_text("precious\n")
    fresh.start(wait=False)
    assert fresh.proc is not None
    assert fresh.proc.wait(15) == 1
    fresh.proc = None
    assert "is not a socket" in fresh.log()
    assert fresh.socket.read_text() == "precious\n"


def test_no_daemon_running_is_a_clear_error(fresh: Aegis) -> None:
    for args in (("status",), ("status", "--json"), ("vault", "list"), ("lock",)):
        result = fresh.ctl(*args)
        assert_failed(result, "aegisd is not running", str(fresh.socket), "aegisd")
        assert result.out == ""


def test_clean_stop_removes_the_socket(aegis: Aegis) -> None:
    assert aegis.stop() == 0
    assert not aegis.socket.exists()
    assert_failed(aegis.ctl("status"), "not running")


def test_socket_flag_overrides_environment(aegis: Aegis) -> None:
    elsewhere = {"AEGIS_SOCKET": str(aegis.root / "nowhere.sock")}
    assert_failed(aegis.ctl("status", env=elsewhere), "not running", "nowhere.sock")
    assert aegis.ctl("--socket", str(aegis.socket), "status", "--json", env=elsewhere).code == 0


@pytest.mark.parametrize("leading", ["", "/"])
def test_a_socket_path_with_uri_characters_is_the_one_served_and_used(fresh: Aegis, leading: str) -> None:
    """Found by a cold review: gRPC percent-decodes a `unix:` target, so with `a%41b.sock` aegisd checked and
    secured one path and bound another (`aAb.sock`), and aegisctl checked one and connected to the other; `?`
    and `#` were read as URI syntax, and so (found by the review of that fix) was a path starting `//` (kept by
    pathlib, e.g. from `$PREFIX/run` with PREFIX=/), as an authority. Both now hand gRPC the path absolute and
    percent-encoded, after an empty authority."""
    directory = fresh.root / "run"
    directory.mkdir(mode=0o700)
    path = directory / "a%41b?x#y.sock"
    fresh.env["AEGIS_SOCKET"] = leading + str(path)
    fresh.start()
    assert stat.S_ISSOCK(os.lstat(path).st_mode) and mode(path) == 0o600
    assert sorted(p.name for p in directory.iterdir() if not p.name.endswith(".lock")) == [path.name]
    assert json.loads(fresh.ctl("status", "--json").ok().out)["state"] == "uninitialized"
    fresh.init().ok()
    assert fresh.stop() == 0
    assert not path.exists()
