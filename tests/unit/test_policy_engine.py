"""The policy engine and the limiters at exact instants: windows across midnight and DST, first-match
rules, GCRA's remaining and wait values, and check-all-then-consume across several quotas."""

from __future__ import annotations

import random
from datetime import UTC, datetime
from pathlib import Path
from typing import cast

import pytest

from aegisd.config import ConfigError, load_config
from aegisd.gate.admission import GateLimits
from aegisd.gate.pipeline import Admission, Exchange
from aegisd.gate.refusal import Refusal
from aegisd.gate.routing import AgentEntry, Route, RoutingTable, build_route
from aegisd.limits import Quota, RateLimiter
from aegisd.policy import Verdict, compile_set, parse_policy
from aegisd.rates import Rate
from aegisd.vault.credentials import Credential

NS = 1_000_000_000


def at(text: str) -> int:
    return int(datetime.fromisoformat(text).astimezone(UTC).timestamp() * 1000)


POLICY = b"""\
agent: bot
rules:
  - service: night
    time_window: {start: "22:00", end: "06:00", timezone: Europe/Berlin}
  - service: day
    methods: [GET]
    paths: ["/a/.*"]
    rate_limit: 3/min
  - service: day
    paths: ["/a/b"]
"""


def test_windows_span_midnight_in_local_time_across_dst() -> None:
    policies = compile_set([parse_policy("bot.yaml", POLICY)])

    def judge(when: str) -> bool:
        verdict = policies.judge("bot", "night", "GET", "/", at(when))
        assert verdict is not None
        return verdict.allowed

    # Winter (UTC+1) and summer (UTC+2): the window follows Berlin's wall clock.
    assert judge("2030-01-15T21:00:00+00:00")  # 22:00 Berlin: start is inclusive
    assert not judge("2030-01-15T20:59:00+00:00")
    assert judge("2030-01-16T04:59:00+00:00")  # 05:59 Berlin
    assert not judge("2030-01-16T05:00:00+00:00")  # 06:00 Berlin: end is exclusive
    assert judge("2030-07-15T20:00:00+00:00")  # 22:00 Berlin summer time
    assert not judge("2030-07-15T19:59:00+00:00")
    assert judge("2030-03-31T00:30:00+00:00")  # the night the clocks go forward


def test_first_allowing_rule_decides_and_paths_are_anchored() -> None:
    policies = compile_set([parse_policy("bot.yaml", POLICY)])
    now = at("2030-01-01T12:00:00+00:00")
    first = policies.judge("bot", "day", "GET", "/a/b", now)
    assert first is not None and first.allowed and first.rule is not None and first.rule.index == 1
    second = policies.judge("bot", "day", "POST", "/a/b", now)
    assert second is not None and second.allowed and second.rule is not None and second.rule.index == 2
    for path in ("/x/a/b", "/a", "/a/b/"):
        verdict = policies.judge("bot", "day", "POST", path, now)
        assert verdict is not None and not verdict.allowed and verdict.miss == "path"
    assert policies.judge("someone-else", "day", "GET", "/x", now) is None


def test_gcra_exact_remaining_and_wait() -> None:
    limiter = RateLimiter(clock=lambda: 0)
    quota = Quota("credential", "c1", Rate(3, 60))
    seen = []
    for _ in range(4):
        standing = limiter.standing(quota, 0)
        seen.append((standing.allowed, standing.remaining, standing.wait_ns))
        if standing.allowed:
            limiter.consume(quota, 0)
    assert seen == [(True, 3, 0), (True, 2, 20 * NS), (True, 1, 20 * NS), (False, 0, 20 * NS)]
    # One unit returns every 20 s, continuously.
    assert limiter.standing(quota, 20 * NS).remaining == 1
    assert limiter.standing(quota, 30 * NS).wait_ns == 10 * NS
    assert limiter.standing(quota, 60 * NS).remaining == 3


def test_a_refusal_consumes_no_quota() -> None:
    clock = [0]
    limits = GateLimits(max_concurrency=10, clock=lambda: clock[0])
    agent = AgentEntry("agent-id", "bot", frozenset({"c1", "c2"}), "3/min")

    def route(name: str, rate_limit: str) -> Route:
        cred = Credential(id=name, name=name, service=name, domains=["https://api.example.com"],
                          rate_limit=rate_limit)
        return build_route(cred, b"not-a-real-secret")

    tight, loose = route("c1", "1/min"), route("c2", "")
    admitted = [Exchange("GET") for _ in range(3)]
    limits.admit(admitted[0], agent, tight, None)
    for _ in range(5):
        with pytest.raises(Refusal) as refused:
            limits.admit(Exchange("GET"), agent, tight, None)
        assert refused.value.status == 429 and refused.value.headers["Retry-After"] == "60"
    for x in admitted[1:]:  # the agent's 3/min still has two left: the five refusals took nothing
        limits.admit(x, agent, loose, None)
    with pytest.raises(Refusal) as refused:
        limits.admit(Exchange("GET"), agent, loose, None)
    assert refused.value.headers["RateLimit"] == '"agent";r=0;t=20, "concurrency";r=7'
    for x in admitted:
        limits.release(x.request_id)
    limits.release("never-admitted")
    assert limits.concurrency.available("agent-id") == 10


