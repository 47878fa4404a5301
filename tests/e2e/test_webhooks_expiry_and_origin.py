"""Webhooks end to end, from a cold review of aegisd/webhooks: the credential_expiry alert's once-a-day rule (per
webhook, and only once delivered), and a webhook's origin and address (shown as it is sent, never the gate itself).

Every delivery is checked as a production receiver must check it (HMAC of the exact bytes), and every output for
secrets (assert_no_leaks).
"""

from __future__ import annotations

import json
import time

from tests.e2e.gate_support import GateWorld
from tests.e2e.ops_support import Scrape, add_webhook, ops_world
from tests.e2e.support import assert_failed
from tests.webhook_receiver import Receiver, sign

BRIEF_SECRET = "sk-expiry-brief-5f4e3d2c1b"
LATER_SECRET = "sk-expiry-later-6a7b8c9d0e"
URL_TOKEN = "T0KEN-origin-8d7c6b5a"
# One worker per webhook: its deliveries arrive in the order raised, so an alert raised after another in the same
# check arriving says the first would have arrived by then.
CONFIG = "[webhooks]\nworkers = 1\nmax_attempts = 1\n"


def _expiries(receiver: Receiver) -> list[tuple[str, str, int]]:
    """(credential, state, status answered) of each credential_expiry delivery, signature checked. Checked here,
    not as it arrived: the check a webhook's add starts can deliver before add_webhook hands the receiver its
    secret."""
    found = []
    for delivery in receiver.deliveries:
        assert delivery.headers["X-Aegis-Signature"] == sign(receiver.secret, delivery.body), delivery
        if delivery.event == "credential_expiry":
            details = delivery.payload["details"]
            found.append((details["credential"], details["state"], delivery.status))
    return found


def _wait_counted(world: GateWorld, metric: str, count: int) -> None:
    """Until the dispatcher has counted `count` deliveries in `metric` (a wait, not a timing assertion): a
    receiver holds a delivery before its answer reaches the dispatcher."""
    deadline = time.monotonic() + 20
    while Scrape(world).value(metric) < count:
        assert time.monotonic() < deadline, f"{metric} never reached {count}"
        time.sleep(0.05)


def test_a_webhook_added_later_the_same_day_gets_the_expiry_alert_another_already_got() -> None:
    """The once-a-day rule was kept per credential and state over every webhook, so a webhook added later that day
    never got the alert another had (operations.md: a check runs when a webhook is added). It is kept per webhook:
    the new one gets it at once, and neither gets it twice."""
    world = ops_world(CONFIG)
    first, second = Receiver().start(), Receiver().start()
    try:
        up = world.upstream()
        add_webhook(world, first, "credential_expiry", "/hook/first")
        world.credential("brief", BRIEF_SECRET, up.entry(), "--ttl", "3600")
        first.wait_for(1, "credential_expiry")

        add_webhook(world, second, "credential_expiry", "/hook/second")
        second.wait_for(1, "credential_expiry", timeout=10)
        world.credential("later", LATER_SECRET, up.entry(), "--ttl", "3600")  # a check: "brief" comes first in it
        for receiver in (first, second):
            receiver.wait_for(2, "credential_expiry")
            assert _expiries(receiver) == [("brief", "expiring_soon", 200),
                                                      ("later", "expiring_soon", 200)]
        world.assert_no_leaks([d.body.decode() for r in (first, second) for d in r.deliveries])
    finally:
        first.stop()
        second.stop()
        world.close()


def test_an_expiry_alert_a_receiver_missed_is_raised_again_at_the_next_check() -> None:
    """The alert was marked sent before it was even tried, so one whose delivery failed (the receiver down at the
    first unlock after boot, say) was not raised again for up to 24 hours. It counts as sent only once a receiver
    answered 2xx: the next check raises it again, once."""
    world = ops_world(CONFIG)
    receiver = Receiver(fail_first=1).start()  # briefly broken: its first answer is 503, and there is no retry
    try:
        up = world.upstream()
        add_webhook(world, receiver, "credential_expiry")
        world.credential("brief", BRIEF_SECRET, up.entry(), "--ttl", "3600")
        _wait_counted(world, "aegis_webhook_failed_total", 1)

        world.credential("later", LATER_SECRET, up.entry(), "--ttl", "3600")  # credentials changed: a check
        receiver.wait_for(3, "credential_expiry", timeout=10)
        assert _expiries(receiver) == [("brief", "expiring_soon", 503), ("brief", "expiring_soon", 200),
                                                  ("later", "expiring_soon", 200)]
        _wait_counted(world, "aegis_webhook_delivered_total", 2)
        scrape = Scrape(world)
        assert (scrape.value("aegis_webhook_delivered_total"), scrape.value("aegis_webhook_failed_total")) == (2, 1)
        world.assert_no_leaks([d.body.decode() for d in receiver.deliveries])
    finally:
        receiver.stop()
        world.close()


def test_a_webhook_shows_the_host_it_is_sent_to_and_never_points_at_the_gate() -> None:
    """From a cold review: the origin was urllib's Unicode reading of the host, while deliveries go to yarl's
    A-labels (`hooks.slack.com。evil.com` was shown with the ideographic full stop, sent to
    hooks.slack.com.evil.com; Cyrillic look-alikes were shown as Latin); an IPv6 zone id passed the check and then
    failed every delivery; and a webhook to the gate's own address fed itself (each delivery a refusal without a
    token raising another alert: 642 ledger rows from one request)."""
    world = ops_world()
    ctl = world.aegis.ctl_in_process
    world.secrets.append(URL_TOKEN)
    try:
        for url, origin in ((f"https://hooks.slack.com\u3002evil.com/{URL_TOKEN}", "https://hooks.slack.com.evil.com"),
                            (f"https://h\u043e\u043eks.slack.com/{URL_TOKEN}", "https://xn--hks-seda.slack.com")):
            added = ctl("webhook", "add", "--url-stdin", "--events", "blocked_request", "--json",
                        input=url + "\n").ok()
            world.aegis.outputs.remove(added.out)
            world.secrets.append(json.loads(added.out)["secret"])
            assert json.loads(added.out)["origin"] == origin
        listed = json.loads(ctl("webhook", "list", "--json").ok().out)
        assert sorted(hook["origin"] for hook in listed) == ["https://hooks.slack.com.evil.com",
                                                             "https://xn--hks-seda.slack.com"]

        assert_failed(ctl("webhook", "add", f"http://[::1%25lo]:{world.port + 1}/{URL_TOKEN}", "--events",
                          "blocked_request"), "must not hold '%'", "zone id")
        for host in ("127.0.0.1", "localhost"):
            assert_failed(ctl("webhook", "add", f"http://{host}:{world.port}/svc/{URL_TOKEN}", "--events",
                              "agent_auth_failure,blocked_request"), "points at aegisd's own gate", "listen address")
        assert len(json.loads(ctl("webhook", "list", "--json").ok().out)) == 2  # nothing refused was registered
        assert "Traceback" not in world.aegis.log()
        world.assert_no_leaks()
    finally:
        world.close()
