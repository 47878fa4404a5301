"""The MCP bridge sends its agent token only to a gate port held by its own user, root, or the owner of aegisd's
control socket: while aegisd is down (before it starts, during a restart, after a crash) another local user can
listen on the gate's port to collect the tokens agents send it.

The squatter is a real process running as `nobody` that records every byte it receives; the bridge is the real
`aegisctl mcp serve`, at its start and in the middle of a session with a real aegisd.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from tests.e2e.gate_support import GateWorld
from tests.e2e.mcp_support import Bridge, bridge_env, error_of, value_of, write_token_file
from tests.harness import AEGISCTL, free_port

SECRET = "mcpGateOwnerSecret-0123456789abcdefABCD"
FAKE_TOKEN = "aegis_" + "S" * 43  # what a squatter must never receive
SYSTEM_PYTHON = Path("/usr/bin/python3")  # one another user may run: the venv's lives under /root
NOBODY = 65534
OTHER = 61234  # a service's uid (systemd's DynamicUser= range) that owns a control socket in one test
# Listens on 127.0.0.1:PORT, says "ready", and prints every byte it receives (hex, a line per read); it answers
# like the gate's /_aegis/services, so a bridge that trusts it starts.
SQUATTER = r"""
import json, socket, sys, threading
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", int(sys.argv[1])))
srv.listen(16)
print("ready", flush=True)
body = json.dumps({"agent": "squatted", "services": []}).encode()
head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
def serve(conn):
    with conn:
        conn.settimeout(10)
        try:
            while data := conn.recv(65536):
                print(data.hex(), flush=True)
                conn.sendall(head + body)
        except OSError:
            pass
while True:
    conn, _ = srv.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""

pytestmark = [
    pytest.mark.skipif(os.getuid() != 0, reason="a listener of another user needs root"),
    pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="the check reads Linux's /proc/net"),
    pytest.mark.skipif(not SYSTEM_PYTHON.exists(), reason="needs /usr/bin/python3 for the other user's process"),
]


class Squatter:
    """A process of `uid` listening on 127.0.0.1:`port`, keeping what it receives."""

    def __init__(self, port: int, uid: int = NOBODY) -> None:
        self.proc = subprocess.Popen([str(SYSTEM_PYTHON), "-I", "-c", SQUATTER, str(port)], user=uid, group=uid,
                                     extra_groups=[], cwd="/", stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     stdin=subprocess.DEVNULL, env={"PATH": "/usr/bin:/bin"})
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline() == b"ready\n", "the squatter did not start"

    def received(self) -> bytes:
        """Everything it was sent (it is stopped first)."""
        self.proc.terminate()
        out, _ = self.proc.communicate(timeout=15)
        return b"".join(bytes.fromhex(line) for line in out.decode().split())


def serve_once(gate_url: str, token_file: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`aegisctl mcp serve` with stdin closed: it checks the gate, then ends (0) or refuses (1)."""
    return subprocess.run([AEGISCTL, "mcp", "serve", "--token-file", str(token_file)],
                          env={**bridge_env(gate_url), **(env or {})}, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=60, check=False)


@pytest.fixture
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("gate-owner")
    yield root
    shutil.rmtree(root, ignore_errors=True)


def test_bridge_does_not_start_against_another_users_listener_and_sends_it_nothing(scratch: Path) -> None:
    token_file = write_token_file(scratch / "bot.token", FAKE_TOKEN)
    port = free_port()
    squatter = Squatter(port)
    try:
        result = serve_once(f"http://127.0.0.1:{port}", token_file)
    finally:
        got = squatter.received()
    assert result.returncode == 1, result.stderr
    assert result.stdout == "" and "Traceback" not in result.stderr, result.stderr
    for needle in (f"127.0.0.1:{port}", f"uid {NOBODY}", "the agent token was not sent", "next:"):
        assert needle in result.stderr, (needle, result.stderr)
    assert FAKE_TOKEN.encode() not in got and got == b"", got  # not a byte, let alone the token
    assert FAKE_TOKEN not in result.stderr


def test_the_owner_of_the_control_socket_is_trusted_as_the_gate(scratch: Path) -> None:
    """As under the packaged unit, where aegisd runs as its own (dynamic) user: the gate's port is held by the
    owner of aegisd's control socket, whom the bridge finds from the socket's path without connecting to it."""
    run = scratch / "run"
    run.mkdir(mode=0o700)
    os.chown(run, OTHER, OTHER)
    control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    control.bind(str(run / "aegisd.sock"))
    os.chown(run / "aegisd.sock", OTHER, OTHER)
    token_file = write_token_file(scratch / "bot.token", FAKE_TOKEN)
    port = free_port()
    squatter = Squatter(port, OTHER)
    try:
        trusted = serve_once(f"http://127.0.0.1:{port}", token_file, {"AEGIS_SOCKET": str(run / "aegisd.sock")})
        refused = serve_once(f"http://127.0.0.1:{port}", token_file, {"AEGIS_SOCKET": str(scratch / "none.sock")})
    finally:
        squatter.received()
        control.close()
    assert trusted.returncode == 0 and "serving agent 'squatted'" in trusted.stderr, trusted.stderr
    assert refused.returncode == 1 and f"uid {OTHER}" in refused.stderr, refused.stderr


def test_a_running_bridge_sends_no_token_to_a_squatter_while_aegisd_is_down() -> None:
    world = GateWorld.start()
    try:
        world.credential("api", SECRET, world.upstream().entry())
        token = world.agent("bot", "api")
        bridge = Bridge(world.aegis.gate_url, write_token_file(world.aegis.root / "bot.token", token),
                        world.aegis.root / "bridge.err")
        got = b""

        async def run() -> None:
            nonlocal got
            async with bridge.stdio() as session:
                assert value_of(await bridge.call(session, "aegis_health"))["agent_token"] == "valid"
                world.aegis.stop()  # a restart, a crash: the port is free
                squatter = Squatter(world.port)
                try:
                    for tool in ("aegis_health", "aegis_list_services"):
                        error = error_of(await bridge.call(session, tool), "gate_untrusted")
                        assert f"uid {NOBODY}" in error["message"], error
                    refused = await bridge.call(session, "aegis_proxy_request", service="api", path="/x")
                    error_of(refused, "gate_untrusted")
                finally:
                    got = squatter.received()
                world.aegis.start()  # aegisd back on its port: the same bridge works again
                world.unlock()
                assert value_of(await bridge.call(session, "aegis_health"))["agent_token"] == "valid"

        anyio.run(run)
        assert got == b"" and token.encode() not in got, got
        world.aegis.assert_no_leaks([SECRET, token], extra_text=bridge.outputs())
    finally:
        world.close()
