"""Steps 6 and 7 of the pipeline: the agent's policy, then its rate limits and concurrency cap.

Kept beside the pipeline so it reads as one line per step. Every limit is checked before any is
consumed, in one synchronous call (no await in between), so a refused request uses no quota.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import replace
from typing import Protocol
from urllib.parse import unquote

from aegisd.gate.refusal import Refusal
from aegisd.gate.routing import AgentEntry, Route
from aegisd.limits import ConcurrencyLimiter, Quota, RateLimiter, Standing, Unit
from aegisd.limits.gcra import LIMITS_CLOCK
from aegisd.limits.headers import policy_names, ratelimit_headers, retry_after
from aegisd.policy import PolicySet, Verdict
from aegisd.policy.policy_set import INVALID, TOO_LONG
from aegisd.rates import RateError, parse_rate

WOULD_DENY = "would_deny"
_SEGMENT_PARAMETERS = re.compile(r";[^/]*")  # a segment's `;` parameters, up to the next `/`
_MAX_QUOTAS = 10_000  # cached credential and agent quotas; past this the cache starts afresh


class Noted(Protocol):
    """What these steps write on the request's ledger row (the pipeline's Exchange)."""

    request_id: str
    judged_ms: int  # the moment the request is judged at (its arrival, or a re-judgement's)
    reason: str
    flags: str


def add_flag(x: Noted, flag: str) -> None:
    x.flags = f"{x.flags},{flag}" if x.flags else flag


def judge(policies: PolicySet, agent: str, service: str, method: str, raw_path: str, now_ms: int) -> Verdict | None:
    """The policies' verdict on a request whose path after the service is `raw_path`, as front_door.split_target
    gives it (still percent-encoded). Shared with `aegisctl policy test`, so that it answers as the gate does.

    A path with `;` parameters in a segment is allowed only if it is without them too: Java servlet containers
    (Tomcat, Jetty, Spring) drop them before they route, so `/files/secret.pdf;.txt` is `/files/secret.pdf` there
    while a pattern ending in `[.]txt` matched it. An encoded `%3B` is not dropped, so only a raw `;` counts."""
    verdict = policies.judge(agent, service, method, unquote(raw_path), now_ms)
    if verdict is None or not verdict.allowed or ";" not in raw_path:
        return verdict
    bare = policies.judge(agent, service, method, unquote(_SEGMENT_PARAMETERS.sub("", raw_path)), now_ms)
    if bare is None:
        return verdict
    if bare.allowed:  # held to both rules' limits and windows: each form is what some upstream serves
        return replace(verdict, also=bare.rule)
    return replace(bare, detail=f"{bare.detail}; a path with ';' parameters is judged without them too, as Java "
                   "servlet upstreams route it")


def check_policy(policies: PolicySet, x: Noted, agent: AgentEntry, service: str, method: str,
                 raw_path: str) -> Verdict | None:
    """Step 6's policy half: refuse in enforce mode; in dry-run mode forward, noting `would_deny`."""
    if not policies.fail_all and agent.name not in policies.agents:
        return None  # the common case, kept to one dict lookup: no policy names this agent
    verdict = judge(policies, agent.name, service, method, raw_path, x.judged_ms)
    if verdict is None or verdict.allowed:
        return verdict
    add_flag(x, f"policy={verdict.flag}")
    if verdict.miss == INVALID:
        raise Refusal(403, "policy_invalid", verdict.detail)
    if verdict.mode == "enforce" and verdict.miss == TOO_LONG:  # refused unjudged: matching it could stall the gate
        raise Refusal(414, "path_too_long", verdict.detail)
    if verdict.mode == "enforce":
        raise Refusal(403, "policy_denied", verdict.detail)
    x.reason = WOULD_DENY
    return verdict


