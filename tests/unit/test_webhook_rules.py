"""Webhook rules that need no daemon: URL checks, event names, the outcome → event mapping, signing."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import socket

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
    ("https://127.0.0.1:0/x", "port is 0"),  # no receiver listens there: every delivery would fail
    ("http://localhost:00/x", "port is 0"),
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


def test_a_lookup_for_a_delivery_hands_out_no_address_of_the_gate() -> None:
    """From a cold review: only `webhook add` looked at the host, and only at an address or `localhost`, so a name
    resolving to the gate (an /etc/hosts alias, DNS rebinding) was delivered to it, each refusal there raising
    another alert without end. The lookup each delivery connects by drops the gate's addresses, at the URL's port
    only, and fails with the fixed PointsAtGate when none is left. `localhost` is looked up for real (IPv4 only, so
    that the answer is 127.0.0.1 on every machine)."""
    from aegisd.webhooks.resolver import GATE_REFUSAL, PointsAtGate, PooledResolver

    async def resolve(gate: tuple[str, int], port: int) -> list[str]:
        resolver = PooledResolver(gate)
        try:
            return [found["host"] for found in await resolver.resolve("localhost", port, socket.AF_INET)]
        finally:
            await resolver.close()

    with pytest.raises(PointsAtGate) as refused:
        asyncio.run(resolve(("127.0.0.1", 3100), 3100))
    assert str(refused.value) == GATE_REFUSAL == "points at aegisd's gate"
    with pytest.raises(PointsAtGate):
        asyncio.run(resolve(("0.0.0.0", 3100), 3100))  # a gate on every IPv4 address, loopback too
    assert asyncio.run(resolve(("127.0.0.1", 3100), 3101)) == ["127.0.0.1"]  # another port: not the gate
    assert asyncio.run(resolve(("::1", 3100), 3100)) == ["127.0.0.1"]  # another address: not the gate


def test_webhook_add_looks_the_host_up_to_refuse_one_at_the_gate() -> None:
    """`webhook add` resolves a name once, so that one leading to the gate is refused with a clear message rather
    than failing every delivery. The gate is put on the address this machine's own name resolves to, looked up
    for real (no name is made up or mocked); an address or `localhost` is check_url's to judge, not looked up."""
    from aegisd.webhooks.registry import resolves_to_gate

    name = socket.gethostname()
    try:
        address = str(socket.getaddrinfo(name, 443, type=socket.SOCK_STREAM)[0][4][0])
    except OSError:
        pytest.skip(f"this machine's name {name!r} does not resolve")
    assert resolves_to_gate(f"https://{name}/x", (address, 443))  # https's port, as deliveries use it
    assert resolves_to_gate(f"https://{name.upper()}:8443/x", (address, 8443))
    assert not resolves_to_gate(f"https://{name}:8443/x", (address, 443))  # another port
    assert not resolves_to_gate("https://localhost/x", ("127.0.0.1", 443))  # check_url's (it refuses this one)
