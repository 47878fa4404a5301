"""Webhooks end to end: aegisctl commands, signed deliveries to a real receiver, retries, drops.

Every delivery is checked the way a production receiver must check it: HMAC-SHA256 of the exact
body bytes with the secret `webhook add` printed once.
"""

from __future__ import annotations

import contextlib
import json
import socket
import sqlite3
import threading
import time
from typing import Any

from aegisd.vault.crypto import seal, unseal
from aegisd.webhooks.registry import SUBKEY as WEBHOOK_SUBKEY
from aegisd.webhooks.registry import webhook_aad, webhook_aad_v1
from tests.e2e.gate_support import GateWorld, Reply
from tests.e2e.ops_support import Scrape, add_webhook, ops_world, refused
from tests.e2e.support import assert_failed, open_vault
from tests.harness import PASSPHRASE, free_port
from tests.webhook_receiver import Delivery, Receiver

SECRET = "sk-webhook-secret-7e6d5c4b3a"
BRIEF_SECRET = "sk-webhook-brief-9a8b7c6d5e"
OPEN_SECRET = "sk-webhook-open-2f3e4d5c6b"
URL_SECRET = "slackish-T0KEN-3c2b1a"
RATE_LIMIT = 2  # requests a minute on `bear` in the rate_limited test
ALL_EVENTS = "blocked_request,rate_limited,agent_auth_failure,body_inspection,credential_expiry,response_redacted"
DETAIL_KEYS = {"request_id", "agent", "service", "credential", "method", "path", "target_host", "reason", "status",
               "decision"}


def _check_delivery(delivery: Delivery) -> dict[str, Any]:
    """Signature over the exact bytes, headers matching the payload, the documented shape."""
    assert delivery.verified, delivery
    payload = delivery.payload
    assert set(payload) == {"event", "id", "time", "details"}, payload
    assert delivery.headers["X-Aegis-Event"] == payload["event"]
    assert delivery.headers["X-Aegis-Delivery"] == payload["id"]
    assert delivery.headers["Content-Type"] == "application/json"
    assert payload["time"].endswith("Z")
    return payload


def _by_request(deliveries: list[Delivery]) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for delivery in deliveries:
        request_id = delivery.payload["details"].get("request_id")
        if request_id:
            found.setdefault(request_id, []).append(delivery.event)
    return found