class GateLimits:
    """Step 7: per-credential, per-agent and per-rule rates, and the per-agent concurrency cap."""

    def __init__(self, max_concurrency: int, clock: Callable[[], int] = LIMITS_CLOCK) -> None:
        self.rates = RateLimiter(clock)
        self.concurrency = ConcurrencyLimiter(max_concurrency)
        self._quotas: dict[tuple[str, str, str], Quota] = {}
        self._consumed: dict[str, list[Unit]] = {}  # per request in flight, for refund() and release()

    def admit(self, x: Noted, agent: AgentEntry, route: Route | None, verdict: Verdict | None) -> None:
        """Admit the request against every limit at once, or refuse it (429) consuming nothing. Without a route
        (the gate's own /_aegis/services) only the agent's limit and its concurrency cap apply."""
        quotas = []
        if route is not None and route.rate_limit:
            quotas.append(self._quota("credential", route.credential_id, route.rate_limit, route.name))
        if agent.rate_limit:
            quotas.append(self._quota("agent", agent.id, agent.rate_limit, agent.name))
        for rule in verdict.allowing if verdict is not None else ():
            if rule.rate is not None:
                quotas.append(Quota("rule", rule.ref, rule.rate, enforced=verdict is not None and
                                    verdict.mode == "enforce"))
        rates = self.rates
        now = rates.clock()
        standings = [rates.standing(q, now) for q in quotas]
        slots = self.concurrency.available(agent.id)
        refused = [s for s in standings if not s.allowed and s.quota.enforced]
        if refused or slots <= 0:
            self._refuse(x, [s for s in standings if s.quota.enforced], refused, slots)
        consumed = []
        for standing in standings:
            if standing.allowed:
                consumed.append(rates.consume(standing.quota, now))
            else:  # a dry-run rule's limit: forwarded, and the ledger row says it would have been refused
                x.reason = WOULD_DENY
                add_flag(x, f"rate_limit=rule@{standing.quota.key}".replace(",", "_"))
        if consumed:
            self._consumed[x.request_id] = consumed
        self.concurrency.acquire(x.request_id, agent.id)

    def readmit(self, x: Noted, agent: AgentEntry, route: Route, verdict: Verdict | None) -> None:
        """Judged again (the vault or the policies changed while its body arrived): what the old judgement took
        is given back and the request admitted as if it came now, or refused (429) holding nothing."""
        self.refund(x.request_id)
        self.release(x.request_id)
        self.admit(x, agent, route, verdict)

    def refund(self, request_id: str) -> None:
        """The request ended before it was forwarded (a later step refused it, a bug, a stop): give its quota
        back, so a refused request uses none. Consuming first and refunding keeps the limit exact under
        concurrency, where checking now and consuming after an await would not."""
        consumed = self._consumed.pop(request_id, ())
        if consumed:
            now = self.rates.clock()
            for unit in consumed:
                self.rates.refund(unit, now)

    def release(self, request_id: str) -> None:
        """The request is over (answered, refused or failed): free its concurrency slot."""
        for unit in self._consumed.pop(request_id, ()):
            self.rates.settle(unit)
        self.concurrency.release(request_id)

    def _refuse(self, x: Noted, shown: list[Standing], refused: list[Standing], slots: int) -> None:
        shown_as = {id(s): name for name, s in zip(policy_names(shown), shown, strict=True)}  # refused are of shown
        names = [shown_as[id(s)] for s in refused] + (["concurrency"] if slots <= 0 else [])
        add_flag(x, "rate_limit=" + "+".join(names))
        wait = retry_after(refused, slots <= 0)
        headers = ratelimit_headers(shown, (self.concurrency.limit, slots))
        headers["Retry-After"] = str(wait)
        what = ", ".join(_describe(s) for s in refused)
        if slots <= 0:
            what = ", ".join(filter(None, (what, f"the agent already has {self.concurrency.limit} requests in "
                                                 "flight")))
        raise Refusal(429, "rate_limited", f"rate limit reached: {what}; retry after {wait} s", headers=headers)

    def _quota(self, owner: str, key: str, text: str, name: str) -> Quota:
        """The credential's or agent's quota, parsed and built once rather than on every request; the stored
        text is part of the cache key, so a changed limit applies from the next request."""
        cache_key = (owner, key, text)
        quota = self._quotas.get(cache_key)
        if quota is None:
            try:
                rate = parse_rate(text)
            except RateError:  # validated when set, so the store was edited behind our back: never fail open
                raise Refusal(500, "rate_limit_invalid", f"the stored rate limit of {owner} {name!r} is malformed; "
                              "an operator must set it again") from None
            if len(self._quotas) >= _MAX_QUOTAS:  # removed credentials and agents leave entries behind
                self._quotas.clear()
            quota = self._quotas[cache_key] = Quota(owner, key, rate)
        return quota


def _describe(standing: Standing) -> str:
    quota = standing.quota
    return f"{quota.name} limit {quota.rate}" + (f" ({quota.key})" if quota.name == "rule" else "")
