"""The keyed hash chain that makes the ledger tamper-evident, and its verifier.

mac(row) = HMAC-SHA256(key, mac(previous row) || canonical(row incl. its id)). Editing, deleting,
swapping or reordering any row breaks every later link. A prune moves the chain's start to an
authenticated checkpoint (aegisd.ledger.checkpoint). Rows cut off the end are caught while SQLite's
AUTOINCREMENT counter still remembers them; an attacker who also rewrites that counter can only be
caught by comparing with the last id and MAC of an earlier verify or export (no chain alone can).
A row without a MAC is outside the chain (the next chained row links to the one before it) and fails
verify: the writer MACs after the fact only rows it stored itself while it had no key.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from aegisd.ledger.checkpoint import all_checkpoints, is_authentic
from aegisd.ledger.entry import ENTRY_FIELDS
from aegisd.ledger.schema import LedgerError, open_reader

GENESIS = bytes(32)  # the "previous MAC" of the first row
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True, allow_nan=False)
SELECT_CHAIN = f"SELECT id, {', '.join(ENTRY_FIELDS)}, mac FROM ledger"  # noqa: S608 - constant columns


def canonical(row_id: int, values: Sequence[Any]) -> bytes:
    """One unambiguous byte string per row: a JSON array [id, *fields in ENTRY_FIELDS order].

    JSON escapes every string, so no two rows encode alike; the field order is part of the format.
    """
    return _ENCODER.encode([row_id, *values]).encode("ascii")


RowMac = Callable[[bytes, int, Sequence[Any]], bytes]


def row_mac(key: bytes) -> RowMac:
    """The MAC function for one key: (prev_mac, row_id, values) -> this row's link in the chain.

    prev_mac is fixed-size, so prev_mac || canonical is unambiguous. The keyed state is computed once
    and copied per row, which is measurably cheaper than keying HMAC for every row.
    """
    keyed = hmac.new(key, digestmod=hashlib.sha256)

    def mac(prev_mac: bytes, row_id: int, values: Sequence[Any]) -> bytes:
        h = keyed.copy()
        h.update(prev_mac + canonical(row_id, values))
        return h.digest()

    return mac


@dataclass(frozen=True, slots=True)
class VerifyResult:
    """Outcome of `ledger verify`: rows_checked counts the rows that verified before any bad one."""

    ok: bool
    rows_checked: int
    first_bad_id: int | None
    reason: str
    first_id: int = 1  # where the chain starts: row 1, or the first row the newest prune kept


def verify(path: str | os.PathLike[str], key: bytes) -> VerifyResult:
    """Walk the chain from the start and name the first row that does not fit."""
    conn = open_reader(path)
    try:
        conn.execute("BEGIN")  # one snapshot, so rows the daemon commits meanwhile do not confuse it
        return _verify(conn, key)
    except sqlite3.Error as exc:
        raise LedgerError(f"cannot read ledger {path}: {exc}") from None
    finally:
        conn.close()


def _chain_start(conn: sqlite3.Connection, key: bytes) -> tuple[bytes, int] | VerifyResult:
    """(prev_mac, first id) from the newest authentic checkpoint, or genesis; a failure if any is bad."""
    checkpoints = all_checkpoints(conn)
    floor = 1
    for cp in checkpoints:
        if not is_authentic(key, cp):
            return VerifyResult(False, 0, None, f"prune checkpoint {cp.id} does not match its MAC: it was forged "
                                "or altered, or the key is wrong")
        if cp.first_kept_id < floor:
            return VerifyResult(False, 0, None, f"prune checkpoint {cp.id} goes back to row {cp.first_kept_id}, "
                                f"before an earlier prune's row {floor}")
        floor = cp.first_kept_id
    return (checkpoints[-1].prev_mac, floor) if checkpoints else (GENESIS, 1)


def _verify(conn: sqlite3.Connection, key: bytes) -> VerifyResult:
    mac_of = row_mac(key)
    start = _chain_start(conn, key)
    if isinstance(start, VerifyResult):
        return start
    prev_mac, expected_id = start
    first_id, checked = expected_id, 0
    unchained = _Unchained()
    for row in conn.execute(f"{SELECT_CHAIN} ORDER BY id"):
        row_id, values, mac = row[0], row[1:-1], row[-1]
        if row_id < expected_id:  # only the first row can be: the chain starts at a checkpoint
            return unchained.fail(checked, row_id, f"row {row_id} precedes the last prune, which kept rows from "
                                  f"{expected_id} on: it was inserted afterwards", first_id)
        if row_id != expected_id:
            return unchained.fail(checked, row_id, f"rows {expected_id}..{row_id - 1} are missing", first_id)
        expected_id = row_id + 1
        if mac is None:  # not part of the chain: the next chained row links to the one before it
            unchained.add(row_id, checked)
            continue
        try:
            expected = mac_of(prev_mac, row_id, values)
        except (TypeError, ValueError):  # a value of a type the writer never stores
            expected = b""
        if not isinstance(mac, bytes) or not hmac.compare_digest(mac, expected):
            return unchained.fail(checked, row_id, f"row {row_id} does not match its MAC: it was edited or moved, a "
                                  "row before it was deleted, or the key is wrong", first_id)
        prev_mac, checked = mac, checked + 1
    (last_used,) = conn.execute("SELECT coalesce(max(seq), 0) FROM sqlite_sequence WHERE name = 'ledger'").fetchone()
    if last_used >= expected_id:
        return unchained.fail(checked, expected_id, f"rows {expected_id}..{last_used} were deleted from the end",
                              first_id)
    if unchained.ranges:
        return unchained.fail(checked, None, None, first_id)
    pruned = f" (rows before {first_id} were pruned at an authentic checkpoint)" if first_id > 1 else ""
    return VerifyResult(True, checked, None, f"{checked} rows verified{pruned}", first_id)


class _Unchained:
    """Rows verify found without a MAC. The writer chains only rows it stored itself while it had no key, so
    such a row was stored by an earlier run that stopped before its vault was unlocked, or edited and
    stripped of its MAC: either way nothing vouches for it, and verify fails. Verify walks on past such rows,
    so later edits are still found."""

    def __init__(self) -> None:
        self.ranges: list[list[int]] = []
        self.checked_before = 0  # rows that verified before the first unchained one

    def add(self, row_id: int, checked: int) -> None:
        if self.ranges and self.ranges[-1][1] == row_id - 1:
            self.ranges[-1][1] = row_id
            return
        if not self.ranges:
            self.checked_before = checked
        self.ranges.append([row_id, row_id])

    def fail(self, checked: int, bad_id: int | None, problem: str | None, first_id: int) -> VerifyResult:
        """The result for `problem` at bad_id (None: the unchained rows are the only problem)."""
        if not self.ranges:
            return VerifyResult(False, checked, bad_id, problem or "", first_id)
        shown = ", ".join(span(first, last) for first, last in self.ranges[:_NAMED_RANGES])
        if len(self.ranges) > _NAMED_RANGES:
            shown += f" and {len(self.ranges) - _NAMED_RANGES} more ranges"
        count = sum(last - first + 1 for first, last in self.ranges)
        one = count == 1
        reason = (f"{'row' if one else 'rows'} {shown} {'is' if one else 'are'} not chained (no MAC): stored so by "
                  "an earlier run of aegisd that stopped before its vault was unlocked, or edited and the MAC "
                  f"removed; nothing vouches for {'it' if one else 'them'}")
        after = checked - self.checked_before
        if problem is not None:
            reason += f"; and {problem}"
        elif after == 0:
            reason += " (no chained row follows)"
        else:
            reason += f" (the {_plural(after, 'chained row')} after {'it' if one else 'them'} "
            reason += f"{'verifies' if after == 1 else 'verify'})"
        return VerifyResult(False, self.checked_before, self.ranges[0][0], reason, first_id)


_NAMED_RANGES = 3


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def span(first: int, last: int) -> str:
    """A range of row ids as verify and the writer's log name it: `7`, or `7..9`."""
    return str(first) if first == last else f"{first}..{last}"
