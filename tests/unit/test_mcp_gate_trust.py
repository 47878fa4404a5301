"""gate_trust: the bridge sends its token only on a connection whose gate end belongs to its own user, root, or
the owner of aegisd's control socket. A real listening socket, with the kernel's table faked to name other uids."""

from __future__ import annotations

import codecs
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import pytest

from aegisctl import paths
from aegisctl.mcp import stdio
from aegisctl.mcp.gate_trust import GateTrust, GateUntrusted
from aegisctl.mcp.peer_user import proc_address, socket_uid

LINUX = Path("/proc/net/tcp").exists()
OWN = 1000  # the bridge's uid, as these tests tell GateTrust
AEGISD = 61234  # the uid aegisd runs as, where it is not the bridge's user: the packaged unit's DynamicUser= uid
NOBODY = 65534


@pytest.fixture
def connection() -> Iterator[socket.socket]:
    """The bridge's side of a real loopback connection that the listener has not accepted yet."""
    with socket.create_server(("127.0.0.1", 0)) as server, socket.create_connection(server.getsockname()) as client:
        yield client


def fake_net(tmp_path: Path, client: socket.socket, uid: int, state: str = "01") -> Path:
    """/proc/net with one row: the gate's end of `client`'s connection, owned by `uid`, not accepted (inode 0)."""
    net = tmp_path / "net"
    net.mkdir(exist_ok=True)
    gate, ours = proc_address(*client.getpeername()), proc_address(*client.getsockname())
    (net / "tcp").write_text(
        "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
        f"   0: {gate} {ours} {state} 00000000:00000000 00:00000000 00000000 {uid:5d}        0 0 1 "
        "0000000000000000 20 4 30 10 -1\n")
    return net


def control_socket(directory: Path, owner: int) -> Path:
    directory.mkdir(mode=0o700)
    path = directory / "aegisd.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
    os.chown(directory, owner, owner)
    os.chown(path, owner, owner)
    return path


def verify(trust: GateTrust, client: socket.socket) -> None:
    anyio.run(trust.verify, client)


@pytest.mark.skipif(not LINUX, reason="the kernel's TCP tables are Linux's /proc/net")
def test_the_gate_end_of_a_connection_not_yet_accepted_names_the_listeners_owner(connection: socket.socket) -> None:
    assert socket_uid(connection.getpeername(), connection.getsockname(), accepting=True) == os.getuid()
    assert socket_uid(connection.getpeername(), connection.getsockname(), Path("/proc/self/net"),
                      accepting=True) == os.getuid()  # the /proc/net rows, as when sock_diag cannot answer


@pytest.mark.parametrize("uid", [OWN, 0])
def test_own_user_and_root_are_trusted(tmp_path: Path, connection: socket.socket, uid: int) -> None:
    verify(GateTrust(proc_net=fake_net(tmp_path, connection, uid), platform="linux", uid=OWN,
                     env={"AEGIS_SOCKET": str(tmp_path / "none.sock")}), connection)


def test_another_user_is_refused_naming_the_uid(tmp_path: Path, connection: socket.socket) -> None:
    trust = GateTrust(proc_net=fake_net(tmp_path, connection, 4321), platform="linux", uid=OWN,
                      env={"AEGIS_SOCKET": str(tmp_path / "none.sock")})
    with pytest.raises(GateUntrusted, match=r"runs as uid 4321.*the agent token was not sent"):
        verify(trust, connection)


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a socket to another uid needs root")
def test_the_control_sockets_owner_is_trusted_unless_its_directory_is_open(tmp_path: Path,
                                                                           connection: socket.socket) -> None:
    path = control_socket(tmp_path / "run", AEGISD)
    trust = GateTrust(proc_net=fake_net(tmp_path, connection, AEGISD), platform="linux", uid=OWN,
                      env={"AEGIS_SOCKET": str(path)})
    verify(trust, connection)
    os.chmod(path.parent, 0o770)  # noqa: S103 - anyone in the group could have put a socket there
    with pytest.raises(GateUntrusted, match=f"uid {AEGISD}"):
        verify(trust, connection)
    os.chmod(path.parent, 0o700)
    os.chown(path, AEGISD + 1, AEGISD + 1)  # not the directory's owner: not aegisd's (its directory must be its own)
    with pytest.raises(GateUntrusted):
        verify(trust, connection)


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a socket to another uid needs root")
def test_a_socket_directory_another_user_made_in_a_shared_directory_vouches_for_no_one(
        tmp_path: Path, connection: socket.socket) -> None:
    """Found by a review: the bridge trusted the owner of whatever directory held the socket it was pointed at, so
    a user who made /tmp/aegis first (as aegisctl would refuse now) also got the bridge's agent token through a
    gate listener of theirs. The socket's path must pass aegisctl's own check (paths.safe_directory) to count."""
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)  # noqa: S103 - a sticky directory anyone can write, as /tmp
    path = control_socket(shared / "aegis", 4321)
    trust = GateTrust(proc_net=fake_net(tmp_path, connection, 4321), platform="linux", uid=OWN,
                      env={"AEGIS_SOCKET": str(path)})
    with pytest.raises(GateUntrusted, match="uid 4321"):
        verify(trust, connection)
    link = tmp_path / "link"
    link.symlink_to(path.parent)
    os.lchown(link, 4321, 4321)  # another user's symbolic link on the way
    os.chmod(shared, 0o755)  # noqa: S103 - no longer open to all: the link alone is the way in
    trust = GateTrust(proc_net=fake_net(tmp_path, connection, 4321), platform="linux", uid=OWN,
                      env={"AEGIS_SOCKET": str(link / "aegisd.sock")})
    with pytest.raises(GateUntrusted, match="uid 4321"):
        verify(trust, connection)


