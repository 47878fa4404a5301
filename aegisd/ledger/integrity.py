"""SQLite's full integrity check of a database file, and what its findings mean, said precisely.

`ledger verify` walks the table in id order and never reads an index, and `PRAGMA quick_check` does not
compare indexes with their table. Someone who can write ledger.db can rebuild an index without chosen rows
and put the original CREATE INDEX text back (writable_schema): every filtered `ledger show`, `stats` and
`export` (which read through the indexes), and a prune's choice of its first kept row, then miss those rows
while the chain still verifies. Only `PRAGMA integrity_check` compares each index with its table.

Used by `ledger verify`, `ledger prune`, doctor's `database` check and restore's checks of a backup.
"""

from __future__ import annotations

import re
import sqlite3

MAX_PROBLEMS = 100  # SQLite's own default: past it the check stops
_NAMED_RANGES = 5
_MISSING = re.compile(r"row (\d+) missing from index (\S+)")
_MISCOUNTED = re.compile(r"wrong # of entries in index (\S+)")


def integrity_problems(conn: sqlite3.Connection) -> list[str]:
    """What `PRAGMA integrity_check` finds (at most MAX_PROBLEMS lines); [] when the file is intact.

    It reads the whole file: 2 to 3 s on a million ledger rows, where the chain walk takes about 10."""
    lines = [str(row[0]) for row in conn.execute(f"PRAGMA integrity_check({MAX_PROBLEMS})")]
    return [] if lines == ["ok"] else lines


def describe(problems: list[str]) -> str:
    """The findings in a sentence: each index and the rows it lacks, then anything else as SQLite says it."""
    missing: dict[str, list[int]] = {}
    miscounted: list[str] = []
    other: list[str] = []
    for line in problems:
        if found := _MISSING.fullmatch(line):
            missing.setdefault(found[2], []).append(int(found[1]))
        elif found := _MISCOUNTED.fullmatch(line):
            miscounted.append(found[1])
        else:
            other.append(line)
    parts = [f"index {index} lacks {_rows(rows)}" for index, rows in missing.items()]
    parts += [f"index {index} holds entries for rows its table does not have" for index in dict.fromkeys(miscounted)
              if index not in missing]
    parts += other[:_NAMED_RANGES]
    if len(other) > _NAMED_RANGES:
        parts.append(f"{len(other) - _NAMED_RANGES} more problems")
    text = "; ".join(parts)
    if len(problems) >= MAX_PROBLEMS:
        text += f" (the check stops after {MAX_PROBLEMS} findings: there may be more)"
    return text


def hidden_rows_note(problems: list[str]) -> str:
    """What rows missing from an index do to the ledger's readers, or "" if no index lacks rows."""
    if not any(_MISSING.fullmatch(line) for line in problems):
        return ""
    return "filtered `ledger show`, `stats` and `export` (which read through the indexes) do not see those rows"


def _rows(ids: list[int]) -> str:
    ids = sorted(set(ids))
    ranges: list[list[int]] = []
    for row_id in ids:
        if ranges and ranges[-1][1] == row_id - 1:
            ranges[-1][1] = row_id
        else:
            ranges.append([row_id, row_id])
    shown = ", ".join(str(a) if a == b else f"{a}..{b}" for a, b in ranges[:_NAMED_RANGES])
    if len(ranges) > _NAMED_RANGES:
        shown += f" and {len(ranges) - _NAMED_RANGES} more ranges"
    return f"{'row' if len(ids) == 1 else 'rows'} {shown}"
