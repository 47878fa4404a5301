"""/_aegis/metrics and /_aegis/health on a real gate: names, label sets, bounded labels, switches."""

from __future__ import annotations

import json
import time
import uuid

from tests.e2e.gate_support import request
from tests.e2e.ops_support import Scrape, add_webhook, ops_world, refused
from tests.harness import PASSPHRASE, Aegis
from tests.webhook_receiver import Receiver

SECRET = "sk-metrics-secret-4f7a9c2e1b"
SOON_SECRET = "sk-metrics-soon-8d6e5f4a3b"
BRIEF_SECRET = "sk-metrics-brief-1a2b3c4d5e"
REQUEST_LABELS = {"service", "method", "status", "agent"}
BLOCKED_LABELS = {"service", "reason", "agent"}


def test_metrics_after_traffic() -> None:
    world = ops_world()
    try:
        up = world.upstream()
        world.credential("bear", SECRET, up.entry())
        world.credential("soon", SOON_SECRET, up.entry(), "--ttl", "3d")
        world.credential("brief", BRIEF_SECRET, up.entry(), "--ttl", "1")
        world.agent("bot", "bear")
        token = world.tokens["bot"]

        assert world.call("GET", "/bear/echo/a?api_key=query-value-1", agent="bot").status == 200
        assert world.call("POST", "/bear/echo/b", body=b"{}", agent="bot").status == 200
        assert world.call("PROPFIND", "/bear/echo/c", agent="bot").status == 200
        assert world.call("GET", "/bear/status/503", agent="bot").status == 503
        world.assert_refused(world.call("GET", "/bear/echo/d"), 401, "agent_auth_required")
        world.assert_refused(world.call("GET", "/bear/echo/e", [("X-Aegis-Agent", "aegis_not-a-token")]), 401,
                             "agent_auth_invalid")
        made_up = [f"svc-{uuid.uuid4().hex[:10]}" for _ in range(20)]
        for name in made_up:
            refused(world.call("GET", f"/{name}/x", agent="bot"), 403, "not_granted")

        ledger_rows = json.loads(world.aegis.ctl("ledger", "stats", "--json").ok().out)["rows"]
        scrape = Scrape(world)
        assert scrape.reply.header("Content-Type") == "text/plain; version=0.0.4; charset=utf-8"
        expected_types = {
            "aegis_requests": "counter", "aegis_requests_blocked": "counter",
            "aegis_request_duration_seconds": "histogram", "aegis_upstream_duration_seconds": "histogram",
            "aegis_credentials_total": "gauge", "aegis_vault_unlocked": "gauge",
            "aegis_ledger_queue_depth": "gauge", "aegis_ledger_commit_seconds": "gauge",
            "aegis_ledger_commits": "counter", "aegis_ledger_rows_committed": "counter",
            "aegis_ledger_commit_failures": "counter", "aegis_ledger_failing": "gauge",
            "aegis_webhook_queue_depth": "gauge", "aegis_webhook_retries_pending": "gauge",
            "aegis_webhook_delivered": "counter", "aegis_webhook_failed": "counter",
            "aegis_webhook_dropped": "counter",
        }
        for name, kind in expected_types.items():
            assert scrape.types.get(name) == kind, (name, scrape.types)

        for sample in scrape.named("aegis_requests_total"):
            assert set(sample.labels) == REQUEST_LABELS, sample
        for sample in scrape.named("aegis_requests_blocked_total"):
            assert set(sample.labels) == BLOCKED_LABELS, sample
        for name in ("aegis_request_duration_seconds_count", "aegis_upstream_duration_seconds_count"):
            assert scrape.named(name) and all(set(s.labels) == {"service"} for s in scrape.named(name))

        value = scrape.value
        assert value("aegis_requests_total", service="bear", method="GET", status="200", agent="bot") == 1
        assert value("aegis_requests_total", service="bear", method="POST", status="200", agent="bot") == 1
        assert value("aegis_requests_total", service="bear", method="OTHER", status="200", agent="bot") == 1
        assert value("aegis_requests_total", service="bear", method="GET", status="503", agent="bot") == 1
        # Refused before the grant check (no token, a bad one): the service is not named, as it is not to them.
        assert value("aegis_requests_total", service="unknown", method="GET", status="401", agent="") == 2
        assert value("aegis_requests_total", service="unknown", method="GET", status="403", agent="bot") == 20
        assert value("aegis_requests_blocked_total", service="unknown", reason="agent_auth_required", agent="") == 1
        assert value("aegis_requests_blocked_total", service="unknown", reason="agent_auth_invalid", agent="") == 1
        assert value("aegis_requests_blocked_total", service="unknown", reason="not_granted", agent="bot") == 20
        assert value("aegis_request_duration_seconds_count", service="bear") == 4
        assert value("aegis_upstream_duration_seconds_count", service="bear") == 4  # only forwarded requests
        buckets = {float(s.labels["le"]) for s in scrape.named("aegis_request_duration_seconds_bucket")}
        assert min(buckets) == 0.0005 and max(buckets - {float("inf")}) == 30.0
        assert value("aegis_vault_unlocked") == 1
        assert value("aegis_credentials_total", status="active") == 1
        assert value("aegis_credentials_total", status="expiring_soon") + value(
            "aegis_credentials_total", status="expired") == 2
        assert value("aegis_ledger_queue_depth") >= 0 and value("aegis_ledger_commit_seconds") > 0
        # This daemon wrote every row of its ledger, each in one commit with others or alone.
        assert value("aegis_ledger_rows_committed_total") == ledger_rows > 26  # the 26 requests above and system events
        assert 1 <= value("aegis_ledger_commits_total") <= ledger_rows
        assert value("aegis_ledger_commit_failures_total") == 0 and value("aegis_ledger_failing") == 0

        # Made-up service names, paths, query strings and tokens never become label values.
        assert scrape.label_values("service") <= {"bear", "unknown"}
        assert scrape.label_values("agent") <= {"bot", ""}
        assert scrape.label_values("method") <= {"GET", "POST", "OTHER"}
        for needle in (*made_up, "/echo", "query-value-1", token, SECRET):
            assert needle not in scrape.text

        # The 1-second credential expires: computed at scrape time, no request needed.
        deadline = time.monotonic() + 15
        while Scrape(world).value("aegis_credentials_total", status="expired") != 1:
            assert time.monotonic() < deadline, "the expired credential never showed as expired"
            time.sleep(0.2)
        assert Scrape(world).value("aegis_credentials_total", status="expiring_soon") == 1

        # OpenMetrics when the scraper asks for it.
        open_metrics = request(world.port, "GET", "/_aegis/metrics",
                               [("Accept", "application/openmetrics-text; version=1.0.0")])
        assert open_metrics.status == 200
        assert (open_metrics.header("Content-Type") or "").startswith("application/openmetrics-text")
        assert open_metrics.body.rstrip().endswith(b"# EOF")

        # Health and the unlocked gauge follow the vault, without authentication.
        health = request(world.port, "GET", "/_aegis/health")
        assert (health.status, health.json()) == (200, {"status": "ok", "vault": "unlocked", "ledger": "ok"})
        world.aegis.ctl("lock").ok()
        health = request(world.port, "GET", "/_aegis/health")
        assert (health.status, health.json()) == (200, {"status": "ok", "vault": "locked", "ledger": "ok"})
        locked = Scrape(world)
        assert locked.value("aegis_vault_unlocked") == 0
        # While locked nothing can be authenticated, so nothing is counted by its (unchecked) expiry.
        assert locked.value("aegis_credentials_total", status="unchecked") == 3
        assert locked.value("aegis_credentials_total", status="active") == 0
        refused(world.call("GET", "/bear/echo/f", agent="bot"), 503, "vault_locked")
        assert Scrape(world).value("aegis_requests_blocked_total", service="unknown", reason="vault_locked",
                                   agent="") == 1
        world.aegis.ctl("unlock", "--passphrase-stdin", input=PASSPHRASE + "\n").ok()
        assert request(world.port, "GET", "/_aegis/health").json()["vault"] == "unlocked"
        again = Scrape(world)
        assert again.value("aegis_vault_unlocked") == 1
        assert (again.value("aegis_credentials_total", status="active"),
                again.value("aegis_credentials_total", status="unchecked")) == (1, 0)
        world.assert_no_leaks()
    finally:
        world.close()