def test_webhook_commands_show_the_secret_once() -> None:
    world = ops_world()
    receiver = Receiver().start()
    ctl = world.aegis.ctl
    try:
        url = receiver.url(f"/hook/{URL_SECRET}")
        world.secrets.append(URL_SECRET)
        added = ctl("webhook", "add", url, "--events", "credential_expiry, blocked_request").ok()
        secret = added.out.strip()
        assert added.out == secret + "\n" and secret.startswith("whsec_")
        assert "not shown again" in added.err
        world.aegis.outputs.remove(added.out)
        world.secrets.append(secret)
        receiver.secret = secret

        listed = json.loads(ctl("webhook", "list", "--json").ok().out)
        assert len(listed) == 1
        hook_id = listed[0]["id"]
        assert listed[0] == {"id": hook_id, "origin": f"http://127.0.0.1:{receiver.port}",
                             "events": ["blocked_request", "credential_expiry"], "created_at": listed[0]["created_at"],
                             "integrity": "ok"}
        human = ctl("webhook", "list").ok().out
        assert hook_id in human and f"127.0.0.1:{receiver.port}" in human

        tested = ctl("webhook", "test", hook_id).ok()
        assert "HTTP 200" in tested.out
        delivery = receiver.wait_for(1, "test")[0]
        payload = _check_delivery(delivery)
        assert tested.out.split()[1] == payload["id"]

        # A URL can come from stdin, out of argv; a dead receiver makes `test` fail with the reason.
        dead_url = f"http://127.0.0.1:{free_port()}/dead"
        stdin_added = ctl("webhook", "add", "--url-stdin", "--events", "rate_limited", "--json",
                          input=dead_url + "\n").ok()
        world.aegis.outputs.remove(stdin_added.out)
        via_stdin = json.loads(stdin_added.out)
        world.secrets.append(via_stdin["secret"])
        failed = ctl("webhook", "test", via_stdin["id"])
        assert_failed(failed, "test delivery", "cannot connect")
        as_json = ctl("webhook", "test", via_stdin["id"], "--json")
        assert as_json.code == 1 and json.loads(as_json.out)["delivered"] is False

        # Bad input: a precise error, and nothing registered.
        assert_failed(ctl("webhook", "add", "http://hooks.example.com/x", "--events", "blocked_request"),
                      "only to loopback", "https://")
        assert_failed(ctl("webhook", "add", url, "--events", "blocked,rate_limited"),
                      "unknown webhook event 'blocked'", "blocked_request")
        assert_failed(ctl("webhook", "add", "https://u:p@hooks.example.com/x", "--events", "blocked_request"),
                      "user or password")
        assert_failed(ctl("webhook", "add", "--events", "blocked_request"), "argument or with --url-stdin", code=2)
        # The URL is a secret: a refusal never quotes it, not even the token pasted where a port goes, or a
        # user:password urllib would quote whole.
        for bad in (f"https://hooks.example.com:{URL_SECRET}/x", f"https://alerts:{URL_SECRET}\u2100@hooks.example.com/x"):
            assert_failed(ctl("webhook", "add", "--url-stdin", "--events", "blocked_request", input=bad + "\n"),
                          "the webhook URL is malformed")
        # A host no delivery could look up (an empty label) is refused now, not failed at every delivery.
        assert_failed(ctl("webhook", "add", "https://hooks..example.com/x", "--events", "blocked_request"),
                      "not a valid name", "63 characters")
        # Port 0 is no port a receiver can listen on: refused now, not failed at every delivery.
        for zero in ("https://127.0.0.1:0/x", f"http://127.0.0.1:0/hook/{URL_SECRET}", "https://hooks.example.com:00/x"):
            refused_zero = ctl("webhook", "add", "--url-stdin", "--events", "blocked_request", input=zero + "\n")
            assert_failed(refused_zero, "port is 0", "no receiver can listen on")
            assert URL_SECRET not in refused_zero.err and "hooks.example.com" not in refused_zero.err
        # `localhost.` is no loopback name: glibc looks it up in DNS, which may answer with any address.
        assert_failed(ctl("webhook", "add", f"http://localhost.:{receiver.port}/x", "--events", "blocked_request"),
                      "only to loopback")
        assert_failed(ctl("webhook", "remove", "wh_000000000000", "--yes"), "no webhook", "webhook list")
        assert_failed(ctl("webhook", "remove", hook_id), "--yes", code=2)

        # Locked: the list still shows origins (and nothing was lost to bad input); add and test need the vault.
        ctl("lock").ok()
        assert len(json.loads(ctl("webhook", "list", "--json").ok().out)) == 2
        assert_failed(ctl("webhook", "add", url, "--events", "blocked_request"), "locked", "aegisctl unlock")
        assert_failed(ctl("webhook", "test", hook_id), "locked")
        ctl("unlock", "--passphrase-stdin", input=PASSPHRASE + "\n").ok()

        assert f"Removed webhook {hook_id}" in ctl("webhook", "remove", hook_id, "--yes").ok().out
        assert [h["id"] for h in json.loads(ctl("webhook", "list", "--json").ok().out)] == [via_stdin["id"]]
        # The signing secrets and the URL's path exist nowhere in clear: not in any output, log or file.
        world.assert_no_leaks([d.body.decode() for d in receiver.deliveries])
    finally:
        receiver.stop()
        world.close()


def _call_until(world: GateWorld, target: str, code: str, deadline_s: float = 20.0) -> Reply:
    deadline = time.monotonic() + deadline_s
    while True:
        reply = world.call("GET", target, agent="bot")
        if reply.status != 200:
            assert reply.error()["code"] == code, reply.text()
            return reply
        assert time.monotonic() < deadline, f"{target} never answered {code}"
        time.sleep(0.2)