def test_refund_gives_back_exactly_what_the_request_consumed() -> None:
    limits = GateLimits(max_concurrency=10, clock=lambda: 0)
    agent = AgentEntry("agent-id", "bot", frozenset({"c1"}), "2/min")
    cred = Credential(id="c1", name="c1", service="c1", domains=["https://api.example.com"], rate_limit="1/min")
    route = build_route(cred, b"not-a-real-secret")
    first = Exchange("POST")
    limits.admit(first, agent, route, None)
    limits.refund(first.request_id)  # refused by a later step: as if it never came
    limits.refund(first.request_id)  # a second refund gives nothing more back
    limits.release(first.request_id)
    second = Exchange("POST")
    limits.admit(second, agent, route, None)  # the credential's 1/min is whole again
    with pytest.raises(Refusal) as refused:
        limits.admit(Exchange("POST"), agent, route, None)
    assert refused.value.headers["RateLimit"].startswith('"credential";r=0')


def test_a_refund_gives_back_only_what_time_has_not_restored() -> None:
    """Ten requests held open under 10/hour: an hour later their units are back by time, so refunding them then
    gives nothing; half an hour later half of each stacked unit's debt is left, and that is what comes back."""
    clock = [0]
    limits = GateLimits(max_concurrency=64, clock=lambda: clock[0])
    agent = AgentEntry("agent-id", "bot", frozenset(), "10/hour")

    def admitted(count: int) -> list[Exchange]:
        passed = []
        for _ in range(count):
            x = Exchange("POST")
            try:
                limits.admit(x, agent, None, None)
            except Refusal:
                continue
            passed.append(x)
        return passed

    held = admitted(11)
    assert len(held) == 10
    clock[0] += 3600 * NS
    assert len(admitted(20)) == 10  # the whole burst is back by time
    for x in held:
        limits.refund(x.request_id)
        limits.release(x.request_id)
    assert admitted(20) == []  # the refunds gave back nothing time had not already restored

    clock[0] += 3600 * NS  # now: ten held again, five units' time passes, all refunded
    held = admitted(10)
    clock[0] += 1800 * NS
    assert admitted(1) and len(held) == 10  # one of the five units time restored
    for x in held:
        limits.refund(x.request_id)
    assert len(admitted(20)) == 9  # the burst less the one just taken


def test_refunds_of_earlier_requests_do_not_let_later_held_ones_bank_quota() -> None:
    """A cold review of the first fix: five decoys and five held requests under 10/hour; the decoys hang up at
    once (their whole units come back), half an hour passes (five units' time), the agent spends what it has,
    then hangs up the held ones. Their units moved down when the decoys' came back, so time has restored them
    and they give nothing back: ten at that instant, not fifteen."""
    clock = [0]
    limits = GateLimits(max_concurrency=16, clock=lambda: clock[0])
    agent = AgentEntry("agent-id", "bot", frozenset(), "10/hour")

    def admit() -> Exchange | None:
        x = Exchange("POST")
        try:
            limits.admit(x, agent, None, None)
        except Refusal:
            return None
        return x

    def hang_up(x: Exchange) -> None:
        limits.refund(x.request_id)
        limits.release(x.request_id)

    decoys, held = [admit() for _ in range(5)], [admit() for _ in range(5)]
    for x in decoys:
        assert x is not None
        hang_up(x)
    clock[0] += 1800 * NS
    forwarded = 0
    while (x := admit()) is not None:
        limits.release(x.request_id)
        forwarded += 1
    for x in held:
        assert x is not None
        hang_up(x)
    while (x := admit()) is not None:
        limits.release(x.request_id)
        forwarded += 1
    assert forwarded == 10