def test_an_accept_header_the_library_cannot_parse_gets_the_text_format() -> None:
    """prometheus_client raises on `version=abc`: that was a 500 and an ERROR line per request, no token needed."""
    world = ops_world()
    try:
        for accept in ("application/openmetrics-text; version=abc", "application/openmetrics-text; version=1.x"):
            reply = request(world.port, "GET", "/_aegis/metrics", [("Accept", accept)])
            assert reply.status == 200, (accept, reply.text())
            assert reply.header("Content-Type") == "text/plain; version=0.0.4; charset=utf-8"
            assert b"# TYPE aegis_vault_unlocked gauge" in reply.body
        time.sleep(0.3)
        log = world.aegis.log()
        assert "gate failed" not in log and "internal_error" not in log
        assert not [row for row in world.ledger() if row["reason"] == "internal_error"]
    finally:
        world.close()


def test_metrics_name_a_service_only_to_a_request_granted_it() -> None:
    """Without a token, or without a grant, probing service names and then scraping must not tell which exist."""
    world = ops_world()
    try:
        up = world.upstream()
        world.credential("prod-payments", SECRET, up.entry())
        world.credential("other", SOON_SECRET, up.entry())
        world.agent("bot", "other")
        world.agent("payer", "prod-payments")
        for guess in ("prod-payments", "prod-billing"):
            refused(world.call("GET", f"/{guess}/x"), 401, "agent_auth_required")  # no token
            refused(world.call("GET", f"/{guess}/x", agent="bot"), 403, "not_granted")  # no grant
        scrape = Scrape(world)
        assert "prod-payments" not in scrape.text
        assert scrape.value("aegis_requests_blocked_total", service="unknown", reason="agent_auth_required",
                            agent="") == 2
        assert scrape.value("aegis_requests_blocked_total", service="unknown", reason="not_granted", agent="bot") == 2
        # The agent that holds the grant is counted under the name.
        assert world.call("GET", "/prod-payments/echo", agent="payer").status == 200
        assert Scrape(world).value("aegis_requests_total", service="prod-payments", method="GET", status="200",
                                   agent="payer") == 1
        # The operator's log still says which service was tried.
        assert [line for line in world.aegis.log().splitlines() if "request refused" in line
                and "agent=bot service=prod-payments reason=not_granted" in line]
    finally:
        world.close()