def test_gate_events_are_delivered_signed() -> None:
    world = ops_world("[webhooks]\nworkers = 1\n")  # one worker: deliveries arrive in order
    receiver = Receiver().start()
    try:
        up = world.upstream()
        world.credential("bear", SECRET, up.entry())
        add_webhook(world, receiver, ALL_EVENTS)
        world.credential("brief", BRIEF_SECRET, up.entry(), "--ttl", "4")
        world.agent("bot", "bear", "brief")

        soon = _check_delivery(receiver.wait_for(1, "credential_expiry")[0])
        assert {k: soon["details"][k] for k in ("credential", "service", "state")} == {
            "credential": "brief", "service": "brief", "state": "expiring_soon"}
        assert soon["details"]["expires_at"].endswith("Z")

        allowed = world.call("GET", "/bear/echo/a?api_key=query-value-77", agent="bot")
        assert allowed.status == 200
        blocked = world.call("GET", "/nosuch/x?api_key=query-value-78", agent="bot")
        world.assert_refused(blocked, 403, "not_granted")
        bad_token = world.call("GET", "/bear/x", [("X-Aegis-Agent", "aegis_forged-token-value")])
        world.assert_refused(bad_token, 401, "agent_auth_invalid")
        expired = _call_until(world, "/brief/echo/b", "credential_expired")
        expired_again = world.call("GET", "/brief/echo/c", agent="bot")
        refused(expired_again, 403, "credential_expired")
        marker = world.call("GET", "/marker/x", agent="bot")
        refused(marker, 403, "not_granted")

        deadline = time.monotonic() + 20
        while marker.request_id not in _by_request(receiver.deliveries):
            assert time.monotonic() < deadline, [d.payload for d in receiver.deliveries]
            time.sleep(0.05)
        deliveries = receiver.deliveries
        payloads = [_check_delivery(d) for d in deliveries]
        assert len({p["id"] for p in payloads}) == len(payloads)
        events = _by_request(deliveries)
        assert allowed.request_id not in events
        assert events[blocked.request_id] == ["blocked_request"]
        assert events[bad_token.request_id] == ["agent_auth_failure"]
        assert events[expired.request_id] == ["blocked_request", "credential_expiry"]
        assert events[expired_again.request_id] == ["blocked_request"]  # expiry alerts once a day per credential
        assert [p["details"].get("state") for p in payloads if p["event"] == "credential_expiry"] == [
            "expiring_soon", "expired"]

        detail = next(p["details"] for p in payloads if p["details"].get("request_id") == blocked.request_id)
        assert set(detail) == DETAIL_KEYS
        assert detail == {**detail, "agent": "bot", "service": "nosuch", "method": "GET", "path": "/x",
                          "reason": "not_granted", "status": 403, "decision": "denied"}
        auth = next(p["details"] for p in payloads if p["details"].get("request_id") == bad_token.request_id)
        assert auth["agent"] == "" and auth["reason"] == "agent_auth_invalid"
        bodies = [d.body.decode() for d in deliveries]
        assert not any("query-value" in body or "aegis_forged" in body for body in bodies)

        scrape = Scrape(world)
        assert scrape.value("aegis_webhook_delivered_total") == len(deliveries)
        assert scrape.value("aegis_webhook_failed_total") == scrape.value("aegis_webhook_dropped_total") == 0
        world.assert_no_leaks(bodies)
    finally:
        receiver.stop()
        world.close()


