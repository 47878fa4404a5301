"""Fill a fresh ledger.db with many rows through the real writer, before a daemon opens it.

Used by the export tests and for measuring export memory by hand:
    python -m tests.e2e.ledger_fill DATA_DIR/ledger.db 1000000
Every FORMULA_EVERY-th row carries spreadsheet-formula text in fields a caller can influence
(method, detail, flags, reason), so a CSV export can be checked for neutralisation.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aegisd.ledger import LedgerEntry
from aegisd.ledger.entry import entry_values, normalize
from aegisd.ledger.schema import open_writable
from aegisd.ledger.writer import _insert

T0 = 1_700_000_000_000
FORMULA_EVERY = 1000
FORMULAS = ("=HYPERLINK(\"http://evil.example\",\"x\")", "+1+1", "-2+3", "@SUM(A1)", "\tcmd", "\r=1")
AGENTS = ("claude", "cursor", "ci-bot")


def entry(i: int) -> LedgerEntry:
    if i % FORMULA_EVERY == 0:
        evil = FORMULAS[(i // FORMULA_EVERY) % len(FORMULAS)]
        return LedgerEntry(kind="request", time_ms=T0 + i, request_id=f"{i:016x}", agent=AGENTS[i % 3],
                           service="github", method=evil, path="/repos/a,b/\"quoted\"\nline", decision="denied",
                           reason=evil, status=403, flags=evil, detail=evil)
    return LedgerEntry(kind="request", time_ms=T0 + i, request_id=f"{i:016x}", agent=AGENTS[i % 3],
                       credential="github", service="github", method="GET", path=f"/repos/o/r/issues/{i}",
                       target_host="api.github.com", decision="allowed", status=200, duration_ms=12.5,
                       bytes_out=1234)


def fill(path: Path, count: int, batch: int = 5000, make: Callable[[int], LedgerEntry] = entry) -> None:
    """Append `count` rows (`make(i)`) as the real writer stores them without a key (as before the vault's first
    unlock): normalized, unchained, inserted by its own statement, a transaction per batch. Called directly rather
    than through `LedgerWriter.append`, whose per-row future costs five times as much as the row: the file is the
    same."""
    conn = open_writable(path)
    try:
        for start in range(0, count, batch):
            params: list[Any] = []
            for i in range(start, min(count, start + batch)):
                params += (i + 1, *entry_values(normalize(make(i))), None)
            conn.execute("BEGIN IMMEDIATE")
            _insert(conn, params)
            conn.execute("COMMIT")
    finally:
        conn.close()


def formula_rows(count: int) -> int:
    """How many of the first `count` rows carry formula text."""
    return len(range(0, count, FORMULA_EVERY))


if __name__ == "__main__":
    fill(Path(sys.argv[1]), int(sys.argv[2]))