def test_a_removed_agent_or_credential_leaves_no_series() -> None:
    """Found at the 29th stop: the series of removed agents and credentials stayed until a restart, so agents made
    per session or per CI job grew the scrape (3 KB each) and the daemon's memory for good."""
    world = ops_world()
    try:
        up = world.upstream()
        world.credential("kept", SECRET, up.entry())
        world.credential("gone", SOON_SECRET, up.entry())
        world.agent("stays", "kept", "gone")
        world.agent("leaves", "kept", "gone")
        for agent in ("stays", "leaves"):
            for service in ("kept", "gone"):
                assert world.call("GET", f"/{service}/echo", agent=agent).status == 200
            refused(world.call("GET", "/kept/x", [("X-Target-Host", "evil.example")], agent=agent), 403,
                    "domain_not_allowed")
        before = Scrape(world)
        assert {"stays", "leaves"} <= before.label_values("agent") and "gone" in before.label_values("service")
        world.aegis.ctl_in_process("agent", "remove", "leaves", "--yes").ok()
        world.aegis.ctl_in_process("vault", "remove", "gone", "--yes").ok()
        after = Scrape(world)  # no request in between: the scrape itself drops them
        assert "leaves" not in after.label_values("agent") and "gone" not in after.label_values("service")
        assert after.value("aegis_requests_total", service="kept", method="GET", status="200", agent="stays") == 1
        assert after.value("aegis_requests_blocked_total", service="kept", reason="domain_not_allowed",
                           agent="stays") == 1
        assert [s for s in after.named("aegis_request_duration_seconds_count") if s.labels["service"] == "kept"]
        world.assert_no_leaks()
    finally:
        world.close()


def test_metrics_and_health_can_be_turned_off() -> None:
    """Switched off, both answer 404 not_found and nothing else: a scraper or a probe keeps polling them, so each
    poll must not be recorded. From a cold review: a scrape of /_aegis/metrics switched off was refused as an
    unknown endpoint, with a ledger row, a `request refused` log line and a blocked_request alert every scrape,
    where /_aegis/health switched off had none. One tokenless request after the polls is the proof of absence:
    its alert arrives first (one worker: a webhook's deliveries arrive in the order raised), and it alone is
    recorded."""
    world = ops_world("[gate]\nmetrics = false\nhealth = false\n[webhooks]\nworkers = 1\n")
    receiver = Receiver().start()
    try:
        add_webhook(world, receiver, "blocked_request,agent_auth_failure")
        polls = [request(world.port, "GET", path) for path in ("/_aegis/metrics", "/_aegis/health") * 3]
        for reply in polls:
            assert reply.status == 404, reply.text()
            assert reply.error()["code"] == "not_found"
        refused(request(world.port, "GET", "/no/such/service"), 401, "agent_auth_required")
        first = receiver.wait_for(1)[0]
        assert first.verified and first.payload["details"]["reason"] == "agent_auth_required", first.payload
        rows = world.ledger()
        assert [row["reason"] for row in rows if row["kind"] == "request"] == ["agent_auth_required"], rows
        assert not {row["request_id"] for row in rows} & {reply.request_id for reply in polls}
        assert world.aegis.log().count("request refused") == 1
        world.assert_no_leaks([d.body.decode() for d in receiver.deliveries])
    finally:
        receiver.stop()
        world.close()


def test_a_bad_switch_stops_the_daemon_with_its_name(fresh: Aegis) -> None:
    config = fresh.root / "bad.toml"
    config.write_text('[gate]\nmetrics = "off"\n')
    fresh.start("--config", str(config), wait=False)
    assert fresh.proc is not None
    assert fresh.proc.wait(30) == 2
    assert "[gate] metrics must be true or false" in fresh.log()
