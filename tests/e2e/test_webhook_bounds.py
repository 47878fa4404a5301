"""What bounds webhook deliveries, end to end with the real daemon and a real receiver.

Anyone who can reach the gate can send requests without a token. Their refusals past the ledger's rate
for them raise no event and no log line of their own.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable

from aegisd.gate.unauthenticated import BURST
from tests.e2e.ops_support import Scrape, add_webhook, ops_world
from tests.webhook_receiver import Receiver


def _pipelined(port: int, count: int, token: str = "", status: int = 401) -> int:
    """Send `count` requests on one connection at once (with `token`, if any); how many got `status`."""
    header = f"X-Aegis-Agent: {token}\r\n" if token else ""
    request = f"GET /svc/echo/flood HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{header}\r\n".encode()
    expected = f"HTTP/1.1 {status} ".encode()
    with socket.create_connection(("127.0.0.1", port), timeout=60) as conn:
        conn.sendall(request * count)
        received = b""
        while received.count(expected) < count:
            chunk = conn.recv(1 << 20)
            if not chunk:
                break
            received += chunk
    return received.count(expected)


def _until(what: str, check: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_tokenless_refusals_past_the_ledger_rate_raise_no_event_and_no_log_line() -> None:
    """A roomy queue and a healthy receiver: every event raised is delivered, so the deliveries count exactly
    the refusals that raised one. Those are the refusals the ledger itemised; the rest are in its summary row."""
    flood = 3 * BURST
    world = ops_world("[webhooks]\nqueue_size = 100000\n")
    receiver = Receiver().start()
    try:
        add_webhook(world, receiver, "agent_auth_failure")
        assert _pipelined(world.port, flood) == flood

        def summarised() -> list[dict[str, object]]:
            rows: list[dict[str, object]] = json.loads(
                world.aegis.ctl("ledger", "show", "--json", "--limit", "100000").ok().out)
            return rows if any(r["reason"] == "unauthenticated_flood" for r in rows) else []

        _until("no unauthenticated_flood summary row", lambda: bool(summarised()))
        rows = summarised()
        recorded = sum(r["reason"] == "agent_auth_required" for r in rows)
        left_out = sum(int(str(r["detail"]).split()[0]) for r in rows if r["reason"] == "unauthenticated_flood")
        assert recorded + left_out == flood and left_out > 0, (recorded, left_out)

        seen = [-1]

        def settled() -> bool:  # nothing queued, nothing new for a moment
            count = len(receiver.deliveries)
            done = count == seen[0] and Scrape(world).value("aegis_webhook_queue_depth") == 0
            seen[0] = count
            if not done:
                time.sleep(0.3)
            return done

        _until("webhook deliveries never settled", settled)
        delivered = receiver.of("agent_auth_failure")
        assert len(delivered) == recorded, (len(delivered), recorded, flood)
        assert Scrape(world).value("aegis_webhook_dropped_total") == 0
        log = world.aegis.log()
        assert log.count("request refused") == recorded, (log.count("request refused"), recorded)
        assert "were not recorded one by one" in log
        # Every refusal is still counted in the metrics.
        assert Scrape(world).value("aegis_requests_blocked_total", service="unknown", reason="agent_auth_required",
                                   agent="") == flood
    finally:
        receiver.stop()
        world.close()