def _forwarded_at_the_end_of_a_random_history(rng: random.Random) -> int:
    """Requests held open, hung up, answered and time passing at random under 5/min; then every held one
    hangs up and the agent sends all it can: how many it forwarded at that last instant."""
    clock = [0]
    limits = GateLimits(max_concurrency=64, clock=lambda: clock[0])
    agent = AgentEntry("agent-id", "bot", frozenset(), "5/min")
    held: list[tuple[Exchange, int]] = []
    forwarded_at: list[int] = []

    def admit() -> Exchange | None:
        x = Exchange("GET")
        try:
            limits.admit(x, agent, None, None)
        except Refusal:
            return None
        return x

    for _ in range(60):
        roll = rng.random()
        if roll < 0.4:
            if (x := admit()) is not None:
                held.append((x, clock[0]))
        elif roll < 0.6 and held:
            x, _ = held.pop(rng.randrange(len(held)))
            limits.refund(x.request_id)
            limits.release(x.request_id)
        elif roll < 0.75 and held:
            x, at = held.pop(rng.randrange(len(held)))
            limits.release(x.request_id)
            forwarded_at.append(at)
        else:
            clock[0] += rng.randrange(0, 40) * NS
    for x, _ in held:
        limits.refund(x.request_id)
        limits.release(x.request_id)
    now_forwarded = forwarded_at.count(clock[0])
    while (x := admit()) is not None:
        limits.release(x.request_id)
        now_forwarded += 1
    return now_forwarded


def test_no_history_of_holds_refunds_and_time_gives_more_than_the_burst_at_one_instant() -> None:
    """Whatever an agent did before, at one instant it can forward at most the burst, counting those it had
    forwarded at that instant already."""
    rng = random.Random(0)  # the first fix's flaw shows in about one history in a thousand here
    assert max(_forwarded_at_the_end_of_a_random_history(rng) for _ in range(2000)) == 5


def test_policy_settings_from_flag_env_and_config_file(tmp_path: Path) -> None:
    config = tmp_path / "aegisd.toml"
    config.write_text('[policy]\ndir = "/etc/aegis/policies"\n\n[gate]\nagent_max_concurrency = 8\n')
    from_file = load_config({"config": str(config)}, env={})
    assert from_file.policies_dir == Path("/etc/aegis/policies") and from_file.agent_max_concurrency == 8
    from_env = load_config({"config": str(config)}, env={"AEGIS_POLICIES_DIR": "/srv/policies"})
    assert from_env.policies_dir == Path("/srv/policies")
    from_flag = load_config({"config": str(config), "policies_dir": "/opt/p"}, env={"AEGIS_POLICIES_DIR": "/srv"})
    assert from_flag.policies_dir == Path("/opt/p")
    defaults = load_config({}, env={})
    assert defaults.policies_dir is None and defaults.agent_max_concurrency == 64
    config.write_text("[gate]\nagent_max_concurrency = 0\n")
    with pytest.raises(ConfigError, match="agent_max_concurrency"):
        load_config({"config": str(config)}, env={})
    config.write_text("[policy]\nfolder = 'x'\n")
    with pytest.raises(ConfigError, match=r"unknown setting \[policy\] folder"):
        load_config({"config": str(config)}, env={})


def test_an_admission_stops_holding_when_its_window_closes_or_its_credential_expires() -> None:
    """What the gate asks before forwarding a request whose body took time: the clock alone can end a judgement
    (the allowing rule's window closed, the credential expired), and only then is the request judged again."""
    policies = compile_set([parse_policy("bot.yaml", POLICY)])
    night = policies.judge("bot", "night", "GET", "/", at("2030-01-16T04:59:00+00:00"))  # 05:59 Berlin
    day = policies.judge("bot", "day", "GET", "/a/b", at("2030-01-16T04:59:00+00:00"))
    assert night is not None and night.allowed and day is not None and day.allowed
    secret = b"not-a-real-secret"
    lasting = build_route(Credential(id="c", name="c", service="svc", domains=["https://api.example.com"]), secret)
    expiring = build_route(Credential(id="e", name="e", service="svc2", domains=["https://api.example.com"],
                                      expires_at=at("2030-01-16T05:00:30+00:00")), secret)

    def admission(route: Route, verdict: Verdict | None) -> Admission:
        entry = route.default_entry
        assert entry is not None
        return Admission(cast(RoutingTable, None), policies, AgentEntry("a", "bot", frozenset(), ""), route, entry,
                         entry.host, entry.port, verdict, True)

    assert admission(lasting, night).still_holds_at(at("2030-01-16T04:59:59+00:00"))
    assert not admission(lasting, night).still_holds_at(at("2030-01-16T05:00:00+00:00"))  # 06:00 Berlin
    assert admission(lasting, day).still_holds_at(at("2030-01-16T05:00:00+00:00"))  # no window on that rule
    assert admission(expiring, None).still_holds_at(at("2030-01-16T05:00:29+00:00"))
    assert not admission(expiring, None).still_holds_at(at("2030-01-16T05:00:30+00:00"))