def exists_as_on_python_3_14(self: Path) -> bool:
    """Path.exists() from Python 3.14 on: False for any OSError, where 3.11-3.13 raise all but "not there"."""
    try:
        os.stat(self)
    except (OSError, ValueError):
        return False
    return True


@pytest.mark.skipif(os.geteuid() != 0, reason="a directory closed to the bridge's user needs root to set up")
@pytest.mark.parametrize("exists", ["this python's", "python 3.14's"])
def test_the_owner_of_a_system_socket_hidden_from_the_bridge_is_trusted(connection: socket.socket,
                                                                        monkeypatch: pytest.MonkeyPatch,
                                                                        exists: str) -> None:
    """The packaged service: aegisd runs as a dynamic user, its socket in /run/aegis (0750, group aegis), which the
    bridge's user, outside that group, may not search. The bridge, a real process of uid 65534, finds the system
    socket there all the same and trusts the directory's owner as the gate, on every Python."""
    if exists != "this python's":
        monkeypatch.setattr(Path, "exists", exists_as_on_python_3_14)
    scratch = Path(tempfile.mkdtemp(prefix="aegis-hidden-"))  # not under tmp_path: uid 65534 must reach it
    try:
        os.chmod(scratch, 0o755)  # noqa: S103 - the bridge's user walks through it, as through /run
        system = control_socket(scratch / "run-aegis", AEGISD)
        os.chmod(system.parent, 0o750)  # noqa: S103 - as the packaged /run/aegis: group aegis may search it
        monkeypatch.setattr(paths, "SYSTEM_SOCKET", system)
        trust = GateTrust(proc_net=fake_net(scratch, connection, AEGISD), platform="linux", uid=NOBODY,
                          env={"XDG_RUNTIME_DIR": str(scratch / "xdg")})  # no per-user daemon there
        assert as_nobody(trust.control_socket_owner) == repr((system, AEGISD))
        # aegisctl's own choice: the hidden system socket (its client then says the directory is closed), never a
        # PermissionError traceback (Python up to 3.13) or a per-user socket that is not there (3.14).
        assert as_nobody(lambda: paths.resolve_socket(None, None, {"XDG_RUNTIME_DIR": str(scratch / "xdg")})) \
            == repr(system)
        assert as_nobody(lambda: verify(trust, connection)) == "None"
        os.chown(system.parent, AEGISD + 1, AEGISD + 1)  # the gate is not the directory's owner's: refused
        assert f"runs as uid {AEGISD}" in as_nobody(lambda: verify(trust, connection))
    finally:
        shutil.rmtree(scratch)


def as_nobody(check: Callable[[], object]) -> str:
    """What `check` returns (or the GateUntrusted it raises), run in a child process of uid and gid 65534."""
    codecs.lookup("ascii")  # peer_user reads the tables as ASCII: load the codec here, where the interpreter's own
    # files are readable (under /root they are not for uid 65534, when no earlier test has loaded it)
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        said = "the child did not finish"
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            said = repr(check())
        except GateUntrusted as exc:
            said = str(exc)
        except BaseException as exc:  # any failure goes back to the test
            said = f"{type(exc).__name__}: {exc}"
        finally:
            os.write(writer, said.encode())
            os._exit(0)
    os.close(writer)
    with os.fdopen(reader, "rb") as answer:
        said = answer.read().decode()
    os.waitpid(pid, 0)
    return said


