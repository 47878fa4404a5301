"""Reading the ledger for `ledger show`, `export` and `stats`, on a read-only connection.

Each filter maps to an index keyed by (column, id), so "the newest 50 rows of agent X" reads about 50
index entries even on millions of rows.
"""

from __future__ import annotations

import os
import sqlite3
from typing import Any

from aegisd.ledger.entry import ENTRY_FIELDS, LedgerRow, row_from_values
from aegisd.ledger.schema import LedgerError, open_reader

_SELECT = f"SELECT id, {', '.join(ENTRY_FIELDS)} FROM ledger"  # noqa: S608 - constant columns


def filter_clauses(
    *,
    agent: str | None = None,
    service: str | None = None,
    credential: str | None = None,
    denied_only: bool = False,
    since_ms: int | None = None,
    until_ms: int | None = None,
) -> tuple[list[str], list[Any]]:
    """WHERE conditions (to AND together) and their parameters, shared by rows, export and stats."""
    clauses: list[str] = []
    params: list[Any] = []
    for column, value in (("agent", agent), ("service", service), ("credential", credential)):
        if value is not None:
            clauses.append(f"{column} = ?")
            params.append(value)
    if denied_only:
        clauses.append("decision = 'denied'")  # a literal, so the partial index applies
    if since_ms is not None:
        clauses.append("time_ms >= ?")
        params.append(since_ms)
    if until_ms is not None:
        clauses.append("time_ms < ?")
        params.append(until_ms)
    return clauses, params


def query_rows(
    source: str | os.PathLike[str] | sqlite3.Connection,
    *,
    agent: str | None = None,
    service: str | None = None,
    credential: str | None = None,
    denied_only: bool = False,
    since_ms: int | None = None,
    until_ms: int | None = None,
    limit: int = 100,
    after_id: int | None = None,
    newest_first: bool = True,
) -> list[LedgerRow]:
    """Rows matching every given filter, at most `limit`, ordered by id.

    since_ms is inclusive and until_ms exclusive. after_id is a paging cursor: pass the last id you got
    to continue in the same order (older rows when newest_first, newer rows otherwise).
    """
    if limit < 1:
        raise ValueError("limit must be at least 1")
    clauses, params = filter_clauses(agent=agent, service=service, credential=credential, denied_only=denied_only,
                                     since_ms=since_ms, until_ms=until_ms)
    if after_id is not None:
        clauses.append("id < ?" if newest_first else "id > ?")
        params.append(after_id)
    where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
    sql = f"{_SELECT}{where} ORDER BY id {'DESC' if newest_first else 'ASC'} LIMIT ?"
    params.append(limit)

    conn = source if isinstance(source, sqlite3.Connection) else open_reader(source)
    try:
        try:
            return [row_from_values(row[0], row[1:]) for row in conn.execute(sql, params)]
        except sqlite3.OperationalError as exc:
            if not not_utf8(exc):
                raise
        # Text that is not UTF-8 (see not_utf8): read again with a text_factory (a quarter more time per row, so only
        # then) for the rows to show, each byte that is not UTF-8 as U+FFFD. Such a row fails `ledger verify`.
        factory = conn.text_factory
        conn.text_factory = read_replacing
        try:
            return [row_from_values(row[0], row[1:]) for row in conn.execute(sql, params)]
        finally:
            conn.text_factory = factory
    except sqlite3.Error as exc:
        raise LedgerError(f"cannot read the ledger: {exc}") from None
    finally:
        if conn is not source:
            conn.close()


def nth_newest_id(conn: sqlite3.Connection, n: int, **filters: Any) -> int:
    """The id of the `n`th newest row matching `filters` (those of query_rows), or 0 if fewer match: where a
    backlog of the newest `n` starts, found on the index without reading the rows."""
    clauses, params = filter_clauses(**filters)
    where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
    try:
        found = conn.execute(f"SELECT id FROM ledger{where} ORDER BY id DESC LIMIT 1 OFFSET ?",  # noqa: S608
                             [*params, n - 1]).fetchone()
    except sqlite3.Error as exc:
        raise LedgerError(f"cannot read the ledger: {exc}") from None
    return int(found[0]) if found else 0


def not_utf8(exc: sqlite3.OperationalError) -> bool:
    """Whether sqlite3 failed to decode a TEXT value as UTF-8 ("Could not decode to UTF-8 column ..."), rather than
    SQLite failing (its errors carry an error code). aegisd stores only UTF-8: the file was written behind its back."""
    return getattr(exc, "sqlite_errorcode", None) is None


def read_replacing(value: bytes) -> str:
    """A text_factory for rows holding text that is not UTF-8: each such byte as U+FFFD."""
    return value.decode("utf-8", "replace")