def test_limit_inspection_and_redaction_events() -> None:
    """A request refused by body inspection, the requests past a credential's rate limit, and a reply the gate
    redacted each raise their event, and nothing else is delivered for them."""
    world = ops_world()
    receiver = Receiver().start()
    try:
        up = world.upstream()
        world.credential("bear", SECRET, up.entry(), "--rate-limit", f"{RATE_LIMIT}/min")
        world.credential("open", OPEN_SECRET, up.entry(), "--body-inspection", "warn")
        world.agent("bot", "bear", "open")
        add_webhook(world, receiver, "rate_limited,body_inspection,response_redacted")
        # `bear` inspects in block mode (the default): refused before it reaches the upstream, so the request
        # gives back the unit of quota it took (docs/policies.md) and the limit is whole for what follows.
        inspected = world.call("POST", "/bear/echo/leak", body=json.dumps({"key": SECRET}).encode(), agent="bot")
        refused(inspected, 403, "body_inspection")
        # RATE_LIMIT requests per minute: the first RATE_LIMIT pass, every one after them within the minute is 429.
        replies = [world.call("GET", "/bear/echo/x", agent="bot") for _ in range(RATE_LIMIT + 2)]
        assert [r.status for r in replies] == [200] * RATE_LIMIT + [429] * 2, [r.text() for r in replies]
        limited = [refused(r, 429, "rate_limited") for r in replies[RATE_LIMIT:]]
        # In warn mode the secret is forwarded (and flagged); the upstream echoes it back, redacted.
        echoed = world.call("POST", "/open/echo/r", body=json.dumps({"key": OPEN_SECRET}).encode(), agent="bot")
        assert echoed.status == 200, echoed.text()
        assert b"[REDACTED]" in echoed.body and OPEN_SECRET.encode() not in echoed.body, echoed.text()

        raised = {inspected.request_id: {"body_inspection"},
                  **{r.request_id: {"rate_limited"} for r in limited},
                  echoed.request_id: {"body_inspection", "response_redacted"}}
        expected = sum(map(len, raised.values()))
        receiver.wait_for(expected)
        got: dict[str, set[str]] = {}
        for delivery in receiver.deliveries:
            payload = _check_delivery(delivery)
            got.setdefault(payload["details"]["request_id"], set()).add(payload["event"])
        assert got == raised
        assert len(receiver.deliveries) == expected, [d.payload for d in receiver.deliveries]
        world.assert_no_leaks([d.body.decode() for d in receiver.deliveries])
    finally:
        receiver.stop()
        world.close()


def test_a_secret_in_the_path_reaches_no_receiver() -> None:
    """A payload's path is its ledger row's: masked where a secret was, whether the request was refused by
    inspection, forwarded in warn mode, or refused before inspection."""
    world = ops_world()
    receiver = Receiver().start()
    try:
        up = world.upstream()
        world.credential("bear", SECRET, up.entry())
        world.credential("open", OPEN_SECRET, up.entry(), "--body-inspection", "warn")
        world.agent("bot", "bear", "open")
        add_webhook(world, receiver, "blocked_request,body_inspection")
        blocked = world.call("GET", f"/bear/echo/{OPEN_SECRET}", agent="bot")
        warned = world.call("GET", f"/open/echo/{SECRET}/x", agent="bot")
        ungranted = world.call("GET", f"/nosuch/{SECRET}", agent="bot")
        assert (blocked.status, warned.status, ungranted.status) == (403, 200, 403)
        world.received.remove(warned.text())  # the upstream's echo of the path the agent sent
        receiver.wait_for(3)
        paths = {d.payload["details"]["request_id"]: d.payload["details"]["path"] for d in receiver.deliveries}
        assert paths == {blocked.request_id: "/echo/[REDACTED]", warned.request_id: "/echo/[REDACTED]/x",
                         ungranted.request_id: "/[REDACTED]"}
        world.assert_no_leaks([d.body.decode() for d in receiver.deliveries])
    finally:
        receiver.stop()
        world.close()


def test_a_payload_carries_the_row_as_stored_not_a_huge_path() -> None:
    """Rows cap agent-controlled text (2,048 characters); a webhook payload is built from the same capped row,
    so a request with a 10 KB path costs no receiver 10 KB."""
    world = ops_world()
    receiver = Receiver().start()
    try:
        add_webhook(world, receiver, "agent_auth_failure")
        refused(world.call("GET", "/any/" + "p" * 10_000), 401, "agent_auth_required")
        [delivery] = receiver.wait_for(1)
        path = delivery.payload["details"]["path"]
        [row] = world.ledger()
        assert path == row["path"] and len(path) < 2_100 and "truncated" in path, path[-60:]
    finally:
        receiver.stop()
        world.close()


