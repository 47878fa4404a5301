"""`ledger stats`: totals and breakdowns of the rows matching a filter, counted by SQLite (GROUP BY).

All queries run in one read transaction, so the numbers agree with each other even while the gate
writes. Breakdowns count request rows only; system events are counted in the totals.
"""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass, field
from typing import Any

from aegisd.ledger.query import filter_clauses
from aegisd.ledger.schema import LedgerError, open_reader

MAX_GROUPS = 1000  # per breakdown: bounds the reply when a filter matches a huge variety


@dataclass(frozen=True, slots=True)
class Group:
    """One value of a breakdown: how many request rows carry it, and how many of those were denied."""

    key: str
    count: int
    denied: int


@dataclass(frozen=True, slots=True)
class LedgerStats:
    rows: int = 0
    requests: int = 0
    system_events: int = 0
    allowed: int = 0
    denied: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    first_time_ms: int | None = None
    last_time_ms: int | None = None
    by_decision: list[Group] = field(default_factory=list)
    by_service: list[Group] = field(default_factory=list)
    by_reason: list[Group] = field(default_factory=list)
    top_agents: list[Group] = field(default_factory=list)


def ledger_stats(path: str | os.PathLike[str], *, top: int = 10, **filters: Any) -> LedgerStats:
    """Counts over the rows matching `filters` (the keyword arguments of query.filter_clauses)."""
    if not 1 <= top <= MAX_GROUPS:
        raise ValueError(f"top must be between 1 and {MAX_GROUPS}")
    clauses, params = filter_clauses(**filters)
    conn = open_reader(path)
    try:
        conn.execute("BEGIN")
        return _stats(conn, clauses, params, top)
    except sqlite3.Error as exc:
        raise LedgerError(f"cannot read the ledger: {exc}") from None
    finally:
        conn.close()


def _where(clauses: list[str], *more: str) -> str:
    every = [*clauses, *more]
    return f" WHERE {' AND '.join(every)}" if every else ""


def _stats(conn: sqlite3.Connection, clauses: list[str], params: list[Any], top: int) -> LedgerStats:
    # Every piece of SQL below is a constant or a clause from filter_clauses; values go in as parameters.
    # The totals pass also counts request rows by decision (the schema allows three values), one scan
    # fewer than grouping them.
    totals = conn.execute(
        "SELECT count(*), total(kind = 'request'), total(kind = 'system'), total(decision = 'allowed'), "
        "total(decision = 'denied'), total(bytes_in), total(bytes_out), min(time_ms), max(time_ms), "
        "total(kind = 'request' AND decision = 'allowed'), total(kind = 'request' AND decision = 'denied'), "
        "total(kind = 'request' AND decision = '') "
        "FROM ledger" + _where(clauses), params).fetchone()
    requests = "kind = 'request'"

    def groups(column: str, *more: str, limit: int = MAX_GROUPS) -> list[Group]:
        # `+column`: group in a temporary B-tree rather than walk the column's index and look up every
        # row it names, which on a million rows takes twice as long; filters still use their indexes.
        sql = (f"SELECT {column}, count(*), total(decision = 'denied') FROM ledger"  # noqa: S608
               f"{_where(clauses, requests, *more)} GROUP BY +{column} ORDER BY 2 DESC, 1 LIMIT ?")
        return [Group(str(key), int(count), int(denied)) for key, count, denied in conn.execute(sql, [*params, limit])]

    by_decision = sorted((Group(key, int(count), int(count) if key == "denied" else 0)
                          for key, count in zip(("allowed", "denied", ""), totals[9:], strict=True) if count),
                         key=lambda g: (-g.count, g.key))
    return LedgerStats(
        rows=int(totals[0]), requests=int(totals[1]), system_events=int(totals[2]), allowed=int(totals[3]),
        denied=int(totals[4]), bytes_in=int(totals[5]), bytes_out=int(totals[6]), first_time_ms=totals[7],
        last_time_ms=totals[8],
        by_decision=by_decision,
        by_service=groups("service"),
        by_reason=groups("reason", "reason != ''"),
        top_agents=groups("agent", "agent != ''", limit=top),
    )
