"""The summary row of refusals left out of the ledger: written by its timer, or at once by a flush when the gate
stops before the timer fires (a stop right after a flood must not lose it); one budget and summary per agent."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any, cast

import pytest

from aegisd.gate import unauthenticated
from aegisd.gate.unauthenticated import PRUNE_AT, SUMMARY_AFTER_SECONDS, RefusalRows
from aegisd.ledger import LedgerEntry
from aegisd.outcomes import OutcomeSink
from tests.unit.event_loops import Run


def test_a_flush_writes_the_pending_summary_at_once_and_only_once(run: Run) -> None:
    async def scenario() -> None:
        rows: list[LedgerEntry] = []
        limiter = RefusalRows(rows.append, rate=0.001, burst=2)
        assert [limiter.admit() for _ in range(5)] == [True, True, False, False, False]
        assert rows == []
        limiter.flush()
        assert len(rows) == 1 and rows[0].reason == "unauthenticated_flood"
        assert rows[0].detail.startswith("3 refusals of requests without a valid agent token")
        await asyncio.sleep(SUMMARY_AFTER_SECONDS + 0.2)  # the timer was cancelled: no second summary
        assert len(rows) == 1
        limiter.flush()  # nothing pending: nothing written
        assert len(rows) == 1

        # Counting starts over after a flush, and the timer still writes the next summary on its own.
        assert limiter.admit() is False
        await asyncio.sleep(SUMMARY_AFTER_SECONDS + 0.2)
        assert len(rows) == 2 and rows[1].detail.startswith("1 refusals")
        limiter.flush()
        assert len(rows) == 2

    run(scenario())


def test_a_flush_with_nothing_left_out_writes_nothing(run: Run) -> None:
    async def scenario() -> None:
        rows: list[LedgerEntry] = []
        limiter = RefusalRows(rows.append, rate=0.001, burst=2)
        assert limiter.admit() is True
        limiter.flush()
        assert rows == []

    run(scenario())


def test_each_agent_has_its_own_budget_and_summary_row_naming_it_and_its_reasons(run: Run) -> None:
    async def scenario() -> None:
        rows: list[LedgerEntry] = []
        limiter = RefusalRows(rows.append, rate=0.001, burst=2)
        assert [limiter.admit("bot", "not_granted") for _ in range(5)] == [True, True, False, False, False]
        assert limiter.admit("bot", "rate_limited") is False
        assert [limiter.admit("other", "not_granted") for _ in range(2)] == [True, True]  # its own budget
        assert limiter.admit("", "agent_auth_required") is True  # and the tokenless requests theirs
        await asyncio.sleep(SUMMARY_AFTER_SECONDS + 0.2)
        assert len(rows) == 1, rows
        row = rows[0]
        assert (row.kind, row.agent, row.reason) == ("system", "bot", "agent_refusal_flood")
        assert row.detail.startswith("4 refusals of requests by agent bot in ")
        assert row.detail.endswith(": not_granted 3, rate_limited 1"), row.detail
        limiter.flush()
        assert len(rows) == 1

    run(scenario())


def test_idle_budgets_are_dropped_and_busy_ones_kept(run: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    # busy's summary must not come due while the loop below runs (it took more than a second on a loaded machine):
    # once written, busy is idle too and may be dropped
    monkeypatch.setattr(unauthenticated, "SUMMARY_AFTER_SECONDS", 600.0)

    async def scenario() -> None:
        rows: list[LedgerEntry] = []
        limiter = RefusalRows(rows.append, rate=1000.0, burst=1)  # full again a millisecond after a refusal
        assert limiter.admit("busy") is True and limiter.admit("busy") is False  # one left out: kept
        for n in range(PRUNE_AT * 4):
            assert limiter.admit(f"agent{n}") is True
            await asyncio.sleep(0.002)  # each budget is full again, idle, when the next is added
        assert len(limiter._budgets) <= PRUNE_AT, len(limiter._budgets)
        assert "busy" in limiter._budgets
        limiter.flush()
        assert [r.agent for r in rows] == ["busy"]

    run(scenario())


def test_past_its_row_budget_an_agents_refusal_still_alerts_and_a_tokenless_one_does_not() -> None:
    """Past the budget neither gets a log line. An agent's refusal still raises its webhook event (the dispatcher
    holds each agent's events within a share of the queue): otherwise an agent could flood cheap refusals and then
    attempt an exfiltration that no receiver hears of. A tokenless one raises none: anyone can send those."""
    emitted: list[tuple[str, str]] = []

    def emit(name: str, details: dict[str, object], *, unauthenticated: bool, agent: str) -> None:
        emitted.append((name, agent))

    dispatcher = SimpleNamespace(has_subscribers=True, wants=lambda name: True, emit=emit)
    routing: Any = SimpleNamespace(table=None)
    sink = OutcomeSink(routing, None, cast(Any, SimpleNamespace(dispatcher=dispatcher)))
    for agent, reason, status in (("evil", "body_inspection", 400), ("", "agent_auth_required", 401)):
        sink.record(LedgerEntry(kind="request", agent=agent, service="svc", method="POST", decision="denied",
                                reason=reason, status=status), None, itemised=False)
    assert emitted == [("body_inspection", "evil")]
