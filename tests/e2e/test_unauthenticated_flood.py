"""A flood of requests without a valid token cannot fill the disk through the ledger: past a burst and a
steady rate their refusals are counted, and one system row says how many, through the real daemon."""

from __future__ import annotations

import json
import signal
import socket
import time

from aegisd.gate.unauthenticated import BURST, RATE_PER_SECOND
from tests.e2e.gate_support import GateWorld

FLOOD = 3 * BURST


def _pipelined(port: int, count: int) -> int:
    """Send `count` tokenless requests on one connection at once, every other one to an unknown operator
    endpoint (a refusal that got no row at all, until a cold review); the number of 401s and 404s back."""
    requests = [f"GET {'/_aegis/flood' if i % 2 else '/svc/echo/flood'} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n"
                for i in range(count)]
    with socket.create_connection(("127.0.0.1", port), timeout=60) as conn:
        conn.sendall("".join(requests).encode())
        received = b""
        while received.count(b"HTTP/1.1 401 ") + received.count(b"HTTP/1.1 404 ") < count:
            chunk = conn.recv(1 << 20)
            if not chunk:
                break
            received += chunk
    return received.count(b"HTTP/1.1 401 ") + received.count(b"HTTP/1.1 404 ")


def test_refusals_past_the_rate_are_counted_in_one_row_and_agents_keep_theirs() -> None:
    world = GateWorld.start()
    try:
        up = world.upstream()
        world.credential("svc", "sk-flood-test-secret-0123456789", up.entry())
        world.agent("bot", "svc")
        started = time.monotonic()
        assert _pipelined(world.port, FLOOD) == FLOOD  # every request is answered, recorded or not
        elapsed = time.monotonic() - started
        assert world.call("GET", "/svc/echo/agent", agent="bot").status == 200  # an agent's row is never counted

        # Until every refusal is accounted for: a summary row comes SUMMARY_AFTER_SECONDS after the first refusal
        # it counts, so a flood that outlasts that (as on a loaded machine) is summed up in two rows or more, the
        # last only a second after the flood's end. A long deadline: it ends the wait only if some never come.
        deadline = time.monotonic() + 30
        while True:
            rows = json.loads(world.aegis.ctl("ledger", "show", "--json", "--limit", "100000").ok().out)
            summaries = [r for r in rows if r["reason"] == "unauthenticated_flood"]
            recorded = sum(r["reason"] in ("agent_auth_required", "not_found") for r in rows)
            left_out = sum(int(r["detail"].split()[0]) for r in summaries)
            if recorded + left_out >= FLOOD or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert recorded + left_out == FLOOD, (recorded, left_out)
        assert BURST <= recorded <= BURST + RATE_PER_SECOND * (elapsed + 1), (recorded, elapsed)
        assert summaries and "without a valid agent token" in summaries[0]["detail"]
        assert {r["reason"] for r in rows if r["path"] == "/flood"} == {"not_found"}  # recorded, within the budget
        assert any(r["path"] == "/echo/agent" and r["agent"] == "bot" for r in rows)
        assert "were not recorded one by one" in world.aegis.log()
        world.assert_no_leaks()
    finally:
        world.close()


def test_a_stop_right_after_a_flood_still_writes_its_summary_row() -> None:
    """The summary row waits SUMMARY_AFTER_SECONDS on a timer; a stop before it fires flushes it, so the
    refusals left out are accounted for rather than lost with the timer."""
    world = GateWorld.start()
    try:
        count = BURST + 300
        assert _pipelined(world.port, count) == count
        world.aegis.stop(signal.SIGTERM)  # at once: well within the summary's second
        assert "were not recorded one by one" in world.aegis.log()
        world.aegis.start()
        world.unlock()
        rows = json.loads(world.aegis.ctl("ledger", "show", "--json", "--limit", "100000").ok().out)
        recorded = sum(r["reason"] in ("agent_auth_required", "not_found") for r in rows)
        summaries = [r for r in rows if r["reason"] == "unauthenticated_flood"]
        assert summaries, recorded
        assert recorded + sum(int(r["detail"].split()[0]) for r in summaries) == count
        world.assert_no_leaks()
    finally:
        world.close()