def test_no_row_or_no_table_is_refused(tmp_path: Path, connection: socket.socket) -> None:
    time_wait = GateTrust(proc_net=fake_net(tmp_path, connection, 0, state="06"), platform="linux", uid=OWN)
    with pytest.raises(GateUntrusted, match="cannot tell which user listens"):
        verify(time_wait, connection)
    hidden = GateTrust(proc_net=tmp_path / "missing", platform="linux", uid=OWN)
    with pytest.raises(GateUntrusted, match="cannot read"):
        verify(hidden, connection)


def test_no_check_where_the_system_keeps_no_table(tmp_path: Path, connection: socket.socket) -> None:
    verify(GateTrust(proc_net=tmp_path / "missing", platform="darwin", uid=OWN), connection)


def test_a_request_the_sdk_cannot_parse_is_answered_with_its_id() -> None:
    import mcp_types
    from pydantic import ValidationError

    def parsed(line: str) -> ValidationError:
        with pytest.raises(ValidationError) as caught:
            mcp_types.jsonrpc_message_adapter.validate_json(line, by_name=False)
        return caught.value

    answer = stdio.parse_error_answer(parsed('{"jsonrpc":"2.0","id":"a1","method":"tools/call","params":'
                                             '{"name":"x","arguments":{"z":"\\ud800"}}}'))
    assert answer is not None and answer.id == "a1" and answer.error.code == -32700
    assert "lone surrogate" in answer.error.message
    answer.model_dump_json()  # serialisable: it goes on the wire
    assert stdio.parse_error_answer(parsed('{"jsonrpc":"2.0","method":"n","params":{"z":"\\ud800"}}')) is None
    assert stdio.parse_error_answer(parsed(" \n")) is None  # a blank line holds no message


@pytest.mark.parametrize(("line", "request_id"), [
    ('{"jsonrpc":"2.0","id":7,"method":"ping"} junk\n', 7),
    ('{"jsonrpc":"2.0","id":"a","method":"ping"}\ufffd\ufffd\n', "a"),  # stdin's bytes that are no UTF-8
    ('{"jsonrpc":"2.0","method":"notifications/initialized"}}\n', None),
    ('{"jsonrpc":"2.0","id":true,"method":"ping"} x\n', None),
    ("not json\n", None),
    ("[1, 2\n", None),
])
def test_a_line_that_is_no_json_gets_a_parse_error(line: str, request_id: int | str | None) -> None:
    """JSON-RPC answers a parse error with the id of the request the line starts with, else null; without an
    answer the host waits for ever."""
    import mcp_types
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as caught:
        mcp_types.jsonrpc_message_adapter.validate_json(line, by_name=False)
    answer = stdio.parse_error_answer(caught.value)
    assert answer is not None and answer.id == request_id and answer.error.code == -32700
    assert answer.error.message.startswith("Parse error: ") and "junk" not in answer.error.message
    wire = json.loads(answer.model_dump_json(by_alias=True, exclude_unset=True))  # as the SDK writes it
    assert wire == {"jsonrpc": "2.0", "id": request_id, "error": {"code": -32700, "message": answer.error.message}}


@pytest.mark.parametrize("arguments", [{"body": "\ud800"}, {"path": "/a\udc00"}, {"service": "ap\ud800i"},
                                       {"headers": {"X-A": "\ud800"}}, {"target_host": "\udfff.example"}])
def test_a_lone_surrogate_argument_is_an_invalid_argument(arguments: dict[str, object]) -> None:
    """Such a string cannot be sent as UTF-8: the tool says which argument, never an "unexpected" error."""
    from aegisctl.mcp.gate_client import GateClient
    from aegisctl.mcp.tools import build_server

    async def call() -> object:
        async with GateClient("http://127.0.0.1:9", "aegis_x") as gate:  # never reached
            return await build_server(gate).call_tool("aegis_proxy_request",
                                                      {"service": "api", "path": "/x", **arguments})

    result = anyio.run(call)
    error = result.structured_content["error"]  # type: ignore[attr-defined]
    assert error["code"] == "invalid_argument" and "lone surrogate" in error["message"], error
    assert f"'{next(iter(arguments))}'" in error["message"], error
