"""How many refusals get a ledger row each: a budget per agent, and one for requests that name none.

Anyone who can reach the gate can send requests without a token, and an agent can send requests that are
refused before its rate limit (not_granted, say) or that its rate limit refuses (429 consumes no quota):
each refusal writes a row, and an unbounded stream of them would fill the disk, and a full disk stops
every agent (503 ledger_unavailable). So each agent, and all requests that name no agent together, have
a budget of rows for their refusals: a burst, then a steady rate. Past it, such refusals are counted
instead, and one system row per agent (or for the tokenless ones) records how many, and for which
reasons, went unrecorded one by one; they get no log line of their own either, and a tokenless one no
webhook event (outcomes.py). Each of an agent's ALARMS draws on a budget of its own, so that cheap
refusals, or a flood of another alarm, cannot spend it. Allowed requests, and refused ones that were
forwarded, never ask: each keeps its row.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from aegisd.ledger import LedgerEntry, LedgerError

log = logging.getLogger("aegisd.gate")

RATE_PER_SECOND = 10.0  # rows a second for refusals of unauthenticated requests, once the burst is spent (at 100, a
# steady flood from any local process grew the ledger by some 2 GB a day; at 10, with the summary rows, some 0.2 GB)
BURST = 500
AGENT_RATE_PER_SECOND = 50.0  # rows a second for one agent's refusals, once its burst is spent
AGENT_BURST = 500
# Refusals of what an attacker steering the agent would try (moving a secret out in a body, or in one the gate
# cannot read; reaching a host off the allowlist, or one the allowlist names that resolves only to internal
# addresses, or a host too vague to pick an entry by; overriding the judged method; a method or path its policy or
# the credential's scopes forbid, or a path too long to judge) have a budget each, so that a flood of cheap
# refusals (not_granted, 429), or of one of these (domain_not_allowed costs no body), cannot spend another's and
# keep that attempt out of the ledger. An X-Target-Host the gate cannot read (`a.com@evil.com`) is refused
# bad_request, a code shared with cheap refusals: its row draws on domain_not_allowed's budget (Exchange.alarm).
# policy_invalid is not one: it refuses every request alike, whatever is tried.
ALARMS = frozenset({"body_inspection", "body_not_inspectable", "domain_not_allowed", "address_not_allowed",
                    "target_host_ambiguous", "override_not_allowed", "policy_denied", "scope_denied",
                    "path_too_long"})
ALARM_RATE_PER_SECOND = 10.0
ALARM_BURST = 200
SUMMARY_AFTER_SECONDS = 1.0  # the summary row follows the first refusal left out by this long
PRUNE_AT = 64  # budgets held before idle ones (full again, nothing left out) are dropped


class _Budget:
    """One agent's bucket (or the tokenless requests'), and the refusals it left out since its last summary."""

    __slots__ = ("at", "left_out", "reasons", "since", "timer", "tokens")

    def __init__(self, tokens: float, at: float) -> None:
        self.tokens, self.at = tokens, at
        self.left_out = 0
        self.since = 0.0
        self.reasons: dict[str, int] = {}
        self.timer: asyncio.TimerHandle | None = None


class RefusalRows:
    """Token buckets over the rows of refusals, one per agent named ("" for requests that name none), and the
    summary of those left out. Only a refusal asks: one dict lookup and a little arithmetic."""

    def __init__(self, record: Callable[[LedgerEntry], None], rate: float = RATE_PER_SECOND,
                 burst: int = BURST) -> None:
        self._record = record  # LedgerWriter.append_nowait: the summary is a system row nobody waits on
        self._rate, self._burst = rate, float(burst)
        # By agent name: a name comes only from a valid token, so there are as many as agents that refuse;
        # idle ones are dropped as new ones come (a dropped budget is a full one, so nothing changes).
        self._budgets: dict[str, _Budget] = {}
        self._prune_at = PRUNE_AT

    def admit(self, agent: str = "", reason: str = "") -> bool:
        """Whether this refusal gets its row; if not, it is counted for its agent's next summary row."""
        now = time.monotonic()
        budget = self._budgets.get(agent)
        if budget is None:
            budget = self._add(agent, now)
        budget.tokens = min(self._burst, budget.tokens + (now - budget.at) * self._rate)
        budget.at = now
        if budget.tokens >= 1.0:
            budget.tokens -= 1.0
            return True
        if not budget.left_out:
            budget.since = now
            budget.timer = asyncio.get_running_loop().call_later(SUMMARY_AFTER_SECONDS, self._summarise, agent)
        budget.left_out += 1
        budget.reasons[reason] = budget.reasons.get(reason, 0) + 1
        return False

    def _add(self, agent: str, now: float) -> _Budget:
        if len(self._budgets) >= self._prune_at:  # amortised: the bound doubles with those still in use
            refilled = self._burst / self._rate
            self._budgets = {name: b for name, b in self._budgets.items() if b.left_out or now - b.at < refilled}
            self._prune_at = max(PRUNE_AT, 2 * len(self._budgets))
        budget = self._budgets[agent] = _Budget(self._burst, now)
        return budget

    def flush(self) -> None:
        """Write the pending summaries now rather than when their timers fire: the gate is stopping, and the
        ledger closes before the timers would."""
        for agent, budget in list(self._budgets.items()):
            if budget.timer is not None:
                budget.timer.cancel()
            self._summarise(agent)

    def _summarise(self, agent: str) -> None:
        budget = self._budgets.get(agent)
        if budget is None or not budget.left_out:
            return
        budget.timer = None
        count, seconds = budget.left_out, time.monotonic() - budget.since
        reasons = ", ".join(f"{reason or 'unknown'} {n}" for reason, n in
                            sorted(budget.reasons.items(), key=lambda item: (-item[1], item[0])))
        budget.left_out, budget.reasons = 0, {}
        whose = f"by agent {agent}" if agent else "without a valid agent token"
        detail = (f"{count} refusals of requests {whose} in {seconds:.1f} s were not recorded one by one "
                  f"(more than {self._rate:g} a second after a burst of {self._burst:g}): {reasons}")
        log.warning("%s", detail)
        try:  # an agent's summary names it, so `ledger show --agent` finds it with the agent's rows
            self._record(LedgerEntry(kind="system", agent=agent, detail=detail,
                                     reason="agent_refusal_flood" if agent else "unauthenticated_flood"))
        except LedgerError as exc:  # stopping: the log line above is the record
            log.error("the summary of unrecorded refusals could not be queued: %s", exc)
