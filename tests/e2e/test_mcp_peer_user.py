"""The HTTP bridge serves only its own user's processes (and root's): a process of another user that holds
the bridge's MCP bearer (collected by squatting the port while the bridge was down) gets 403, on Linux.

A real daemon and agent, the real `aegisctl mcp serve --transport http`, and a real client process
running as `nobody` that sends the right bearer.
"""

from __future__ import annotations

import json
import os
import resource
import socket
import subprocess
from pathlib import Path

import pytest

from tests.e2e.gate_support import GateWorld
from tests.e2e.mcp_support import Bridge, write_token_file

SECRET = "mcpPeerUserSecret-0123456789abcdefABCDEF"
SYSTEM_PYTHON = Path("/usr/bin/python3")  # one that `nobody` may run: the venv's lives under /root
NOBODY = 65534
# Reads the bearer from stdin (never argv, which `ps` shows), POSTs an MCP initialize, prints status and body.
CLIENT = """
import http.client, json, sys
port, timeout, bearer = int(sys.argv[1]), float(sys.argv[2]), sys.stdin.read().strip()
conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
if len(sys.argv) > 3:  # claim to be another connection, as a proxy would say it
    headers["X-Forwarded-For"] = sys.argv[3]
if bearer:
    headers["Authorization"] = "Bearer " + bearer
init = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
    "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "peer-test", "version": "1"}}}
conn.request("POST", "/mcp", body=json.dumps(init), headers=headers)
reply = conn.getresponse()
print(json.dumps({"status": reply.status, "body": reply.read(2000).decode(errors="replace")}))
"""


def initialize_as(uid: int, port: int, bearer: str, forwarded_for: str | None = None,
                  timeout: float = 30) -> dict[str, object]:
    extra = [forwarded_for] if forwarded_for else []
    proc = subprocess.run([str(SYSTEM_PYTHON), "-I", "-c", CLIENT, str(port), str(timeout), *extra], input=bearer,
                          user=uid, cwd="/", capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    answer: dict[str, object] = json.loads(proc.stdout)
    return answer


def _http_bridge(world: GateWorld) -> tuple[str, Bridge, subprocess.Popen[bytes]]:
    """Agent `bot`, granted a credential on an upstream of its own, and an HTTP bridge serving it: its token, the
    bridge and the bridge's process."""
    up = world.upstream()
    world.credential("api", SECRET, up.entry())
    token = world.agent("bot", "api")
    token_file = write_token_file(world.aegis.root / "bot.token", token)
    bridge = Bridge(world.aegis.gate_url, token_file, world.aegis.root / "bridge.err")
    return token, bridge, bridge.start_http()


@pytest.mark.skipif(os.getuid() != 0, reason="acting as another user needs root")
@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="the peer's user is read from Linux's /proc/net")
@pytest.mark.skipif(not SYSTEM_PYTHON.exists(), reason="needs /usr/bin/python3 for the other user's client")
def test_http_bridge_refuses_another_users_process_even_with_the_bearer() -> None:
    world = GateWorld.start()
    try:
        token, bridge, proc = _http_bridge(world)
        try:
            bearer = bridge.bearer()
            # A connection of root's held open to the bridge: naming its address in X-Forwarded-For must not
            # make another user's request pass as root's (the bridge takes the peer from the socket alone).
            with socket.create_connection(("127.0.0.1", bridge.http_port)) as roots:
                host, port = roots.getsockname()[:2]
                roots_address = f"{host}:{port}"
                for sent, claim in ((bearer, None), ("", None), (bearer, roots_address), (bearer, "127.0.0.1")):
                    refused = initialize_as(NOBODY, bridge.http_port, sent, claim)
                    assert refused["status"] == 403, (claim, refused)
                    error = json.loads(str(refused["body"]))["error"]
                    assert error["code"] == "peer_user_refused" and f"uid {NOBODY}" in error["message"], error
            # Root (this bridge's own user here) gets past the user check: with the bearer the bridge starts an
            # MCP session; without it the bearer check refuses.
            own = initialize_as(0, bridge.http_port, bearer)
            assert own["status"] == 200 and '"result"' in str(own["body"]), own
            assert initialize_as(0, bridge.http_port, "")["status"] == 401
        finally:
            proc.terminate()
            proc.wait(15)
        world.aegis.assert_no_leaks([SECRET, token, bearer], extra_text=[bridge.stderr()])
    finally:
        world.close()


# Opens argv[2] connections to the bridge, each holding half a request head (no bearer), as another user may; then
# reports how many of them the bridge had answered 403 peer_user_refused, or closed, within a bounded wait.
HOG = """
import json, select, socket, sys, time
port, count = int(sys.argv[1]), int(sys.argv[2])
held = []
for _ in range(count):
    try:
        conn = socket.create_connection(("127.0.0.1", port), timeout=2)
        conn.sendall(b"POST /mcp HTTP/1.1\\r\\nHost: 127.0.0.1\\r\\n")
    except OSError:
        continue
    held.append(conn)
pending, refused, deadline = set(held), 0, time.monotonic() + 10
while pending and deadline > time.monotonic():
    ready, _, _ = select.select(list(pending), [], [], deadline - time.monotonic())
    for conn in ready:
        pending.discard(conn)
        try:
            answer = conn.recv(4096)
        except OSError:
            answer = b""  # reset: closed all the same
        refused += answer == b"" or b"peer_user_refused" in answer
print(json.dumps({"held": len(held), "refused": refused}), flush=True)
sys.stdin.read()  # keep every connection open until told
"""


@pytest.mark.skipif(os.getuid() != 0, reason="acting as another user needs root")
@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="the peer's user is read from Linux's /proc/net")
@pytest.mark.skipif(not SYSTEM_PYTHON.exists(), reason="needs /usr/bin/python3 for the other user's client")
def test_another_users_half_sent_requests_cannot_use_up_the_bridge() -> None:
    """uvicorn sets no deadline on a request head that never ends, and the user check ran only once a head was
    whole: another user holding many connections open, each with half a head, took every file descriptor the
    bridge had, and its own host could connect no more. The bridge now refuses them as it accepts them."""
    world = GateWorld.start()
    try:
        token, bridge, proc = _http_bridge(world)
        bearer = bridge.bearer()
        hog = None
        try:
            resource.prlimit(proc.pid, resource.RLIMIT_NOFILE, (256, 256))  # fewer than the hog's connections
            hog = subprocess.Popen([str(SYSTEM_PYTHON), "-I", "-c", HOG, str(bridge.http_port), "300"], user=NOBODY,
                                   cwd="/", env={"PATH": "/usr/bin:/bin"}, stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            assert hog.stdout is not None
            report = json.loads(hog.stdout.readline() or "{}")
            assert report.get("held", 0) > 256, report
            assert report["refused"] == report["held"], report
            # While the hog still holds its side of every connection, the bridge's own user is served.
            own = initialize_as(0, bridge.http_port, bearer, timeout=10)
            assert own["status"] == 200 and '"result"' in str(own["body"]), own
        finally:
            if hog is not None:
                hog.kill()
                hog.wait(15)
            proc.terminate()
            proc.wait(15)
        world.aegis.assert_no_leaks([SECRET, token, bearer], extra_text=[bridge.stderr()])
    finally:
        world.close()
