"""The summary row of unauthenticated refusals left out of the ledger: written by its timer, or at once by a
flush when the gate stops before the timer fires (a stop right after a flood must not lose it)."""

from __future__ import annotations

import asyncio

from aegisd.gate.unauthenticated import SUMMARY_AFTER_SECONDS, UnauthenticatedRows
from aegisd.ledger import LedgerEntry
from tests.unit.event_loops import Run


def test_a_flush_writes_the_pending_summary_at_once_and_only_once(run: Run) -> None:
    async def scenario() -> None:
        rows: list[LedgerEntry] = []
        limiter = UnauthenticatedRows(rows.append, rate=0.001, burst=2)
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
        limiter = UnauthenticatedRows(rows.append, rate=0.001, burst=2)
        assert limiter.admit() is True
        limiter.flush()
        assert rows == []

    run(scenario())
