"""Webhook rules that need no daemon: URL checks, event names, the outcome → event mapping, signing."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from aegisd.errors import InvalidArgument
from aegisd.ledger import LedgerEntry
from aegisd.webhooks import EVENTS, events_for, expiry_state, signature
from aegisd.webhooks.events import parse_events
from aegisd.webhooks.registry import check_url, new_secret

DAY_MS = 86400 * 1000


@pytest.mark.parametrize(("url", "origin"), [
    ("https://hooks.example.com/services/T0/B0/XYZ", "https://hooks.example.com"),
    ("https://Hooks.Example.com:8443/x?y=1", "https://hooks.example.com:8443"),
    ("http://127.0.0.1:9000/hook", "http://127.0.0.1:9000"),
    ("http://localhost/hook", "http://localhost"),
    ("http://[::1]:9000/hook", "http://[::1]:9000"),
    ("https://10.0.0.5/internal", "https://10.0.0.5"),
    ("https://B\u00fccher.example/x", "https://xn--bcher-kva.example"),  # as it is sent
    ("https://" + "a" * 63 + ".example.com/x", "https://" + "a" * 63 + ".example.com"),
])
def test_accepted_urls_show_only_their_origin(url: str, origin: str) -> None:
    assert check_url(url) == origin


@pytest.mark.parametrize(("url", "needle"), [
    ("http://hooks.example.com/x", "only to loopback"),
    ("http://10.0.0.5/x", "only to loopback"),
    ("ftp://127.0.0.1/x", "must start with https://"),
    ("hooks.example.com/x", "must start with https://"),
    ("https:///x", "no host"),
    ("https://user:pw@hooks.example.com/x", "must not carry a user or password"),
    ("https://hooks.example.com/x#frag", "fragment"),
    ("https://hooks.example.com:99999/x", "malformed"),
    ("https://hooks.example.com/a b", "spaces or control characters"),
    ("https://hooks.example.com/" + "a" * 2100, "longer than"),
    ("http://localhost./x", "only to loopback"),  # fully qualified: glibc asks DNS, which may answer anything
    ("http://localhost.localdomain/x", "only to loopback"),
    # Every delivery would fail in getaddrinfo's IDNA codec (an error, not a failed attempt, before).
    ("https://hooks..example.com/x", "not a valid name"),
    ("https://" + "a" * 64 + ".example.com/x", "not a valid name"),
    ("https://.example.com/x", "not a valid name"),
])
def test_refused_urls_say_why(url: str, needle: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        check_url(url)
    assert needle in caught.value.message


@pytest.mark.parametrize(("url", "secret"), [
    ("https://hooks.slack.com:T0001SECRET/services/B0002/XXXX", "T0001SECRET"),  # a token pasted where a port goes
    ("https://alerts:hunter2\u2100pw@hooks.example.com/x", "hunter2"),  # NFKC: urllib quotes the whole netloc
    ("https://hooks.example.com:99999999/T0K3N", "99999999"),
    ("https://[::1/T0K3N", "T0K3N"),
    ("http://T0K3N.hooks.example.com/x", "T0K3N"),
    ("https://T0K3N@hooks.example.com/x", "T0K3N"),
    ("https://T0K3N..hooks.example.com/x", "T0K3N"),
])
def test_a_refusal_never_quotes_the_url(url: str, secret: str) -> None:
    """The URL is treated as a secret (Slack's and Discord's are): a refusal says what is wrong in fixed words,
    never with urllib's message, which quotes the port or the netloc, user:password included."""
    with pytest.raises(InvalidArgument) as caught:
        check_url(url)
    assert secret.lower() not in caught.value.message.lower(), caught.value.message


@pytest.mark.parametrize(("url", "origin"), [
    # An ideographic full stop is a dot to IDNA: shown as urllib read it, this went to evil.com looking like Slack.
    ("https://hooks.slack.com\u3002evil.com/x", "https://hooks.slack.com.evil.com"),
    ("https://h\u043e\u043eks.slack.com/x", "https://xn--hks-seda.slack.com"),  # Cyrillic o's: not Slack
    ("https://\uff28ooks.example.com/x", "https://hooks.example.com"),  # a fullwidth H maps to h
    ("http://LOCALHOST:9000/x", "http://localhost:9000"),
])
def test_the_origin_shows_the_host_a_delivery_is_sent_to(url: str, origin: str) -> None:
    """The origin is all an operator sees of a webhook: it is the A-label (ASCII) host that aiohttp connects to,
    never urllib's Unicode reading of the URL, which showed another host than the one alerts went to."""
    from yarl import URL

    assert check_url(url) == origin
    assert origin.partition("://")[2].partition(":")[0] == URL(url).raw_host


@pytest.mark.parametrize("url", ["http://[::1%25lo]:9000/hook", "http://[fe80::1%25eth0]:9000/hook",
                                 "https://[fe80::1%eth0]/hook", "http://loc%61lhost:9000/hook",
                                 "https://hooks.ex%61mple.com/hook"])
def test_a_percent_in_the_host_is_refused(url: str) -> None:
    """An IPv6 zone id passed the check and then failed every delivery; an escape in a name is not what is sent."""
    with pytest.raises(InvalidArgument, match="must not hold '%'"):
        check_url(url)