def test_retries_reach_a_receiver_that_fails_twice() -> None:
    world = ops_world("[webhooks]\nretry_delay = 0.05\n")
    receiver = Receiver(fail_first=2).start()
    try:
        add_webhook(world, receiver, "agent_auth_failure")
        refused(world.call("GET", "/any/x"), 401, "agent_auth_required")
        attempts = receiver.wait_for(3)
        assert [a.status for a in attempts] == [503, 503, 200]
        assert all(a.verified for a in attempts)
        assert len({a.delivery_id for a in attempts}) == 1  # the same delivery, retried
        assert len({a.body for a in attempts}) == 1  # byte for byte, so one signature covers every attempt
        # The receiver answers before the daemon counts the delivery: wait (bounded) for the count.
        deadline = time.monotonic() + 30
        while (scrape := Scrape(world)).value("aegis_webhook_delivered_total") != 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert scrape.value("aegis_webhook_delivered_total") == 1
        assert scrape.value("aegis_webhook_failed_total") == 0
        world.assert_no_leaks([a.body.decode() for a in attempts])
    finally:
        receiver.stop()
        world.close()


def test_dead_and_slow_receivers_never_slow_the_gate() -> None:
    """The flood is an agent's refusals: refusals that name no agent may hold only a quarter of the queue (one
    place of these four), so with them the held receiver's delivery would keep the dead one's out for good."""
    world = ops_world("[webhooks]\nqueue_size = 4\nworkers = 1\ntimeout = 0.5\nmax_attempts = 2\n"
                      "retry_delay = 0.05\n")
    slow = Receiver(hold=True).start()
    try:
        up = world.upstream()
        world.credential("bear", SECRET, up.entry())
        world.agent("bot", "bear")
        add_webhook(world, slow, "blocked_request")
        dead = world.aegis.ctl("webhook", "add", f"http://127.0.0.1:{free_port()}/dead", "--events",
                               "blocked_request").ok()
        world.aegis.outputs.remove(dead.out)
        world.secrets.append(dead.out.strip())

        started = time.perf_counter()
        for n in range(300):
            refused(world.call("GET", f"/nosuch/flood/{n}", agent="bot"), 403, "not_granted")
            if n % 10 == 0:
                assert world.call("GET", f"/bear/echo/{n}", agent="bot").status == 200
        elapsed = time.perf_counter() - started
        print(f"330 gate requests with a dead and a held receiver: {elapsed:.2f} s")

        scrape = Scrape(world)
        assert scrape.value("aegis_webhook_dropped_total") > 0
        assert scrape.value("aegis_webhook_queue_depth") <= 4
        assert "webhook queue full" in world.aegis.log()
        # The agent's one place (4 // 4) goes, event after event, to whichever webhook's (random) id sorts first:
        # the dead one fails fast; the held one fails once its two attempts (0.5 s each) have timed out. Waited for
        # before the release: after it, a flood shorter than those two attempts left the held delivery to succeed
        # and nothing ever failed (flaky since the test was written, with one shared queue as with lanes).
        deadline = time.monotonic() + 30
        while Scrape(world).value("aegis_webhook_failed_total") == 0:
            assert time.monotonic() < deadline, "no delivery to the dead or the held receiver was ever given up"
            time.sleep(0.1)
        slow.release()
        world.assert_no_leaks([d.body.decode() for d in slow.deliveries])
    finally:
        slow.stop()
        world.close()



