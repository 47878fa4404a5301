"""What bounds webhook deliveries, end to end with the real daemon and a real receiver.

Anyone who can reach the gate can send requests without a token. Their refusals past the ledger's rate
for them raise no event and no log line of their own, and the events they do raise may hold only a
share of the queue, so they can never crowd out an alert about a real agent. Deliveries waiting for a
retry count against the same bound as the queue, so a receiver answering 503 cannot grow aegisd's memory.
"""

from __future__ import annotations

import functools
import json
import socket
import threading
import time
from collections.abc import Callable

from aegisd.gate.unauthenticated import BURST
from tests.e2e.ops_support import Scrape, add_webhook, ops_world, refused
from tests.webhook_receiver import Receiver

LEAKED = "sk-flooded-secret-5Rt8Yp2Wq7"


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


def _flood_in_background(port: int, count: int, token: str = "", status: int = 401) -> tuple[threading.Thread,
                                                                                              list[int]]:
    answered: list[int] = []
    thread = threading.Thread(target=lambda: answered.append(_pipelined(port, count, token, status)), daemon=True)
    thread.start()
    return thread, answered


def _until(what: str, check: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_a_tokenless_flood_cannot_crowd_out_an_alert_about_a_real_agent() -> None:
    """The receiver is slow (it holds every answer), so nothing leaves the queue while the flood fills it:
    without a share reserved for events that name an agent, the real agent's alert would be dropped."""
    world = ops_world("[webhooks]\nqueue_size = 20\nworkers = 1\n")
    receiver = Receiver(hold=True).start()
    try:
        world.agent("bot")  # no grants: every call it makes is refused not_granted, a blocked_request
        add_webhook(world, receiver, "agent_auth_failure,blocked_request")
        flood, answered = _flood_in_background(world.port, 1000)
        _until("the tokenless flood never filled its share of the webhook queue",
               lambda: Scrape(world).value("aegis_webhook_dropped_total") > 0)
        real = refused(world.call("GET", "/github/repos/acme/x", agent="bot"), 403, "not_granted")
        more, more_answered = _flood_in_background(world.port, 500)  # and the flood goes on after it
        flood.join(60)
        more.join(60)
        assert answered == [1000] and more_answered == [500]

        receiver.release()
        deadline = time.monotonic() + 20
        while not [d for d in receiver.of("blocked_request")
                   if d.payload["details"].get("request_id") == real.request_id]:
            assert time.monotonic() < deadline, (
                f"the real agent's alert was never delivered; {len(receiver.deliveries)} deliveries arrived, "
                f"{Scrape(world).value('aegis_webhook_dropped_total'):g} were dropped")
            time.sleep(0.05)
        alert = next(d for d in receiver.of("blocked_request") if d.payload["details"]["request_id"] == real.request_id)
        assert alert.verified and alert.payload["details"]["agent"] == "bot"
        # The tokenless share is a quarter of queue_size (5 of 20), the delivery the worker held included.
        assert len(receiver.of("agent_auth_failure")) <= 20 // 4, len(receiver.of("agent_auth_failure"))
        log = world.aegis.log()
        first = next(line for line in log.splitlines() if "webhook queue full; deliveries dropped" in line)
        hook_id = json.loads(world.aegis.ctl_in_process("webhook", "list", "--json").ok().out)[0]["id"]
        assert f"webhook={hook_id}" in first, first  # which webhook, by id: its URL is a secret
        _until("no summary of the dropped deliveries was logged",
               lambda: "webhook deliveries dropped" in world.aegis.log(), timeout=15)
        summaries = [line for line in world.aegis.log().splitlines() if "webhook deliveries dropped" in line]
        assert all(f"webhooks={hook_id}" in line for line in summaries), summaries
        world.assert_no_leaks([d.body.decode() for d in receiver.deliveries])
    finally:
        receiver.stop()
        world.close()


def test_an_agents_flood_of_refusals_cannot_crowd_out_its_own_later_alert() -> None:
    """Found by a cold review: events raised by a real agent had no share of their own, so a prompt-injected
    agent could flood cheap refusals (not_granted comes before rate limits) and then exfiltrate in warn mode:
    the body_inspection alert found the queue full. One event of one agent holds a quarter of it at most."""
    world = ops_world("[webhooks]\nqueue_size = 20\nworkers = 1\n")
    receiver = Receiver(hold=True).start()
    try:
        up = world.upstream()
        world.credential("open", LEAKED, up.entry(), "--body-inspection", "warn")
        token = world.agent("evil", "open")
        add_webhook(world, receiver, "blocked_request,body_inspection")
        assert _pipelined(world.port, 300, token, 403) == 300  # /svc is not granted: blocked_request each
        _until("the agent's flood never filled its share of the webhook queue",
               lambda: Scrape(world).value("aegis_webhook_dropped_total") > 0)
        leak = world.call("POST", "/open/echo/leak", [("Content-Type", "application/json")],
                          json.dumps({"note": LEAKED}).encode(), agent="evil")
        assert leak.status == 200, leak.text()
        world.received.remove(leak.text())  # the upstream's echo of what the agent sent
        receiver.release()
        _until("the agent's body_inspection alert was crowded out",
               lambda: any(d.payload["details"].get("request_id") == leak.request_id
                           for d in receiver.of("body_inspection")))
        # One event of one agent holds a quarter of queue_size (5 of 20), the delivery the worker held included.
        assert len(receiver.of("blocked_request")) <= 20 // 4 + 1, len(receiver.of("blocked_request"))
        world.assert_no_leaks([d.body.decode() for d in receiver.deliveries])
    finally:
        receiver.stop()
        world.close()


def test_tokenless_refusals_past_the_ledger_rate_raise_no_event_and_no_log_line() -> None:
    """A roomy queue and a healthy receiver: every event raised is delivered, so the deliveries count exactly
    the refusals that raised one. Those are the refusals the ledger itemised; the rest are in its summary row."""
    flood = 3 * BURST
    world = ops_world("[webhooks]\nqueue_size = 100000\n")
    receiver = Receiver().start()
    try:
        add_webhook(world, receiver, "agent_auth_failure")

        def counted() -> tuple[int, int]:
            """Refusals recorded one by one, and those the summary rows count."""
            rows: list[dict[str, object]] = json.loads(
                world.aegis.ctl("ledger", "show", "--json", "--limit", "100000").ok().out)
            return (sum(r["reason"] == "agent_auth_required" for r in rows),
                    sum(int(str(r["detail"]).split()[0]) for r in rows if r["reason"] == "unauthenticated_flood"))

        def accounted_for(refusals: int) -> bool:
            return sum(counted()) >= refusals

        sent = 0
        for _ in range(4):  # a machine slow enough to answer under the steady rate leaves none out: send more
            assert _pipelined(world.port, flood) == flood
            sent += flood
            # Until every refusal is accounted for, not only until the first summary row: a flood that outlasts
            # SUMMARY_AFTER_SECONDS (as on a loaded machine) is summed up in two rows or more.
            _until("the ledger never accounted for every refusal", functools.partial(accounted_for, sent), timeout=30)
            recorded, left_out = counted()
            if left_out:
                break
        assert recorded + left_out == sent and left_out > 0, (recorded, left_out)

        # Every recorded refusal's delivery arrives (a delivery being POSTed is in no queue, so "the queue is
        # empty" cannot tell when they are all in); then a moment for any that should not exist to show up.
        _until(f"fewer than {recorded} agent_auth_failure deliveries arrived",
               lambda: len(receiver.of("agent_auth_failure")) >= recorded)
        time.sleep(0.5)
        delivered = receiver.of("agent_auth_failure")
        assert len(delivered) == recorded, (len(delivered), recorded, sent)
        assert Scrape(world).value("aegis_webhook_dropped_total") == 0
        log = world.aegis.log()
        assert log.count("request refused") == recorded, (log.count("request refused"), recorded)
        assert "were not recorded one by one" in log
        # Every refusal is still counted in the metrics.
        assert Scrape(world).value("aegis_requests_blocked_total", service="unknown", reason="agent_auth_required",
                                   agent="") == sent
    finally:
        receiver.stop()
        world.close()


def test_retries_waiting_on_a_failing_receiver_count_against_the_queue_bound() -> None:
    """A receiver answering 503 to everything and a long retry delay: every failed delivery waits for its
    retry. However many alerts are raised, queued and waiting deliveries together stay within queue_size."""
    bound = 16
    world = ops_world(f"[webhooks]\nqueue_size = {bound}\nworkers = 2\nretry_delay = 60\n")
    receiver = Receiver(fail_first=10**9).start()
    try:
        # No grants: each call raises blocked_request. Five agents, since one agent's event holds a quarter of
        # the queue at most: together they can fill it.
        tokens = [world.agent(f"bot{n}") for n in range(5)]
        add_webhook(world, receiver, "agent_auth_failure,blocked_request")
        floods = [_flood_in_background(world.port, 300, token, 403) for token in tokens]
        tokenless, tokenless_answered = _flood_in_background(world.port, 800)
        held = []
        while any(flood.is_alive() for flood, _ in floods) or tokenless.is_alive():
            scrape = Scrape(world)
            held.append(scrape.value("aegis_webhook_queue_depth") + scrape.value("aegis_webhook_retries_pending"))
            time.sleep(0.02)
        assert [answered for _, answered in floods] == [[300]] * 5 and tokenless_answered == [800]
        _until("the receiver was never tried", lambda: receiver.attempts > bound)
        time.sleep(1)  # the workers finish what was queued: each failure waits for its retry
        scrape = Scrape(world)
        pending = scrape.value("aegis_webhook_retries_pending")
        held.append(scrape.value("aegis_webhook_queue_depth") + pending)
        assert max(held) <= bound, (max(held), held)
        assert pending > 0
        assert scrape.value("aegis_webhook_dropped_total") > 0
        assert scrape.value("aegis_webhook_delivered_total") == 0
        assert receiver.attempts > bound  # more were tried than the bound holds: older retries were let go
        assert "webhook queue full; deliveries dropped" in world.aegis.log()
    finally:
        receiver.stop()
        world.close()