@pytest.mark.parametrize(("url", "gate"), [
    ("http://127.0.0.1:3100/svc/x", ("127.0.0.1", 3100)),
    ("http://localhost:3100/svc/x", ("127.0.0.1", 3100)),
    ("https://127.0.0.1:3100/svc/x", ("127.0.0.1", 3100)),
    ("https://0.0.0.0:3100/svc/x", ("127.0.0.1", 3100)),  # the kernel connects 0.0.0.0 to loopback
    ("https://127.1:3100/svc/x", ("127.0.0.1", 3100)),  # getaddrinfo reads IPv4's short forms
    ("https://2130706433:3100/svc/x", ("127.0.0.1", 3100)),
    ("https://[::ffff:127.0.0.1]:3100/svc/x", ("127.0.0.1", 3100)),
    ("http://127.0.0.1:3100/svc/x", ("localhost", 3100)),
    ("http://localhost:3100/svc/x", ("localhost", 3100)),
    ("http://[::1]:3100/svc/x", ("::1", 3100)),
    ("http://localhost:3100/svc/x", ("::1", 3100)),
    ("http://127.0.0.9:3100/svc/x", ("0.0.0.0", 3100)),
    ("http://localhost:3100/svc/x", ("0.0.0.0", 3100)),
    ("http://[::1]:3100/svc/x", ("::", 3100)),
    ("http://127.0.0.1:80/svc/x", ("127.0.0.1", 80)),
    ("http://127.0.0.1/svc/x", ("127.0.0.1", 80)),  # the scheme's port
    ("https://gate.example.com/svc/x", ("gate.example.com", 443)),
    ("https://192.0.2.7:3100/svc/x", ("192.0.2.7", 3100)),
])
def test_a_webhook_to_the_gate_itself_is_refused(url: str, gate: tuple[str, int]) -> None:
    """Each delivery to the gate is a refused request without a token, which raises another alert: one request
    became hundreds of ledger rows a second. Every address a delivery would reach the gate's listener by counts."""
    with pytest.raises(InvalidArgument, match="points at aegisd's own gate"):
        check_url(url, gate)


@pytest.mark.parametrize(("url", "gate"), [
    ("http://127.0.0.1:3101/hook", ("127.0.0.1", 3100)),
    ("http://127.0.0.2:3100/hook", ("127.0.0.1", 3100)),  # another address: the gate's listener is not there
    ("http://[::1]:3100/hook", ("127.0.0.1", 3100)),
    ("http://127.0.0.1:3100/hook", ("::1", 3100)),
    ("http://[::1]:3100/hook", ("0.0.0.0", 3100)),
    ("http://127.0.0.1:3100/hook", ("::", 3100)),  # the gate's :: socket is IPv6-only (found by a review)
    ("https://hooks.example.com/hook", ("0.0.0.0", 443)),
])
def test_a_webhook_beside_the_gate_is_accepted(url: str, gate: tuple[str, int]) -> None:
    check_url(url, gate)


def test_event_names_are_validated_and_ordered() -> None:
    assert parse_events(["rate_limited", " blocked_request", "rate_limited"]) == ("blocked_request", "rate_limited")
    assert parse_events(EVENTS) == EVENTS
    with pytest.raises(InvalidArgument, match="unknown webhook event 'blocked'"):
        parse_events(["blocked", "rate_limited"])
    with pytest.raises(InvalidArgument, match="at least one event"):
        parse_events([" ", ""])


def _denied(reason: str) -> LedgerEntry:
    return LedgerEntry(kind="request", decision="denied", reason=reason, status=403)


@pytest.mark.parametrize(("entry", "events"), [
    (_denied("agent_auth_required"), ("agent_auth_failure",)),
    (_denied("agent_auth_invalid"), ("agent_auth_failure",)),
    (_denied("rate_limited"), ("rate_limited",)),
    (_denied("body_inspection"), ("body_inspection",)),
    (_denied("not_granted"), ("blocked_request",)),
    (_denied("domain_not_allowed"), ("blocked_request",)),
    (_denied("credential_expired"), ("blocked_request", "credential_expiry")),
    (_denied("upstream_error"), ()),
    (_denied("upstream_timeout"), ()),
    (_denied("shutting_down"), ()),
    (LedgerEntry(kind="request", decision="allowed", status=200), ()),
    (LedgerEntry(kind="request", decision="allowed", status=200, flags="response_redacted"), ("response_redacted",)),
    (LedgerEntry(kind="request", decision="allowed", status=200, flags="body_inspection_warn,response_redacted"),
     ("body_inspection", "response_redacted")),
])
def test_outcomes_map_to_events(entry: LedgerEntry, events: tuple[str, ...]) -> None:
    assert events_for(entry) == events


def test_expiry_states_use_a_seven_day_window() -> None:
    now = 1_700_000_000_000
    assert expiry_state(None, now) == "active"
    assert expiry_state(now + 8 * DAY_MS, now) == "active"
    assert expiry_state(now + 7 * DAY_MS, now) == "expiring_soon"
    assert expiry_state(now + 1, now) == "expiring_soon"
    assert expiry_state(now, now) == "expired"
    assert expiry_state(now - DAY_MS, now) == "expired"


def test_signature_is_hmac_sha256_of_the_exact_body() -> None:
    secret = new_secret()
    assert secret.startswith("whsec_") and len(secret) > 40
    assert new_secret() != secret
    body = b'{"event":"test","id":"1"}'
    expected = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    assert signature(secret.encode(), body) == expected
    assert signature(secret.encode(), body + b" ") != expected