class _Hanging:
    """A receiver that accepts every connection, reads the request and never answers (until stopped)."""

    def __init__(self) -> None:
        self._server = socket.create_server(("127.0.0.1", 0))
        self._server.settimeout(0.1)
        self.port: int = self._server.getsockname()[1]
        self._held: list[socket.socket] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="hanging-receiver", daemon=True)
        self._thread.start()

    @property
    def requests(self) -> int:
        """Requests read and left unanswered."""
        with self._lock:
            return len(self._held)

    def _serve(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = self._server.accept()
            except TimeoutError:
                continue
            conn.settimeout(5)
            with contextlib.suppress(OSError):
                conn.recv(1 << 16)  # the request; no answer follows
            with self._lock:
                self._held.append(conn)

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(5)
        self._server.close()
        with self._lock:
            for conn in self._held:
                conn.close()


def test_a_receiver_that_never_answers_delays_only_its_own_webhook() -> None:
    """Found by a review: every webhook shared one queue and `workers` workers, so a receiver that accepted and never
    answered, with more of its deliveries queued than there were workers, held every worker for `timeout` and another
    webhook's alert (an exfiltration's, say) waited behind it. Each webhook now has its own lane."""
    workers = 2
    world = ops_world(f"[webhooks]\nworkers = {workers}\ntimeout = 30\n")
    hanging = _Hanging()
    healthy = Receiver().start()
    try:
        world.agent("bot")  # no grants: each call it makes is refused not_granted, a blocked_request
        added = world.aegis.ctl("webhook", "add", f"http://127.0.0.1:{hanging.port}/hang", "--events",
                                "agent_auth_failure", "--json").ok()
        world.aegis.outputs.remove(added.out)
        world.secrets.append(json.loads(added.out)["secret"])
        add_webhook(world, healthy, "blocked_request")
        for n in range(workers + 2):
            refused(world.call("GET", f"/any/{n}"), 401, "agent_auth_required")
        deadline = time.monotonic() + 10
        while hanging.requests < workers:  # as many of its attempts as it may have are stuck
            assert time.monotonic() < deadline, f"{hanging.requests} requests reached the hanging receiver"
            time.sleep(0.02)

        alert = refused(world.call("GET", "/nosuch/x", agent="bot"), 403, "not_granted")
        [delivery] = healthy.wait_for(1, "blocked_request", timeout=5)  # the hanging one's timeout is 30 s
        assert _check_delivery(delivery)["details"]["request_id"] == alert.request_id
        assert hanging.requests == workers  # its other deliveries wait behind its own stuck attempts
        assert Scrape(world).value("aegis_webhook_queue_depth") == 2
        world.assert_no_leaks([d.body.decode() for d in healthy.deliveries])
    finally:
        healthy.stop()
        world.close()
        hanging.stop()


def test_an_expiry_edited_in_the_database_raises_no_alert() -> None:
    """Someone who can write vault.db sets a credential's expiry in the past to fake an alert (or could push it
    out to hide one). The expiry is sealed with the secret, so the edited row fails authentication: the expiry
    watch alerts only on what authenticates, and metrics count the row as failing, not as expired. A genuinely
    expiring credential, checked in the same pass, still raises its alert.

    Webhooks in the same vault.db (found by a cold review): their events and origin were stored in clear outside
    the seal, so an edit silently re-subscribed a webhook, and a value aegisd could not have written failed the
    unlock itself (INTERNAL) and every `webhook list`. Now the seal covers them: an edited webhook is not loaded
    (logged, named by doctor, refused by `webhook test`) while the unlock, the list and the other webhooks work.
    A webhook sealed by an earlier aegisd (without them) is refused as well, with its own message: a second cold
    review showed that accepting it, even to reseal it once, let an old copy of the row be put back with events
    of anyone's choosing (the `moved` row: such a seal with an edited column)."""
    world = ops_world("[webhooks]\nworkers = 1\n")  # one worker: deliveries arrive in the order raised
    receiver, edited, garbled, older, moved = (Receiver().start() for _ in range(5))
    try:
        up = world.upstream()
        world.credential("bear", SECRET, up.entry())
        add_webhook(world, receiver, "credential_expiry")
        edited_id = add_webhook(world, edited, "blocked_request", "/hook/edited")
        garbled_id = add_webhook(world, garbled, "blocked_request", "/hook/garbled")
        older_id = add_webhook(world, older, "credential_expiry", "/hook/older")
        moved_id = add_webhook(world, moved, "credential_expiry", "/hook/moved")
        world.aegis.ctl("lock").ok()
        past = int(time.time() * 1000) - 86_400_000
        db = world.aegis.data_dir / "vault.db"
        conn = sqlite3.connect(db, timeout=10)
        with conn:
            conn.execute("UPDATE credentials SET expires_at = ? WHERE name = 'bear'", (past,))
        with open_vault(world.aegis.data_dir) as vault, conn:  # as the aegisd before the fix sealed them
            key, vault_id = vault.master().subkey(WEBHOOK_SUBKEY), vault.vault_id
            assert vault_id is not None
            for hook_id in (older_id, moved_id):
                origin, events, nonce, sealed = conn.execute("SELECT origin, events, nonce, sealed FROM webhooks "
                                                             "WHERE id = ?", (hook_id,)).fetchone()
                plain = unseal(key, nonce, sealed, webhook_aad(vault_id, hook_id, origin, events))
                conn.execute("UPDATE webhooks SET nonce = ?, sealed = ? WHERE id = ?",
                             (*seal(key, plain, webhook_aad_v1(vault_id, hook_id)), hook_id))
        (older_nonce,) = conn.execute("SELECT nonce FROM webhooks WHERE id = ?", (older_id,)).fetchone()
        with conn:
            # Re-subscribed to what the attacker will not trigger, shown as going elsewhere; then a value aegisd
            # never writes; and an earlier aegisd's webhook shown as going elsewhere (its sealed URL says not).
            conn.execute("UPDATE webhooks SET events = '[\"credential_expiry\"]', origin = 'https://siem.example' "
                         "WHERE id = ?", (edited_id,))
            conn.execute("UPDATE webhooks SET events = 'x' WHERE id = ?", (garbled_id,))
            conn.execute("UPDATE webhooks SET origin = 'https://siem.example' WHERE id = ?", (moved_id,))
        world.unlock()  # the watch checks at unlock, in name order: "bear" before "brief"
        world.credential("brief", BRIEF_SECRET, up.entry(), "--ttl", "3d")

        [soon] = receiver.wait_for(1, "credential_expiry")
        assert _check_delivery(soon)["details"]["credential"] == "brief"
        assert [d.payload["details"]["credential"] for d in receiver.deliveries] == ["brief"]
        scrape = Scrape(world)
        assert (scrape.value("aegis_credentials_total", status="failing"),
                scrape.value("aegis_credentials_total", status="expired"),
                scrape.value("aegis_credentials_total", status="expiring_soon")) == (1, 0, 1)

        failing = sorted((edited_id, garbled_id, moved_id, older_id))
        log = world.aegis.log()
        for hook_id in (edited_id, garbled_id):
            assert f"webhook not loaded: webhook {hook_id} fails authentication" in log
            assert_failed(world.aegis.ctl("webhook", "test", hook_id), f"webhook {hook_id} fails authentication",
                          f"webhook remove {hook_id}")
        for hook_id in (older_id, moved_id):  # as written by the earlier aegisd, or edited since: both refused
            assert f"webhook not loaded: webhook {hook_id} was sealed by an earlier aegisd" in log
            assert_failed(world.aegis.ctl("webhook", "test", hook_id), "sealed by an earlier aegisd",
                          f"webhook remove {hook_id}")
        (still,) = conn.execute("SELECT nonce FROM webhooks WHERE id = ?", (older_id,)).fetchone()
        assert still == older_nonce  # nothing resealed
        listed = {h["id"]: h for h in json.loads(world.aegis.ctl("webhook", "list", "--json").ok().out)}
        assert len(listed) == 5 and listed[garbled_id]["events"] == [] and listed[older_id]["events"] == [
            "credential_expiry"]
        [check] = [c for c in json.loads(world.aegis.ctl("doctor", "--json").out)["checks"] if c["name"] == "webhooks"]
        assert check["status"] == "fail" and check["message"].endswith(": " + ", ".join(failing)), check
        assert "webhook remove" in check["hint"]
        conn.close()
        assert [len(r.deliveries) for r in (edited, garbled, moved, older)] == [0, 0, 0, 0]
        assert "control RPC" not in world.aegis.log()
        world.assert_no_leaks([d.body.decode() for d in receiver.deliveries])
    finally:
        for each in (receiver, edited, garbled, older, moved):
            each.stop()
        world.close()


EDITED_ORIGIN = "https://siem.example\x1b]0;pwned\x07"


def test_webhook_list_marks_a_row_edited_while_aegisd_was_stopped() -> None:
    """`webhook list` showed an edited webhook as stored, like any other, though nothing is delivered to it. Now
    it checks each row as delivery does: INTEGRITY `FAILS` (`tampered` in JSON) with a line on what to do,
    `unchecked (locked)` while the vault is locked, and never any part of the sealed URL or the secret."""
    world = ops_world("[webhooks]\nworkers = 1\n")  # one worker: deliveries arrive in the order raised
    good, edited = Receiver().start(), Receiver().start()
    try:
        world.secrets.append(URL_SECRET)
        world.credential("bear", SECRET, world.upstream().entry())
        world.agent("bot", "bear")
        good_id = add_webhook(world, good, "blocked_request", f"/hook/{URL_SECRET}")
        edited_id = add_webhook(world, edited, "blocked_request", f"/hook/{URL_SECRET}")
        assert {h["id"]: h["integrity"] for h in json.loads(world.aegis.ctl("webhook", "list", "--json").ok().out)} \
            == {good_id: "ok", edited_id: "ok"}
        assert world.aegis.stop() == 0
        conn = sqlite3.connect(world.aegis.data_dir / "vault.db")
        with conn:  # shown as going elsewhere (with terminal escapes), and subscribed to more
            conn.execute("UPDATE webhooks SET origin = ?, events = '[\"agent_auth_failure\", \"blocked_request\"]' "
                         "WHERE id = ?", (EDITED_ORIGIN, edited_id))
        conn.close()
        world.aegis.start()

        locked = world.aegis.ctl("webhook", "list").ok()
        assert locked.out.count("unchecked (locked)") == 2 and "FAILS" not in locked.out, locked.out
        world.unlock()
        listed = {h["id"]: h for h in json.loads(world.aegis.ctl("webhook", "list", "--json").ok().out)}
        assert listed[good_id]["integrity"] == "ok"
        assert listed[edited_id] == {**listed[edited_id], "integrity": "tampered", "origin": EDITED_ORIGIN}
        human = world.aegis.ctl("webhook", "list").ok()
        [row] = [line for line in human.out.splitlines() if line.startswith(edited_id)]
        assert row.split()[-1] == "FAILS", human.out
        [good_row] = [line for line in human.out.splitlines() if line.startswith(good_id)]
        assert good_row.split()[-1] == "ok", human.out
        assert f"webhook {edited_id} fails authentication" in human.err
        assert f"aegisctl webhook remove {edited_id}" in human.err and good_id not in human.err
        assert r"https://siem.example\x1b]0;pwned\x07" in human.out and "\x1b" not in human.out + human.err
        # Found by a cold review: `webhook remove` put the stored origin raw in its question (and in the usage
        # error asking for --yes without a terminal).
        asked = world.aegis.ctl_in_process("webhook", "remove", edited_id)
        assert asked.code == 2 and r"(https://siem.example\x1b]0;pwned\x07)?" in asked.err, asked
        assert "\x1b" not in asked.err and "\x07" not in asked.err

        for path in ("/nosuch/a", "/nosuch/b"):
            refused(world.call("GET", path, agent="bot"), 403, "not_granted")
        assert [d.payload["details"]["path"] for d in good.wait_for(2, "blocked_request")] == ["/a", "/b"]
        assert edited.deliveries == []  # nothing delivered to the edited row
        assert_failed(world.aegis.ctl("webhook", "test", edited_id), f"webhook {edited_id} fails authentication")
        assert edited.deliveries == []
        world.assert_no_leaks([d.body.decode() for d in good.deliveries])
    finally:
        good.stop()
        edited.stop()
        world.close()
