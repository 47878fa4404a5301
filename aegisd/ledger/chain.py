"""The keyed hash chain that makes the ledger tamper-evident, and its verifier.

mac(row) = HMAC-SHA256(key, mac(previous row) || canonical(row incl. its id)). Editing, deleting,
swapping or reordering any row breaks every later link. A prune moves the chain's start to an
authenticated checkpoint (aegisd.ledger.checkpoint). A row without a MAC is outside the chain (the
next chained row links to the one before it) and fails verify: the writer MACs after the fact only rows
it stored itself while it had no key.

Rows cut off the end are caught while SQLite's AUTOINCREMENT counter still remembers them. Someone who also
rewrites the counter leaves a chain that verifies (the daemon even goes on appending to it), which no chain
alone can tell from the real one. So verify reports its tip, the newest row that verified and its MAC (an
HMAC output: it tells nothing of the key), and takes an earlier verify's tip (`expect`) to check that this
ledger still holds that row with that MAC: a truncation to before it, or a truncation the daemon has since
written past, fails. Verify also runs SQLite's full integrity check (aegisd.ledger.integrity): the chain
walk reads the table in id order and never an index, and an index rebuilt without some rows would hide them
from every filtered read.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

from aegisd.ledger.checkpoint import all_checkpoints, is_authentic
from aegisd.ledger.entry import ENTRY_FIELDS
from aegisd.ledger.integrity import describe, hidden_rows_note, integrity_problems
from aegisd.ledger.query import not_utf8
from aegisd.ledger.schema import LedgerError, open_reader
from aegisd.text import plural

GENESIS = bytes(32)  # the "previous MAC" of the first row
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True, allow_nan=False)
SELECT_CHAIN = f"SELECT id, {', '.join(ENTRY_FIELDS)}, mac FROM ledger"  # noqa: S608 - constant columns
_KIND, _REASON = ENTRY_FIELDS.index("kind"), ENTRY_FIELDS.index("reason")
RESTORED = "backup_restored"  # the reason of the row a restore adds (aegisd.control.backup_service writes it)


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
    # The tip: the newest row that verified and its MAC (when ok, the chain's last row). After a prune with no
    # row verified since, the last pruned row and its MAC from the checkpoint; (0, b"") when there is neither.
    last_id: int = 0
    last_mac: bytes = b""
    # Not ok only because rows carry no MAC (most often: a run that stopped before its vault was unlocked, with
    # agents calling the locked gate), everything else verifying: an operator's review, not evidence of an edit.
    unchained_only: bool = False


Tip = tuple[int, bytes]  # (row id, its MAC), as an earlier verify reported it
Written = tuple[int, bytes | None]  # the newest row the running writer committed, and its MAC (None: stored without)


def verify(path: str | os.PathLike[str], key: bytes, *, check_database: bool = True,
           expect: Tip | None = None, written: Written | None = None, ran_from: int | None = None) -> VerifyResult:
    """Walk the chain from the start and name the first row that does not fit.

    check_database also runs SQLite's full integrity check in the same snapshot (a caller that runs it
    anyway, like doctor's database check, skips it here). expect is the tip of an earlier verify: fail unless
    this ledger still holds that row with that MAC (or has pruned it since, which the result says). written is
    the newest row the running daemon's writer committed (LedgerWriter.written): fail unless the file holds it as
    written, which a file renamed over ledger.db, or rows cut from its end, while the daemon ran would not.
    ran_from is the first row that writer committed: it chained every row from there on (those written before the
    key, at the unlock, if still as written), so one found there without a MAC was edited or inserted since.
    """
    conn = open_reader(path)
    try:
        conn.execute("BEGIN")  # one snapshot, so rows the daemon commits meanwhile do not confuse it
        problems = integrity_problems(conn) if check_database else []
        try:
            result = _verify_any_text(conn, key, expect, written, ran_from)
        except sqlite3.DatabaseError as exc:  # damaged pages: the integrity check has said where
            if not problems:
                raise
            result = VerifyResult(False, 0, None, f"the chain cannot be read ({exc})")
        return _with_database(result, problems)
    except sqlite3.Error as exc:
        raise LedgerError(f"cannot read ledger {path}: {exc}") from None
    finally:
        conn.close()


def _with_database(result: VerifyResult, problems: list[str]) -> VerifyResult:
    """The result, failed if SQLite's integrity check found anything, with its findings said precisely."""
    if not problems:
        return result
    found = f"ledger.db fails SQLite's integrity check: {describe(problems)}"
    if note := hidden_rows_note(problems):
        found += f"; {note}"
    if result.ok:
        return replace(result, ok=False, reason=f"{found} (the chain itself verifies: {result.reason})")
    return replace(result, reason=f"{result.reason}; and {found}", unchained_only=False)


def _verify_any_text(conn: sqlite3.Connection, key: bytes, expect: Tip | None, written: Written | None,
                     ran_from: int | None) -> VerifyResult:
    """_verify, also over text that is not UTF-8, which sqlite3 refuses to read: aegisd stores only UTF-8, so such
    bytes were written into the file behind its back. The walk then starts again, in the same snapshot, reading
    text so that those bytes survive (as lone surrogates): the row fails its MAC and is named like any other edit.
    Only that second walk pays for a text_factory (a quarter more time per row), so a good ledger costs nothing."""
    try:
        return _verify(conn, key, expect, written, ran_from)
    except sqlite3.OperationalError as exc:
        if not not_utf8(exc):
            raise
    conn.text_factory = _surrogates
    return _verify(conn, key, expect, written, ran_from)


def _surrogates(value: bytes) -> str:
    return value.decode("utf-8", "surrogateescape")  # never equal to text aegisd stored: it stores none such


class ChainStart(NamedTuple):
    """Where the chain starts: the MAC its first row links to, that row's id, and the checkpoint it comes from."""

    prev_mac: bytes
    first_id: int
    checkpoint_id: int | None  # None: no prune yet, the chain starts at genesis


def chain_start(conn: sqlite3.Connection, key: bytes) -> ChainStart | VerifyResult:
    """The start from the newest checkpoint, or genesis; a failure if any checkpoint is forged, out of order or gone.

    Checkpoint ids run 1, 2, 3 ... with no gap (write_checkpoint numbers them so), and each MAC covers its id, so
    removing any but the newest leaves a gap; removing the newest leaves its pruned rows missing from the walk.
    """
    checkpoints = all_checkpoints(conn)
    floor = 1
    for number, cp in enumerate(checkpoints, 1):
        if not is_authentic(key, cp):
            return VerifyResult(False, 0, None, f"prune checkpoint {cp.id} does not match its MAC: it was forged "
                                "or altered, or the key is wrong")
        if cp.id != number:  # authentic, so written with an id past the last: those before it were removed
            one = cp.id == number + 1
            return VerifyResult(False, 0, None, f"prune {'checkpoint' if one else 'checkpoints'} "
                                f"{span(number, cp.id - 1)} {'is' if one else 'are'} missing before checkpoint "
                                f"{cp.id}: removed from the file")
        if cp.first_kept_id < floor:
            return VerifyResult(False, 0, None, f"prune checkpoint {cp.id} goes back to row {cp.first_kept_id}, "
                                f"before an earlier prune's row {floor}")
        floor = cp.first_kept_id
    if not checkpoints:
        return ChainStart(GENESIS, 1, None)
    return ChainStart(checkpoints[-1].prev_mac, floor, checkpoints[-1].id)


def _verify(conn: sqlite3.Connection, key: bytes, expect: Tip | None, written: Written | None,
            ran_from: int | None) -> VerifyResult:
    start = chain_start(conn, key)
    if isinstance(start, VerifyResult):
        return start
    walk = _Walk(start, expect[0] if expect else None, written[0] if written else None, ran_from)
    result = walk.run(conn, row_mac(key))
    result = replace(result, last_id=walk.tip_id, last_mac=walk.tip_mac)
    if written is not None:
        result = _failed(result, walk.compare_written(written))
    if walk.stripped:
        first, count = walk.stripped
        have = "has" if count == 1 else "have"
        result = _failed(result, f"the running aegisd chained every row from row {walk.ran_from} on, yet "
                         f"{plural(count, 'row')} there (from row {first}) {have} no MAC: edited or inserted while "
                         "it ran")
    if expect is None:
        return result
    problem, note = walk.compare(expect)
    if problem is None:
        return replace(result, reason=f"{result.reason}; {note}") if note else result
    return _failed(result, problem)


def _failed(result: VerifyResult, problem: str | None) -> VerifyResult:
    """The result, failed for `problem` too (None: as it is)."""
    if problem is None:
        return result
    if result.ok:
        return replace(result, ok=False, reason=problem)
    return replace(result, reason=f"{result.reason}; and {problem}", unchained_only=False)


class _Walk:
    """One walk along the chain from its start, which keeps the tip and the MAC of the row an earlier tip named."""

    def __init__(self, start: ChainStart, expect_id: int | None, written_id: int | None = None,
                 ran_from: int | None = None) -> None:
        self.start_mac, self.first_id = start.prev_mac, start.first_id
        self.tip_id, self.tip_mac = (self.first_id - 1, self.start_mac) if self.first_id > 1 else (0, b"")
        self.expect_id = expect_id
        self.expect_seen: bytes | None = None  # the MAC found at expect_id (b"": the row is there without one)
        self.written_id = written_id
        self.written_seen: bytes | None = None  # the same for written_id
        self.completed = False  # walked to the end (a failure may stop it before the row expect_id)
        self.restored_id = 0  # the newest row that verified recording a restore (0: none)
        self.ran_from = ran_from
        self.stripped: tuple[int, int] | None = None  # (first, count) of rows from ran_from on without a MAC

    def run(self, conn: sqlite3.Connection, mac_of: RowMac) -> VerifyResult:
        prev_mac, expected_id = self.start_mac, self.first_id
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
                if self.ran_from is not None and row_id >= self.ran_from:
                    self.stripped = (self.stripped[0], self.stripped[1] + 1) if self.stripped else (row_id, 1)
                if row_id == self.expect_id:
                    self.expect_seen = b""
                if row_id == self.written_id:
                    self.written_seen = b""
                continue
            try:
                expected = mac_of(prev_mac, row_id, values)
            except (TypeError, ValueError):  # a value of a type the writer never stores
                expected = b""
            if not isinstance(mac, bytes) or not hmac.compare_digest(mac, expected):
                return unchained.fail(checked, row_id, f"row {row_id} does not match its MAC: it was edited or moved, "
                                      "a row before it was deleted, or the key is wrong", first_id)
            prev_mac, checked = mac, checked + 1
            self.tip_id, self.tip_mac = row_id, mac
            if values[_REASON] == RESTORED and values[_KIND] == "system":
                self.restored_id = row_id
            if row_id == self.expect_id:
                self.expect_seen = mac
            if row_id == self.written_id:
                self.written_seen = mac
        self.completed = True
        (last_used,) = conn.execute("SELECT coalesce(max(seq), 0) FROM sqlite_sequence WHERE name = 'ledger'"
                                    ).fetchone()
        if not isinstance(last_used, int):  # the writer refuses to append to it too (writer._read_tip)
            return unchained.fail(checked, None, f"the ledger's id counter (sqlite_sequence) is not an integer "
                                  f"({type(last_used).__name__}): it was edited", first_id)
        if last_used >= expected_id:
            return unchained.fail(checked, expected_id, f"rows {expected_id}..{last_used} were deleted from the end",
                                  first_id)
        if unchained.ranges:
            return unchained.fail(checked, None, None, first_id)
        pruned = f" (rows before {first_id} were pruned at an authentic checkpoint)" if first_id > 1 else ""
        return VerifyResult(True, checked, None, f"{checked} rows verified{pruned}", first_id)

    def compare(self, expect: Tip) -> tuple[str | None, str | None]:
        """(a failure, None) if this ledger does not hold the earlier tip, else (None, a note or None)."""
        expect_id, expect_mac = expect
        earlier = f"row {expect_id}, the tip of an earlier verify,"
        if expect_id == 0:
            return None, None
        if expect_id < self.first_id - 1:
            return None, (f"{earlier} has been pruned since (the chain now starts at row {self.first_id}), so it "
                          "cannot be compared")
        if expect_id == self.first_id - 1:
            found: bytes | None = self.start_mac  # the last pruned row: its MAC is in the authentic checkpoint
        else:
            found = self.expect_seen
        if found is None:
            if not self.completed:
                return None, None  # the walk failed before it: that failure is the result
            return (f"{earlier} is gone (the ledger ends at row {self.tip_id}): a backup taken before that tip was "
                    f"restored ({self._restore_row()}), or rows were deleted from the end and SQLite's id counter "
                    "rewritten to hide it, unless that tip was mistyped"), None
        if not hmac.compare_digest(found, expect_mac):
            return (f"{earlier} is not the row that verify saw (its MAC differs): a backup taken before that tip was "
                    f"restored and the ledger written on from there ({self._restore_row()}), or rows up to it were "
                    "deleted from the end, SQLite's id counter rewritten, and the ledger written anew from there"), None
        return None, f"it holds {earlier} unchanged"

    def compare_written(self, written: Written) -> str | None:
        """A failure if this ledger does not hold, as written, the newest row the running daemon committed."""
        row_id, mac = written
        if row_id < self.first_id - 1:  # pruned since
            return None
        found = self.start_mac if row_id == self.first_id - 1 else self.written_seen
        newest = f"row {row_id}, the newest row the running aegisd has written,"
        if found is None:
            if not self.completed:
                return None  # the walk failed before it: that failure is the result
            return (f"{newest} is not in ledger.db (its chain ends at row {self.tip_id}): the file was replaced, or "
                    "rows were cut from its end, while aegisd was running")
        if found == b"" and mac is not None:
            return None  # there without its MAC: reported as such (see ran_from: edited while aegisd ran)
        if not hmac.compare_digest(found, mac or b""):
            return (f"{newest} is not in ledger.db as aegisd wrote it (its MAC differs): the file was replaced, or "
                    "rows were cut from its end and others written in their place, while aegisd was running")
        return None

    def _restore_row(self) -> str:
        """Where the ledger says it was restored, for a tip it no longer holds."""
        if self.restored_id:
            return f"row {self.restored_id}, `{RESTORED}`, records the latest restore and when its backup was taken"
        return f"a restore adds a `{RESTORED}` row, and this ledger has none"


class _Unchained:
    """Rows verify found without a MAC. The writer chains only rows it stored itself while it had no key, so
    such a row was stored by an earlier run that stopped before its vault was unlocked, or edited and
    stripped of its MAC: either way nothing vouches for it, and verify fails. Verify walks on past such rows,
    so later edits are still found."""

    def __init__(self) -> None:
        # Only the first ranges are kept to be named, the rest counted: a ledger stripped of every other MAC would
        # otherwise make verify's memory grow with its size.
        self.named: list[list[int]] = []
        self.ranges = 0
        self.rows = 0
        self.last_id = 0  # the newest unchained row
        self.checked_before = 0  # rows that verified before the first unchained one

    def add(self, row_id: int, checked: int) -> None:
        self.rows += 1
        if self.ranges and self.last_id == row_id - 1:
            if self.ranges <= _NAMED_RANGES:
                self.named[-1][1] = row_id
        else:
            if not self.ranges:
                self.checked_before = checked
            self.ranges += 1
            if self.ranges <= _NAMED_RANGES:
                self.named.append([row_id, row_id])
        self.last_id = row_id

    def fail(self, checked: int, bad_id: int | None, problem: str | None, first_id: int) -> VerifyResult:
        """The result for `problem` at bad_id (None: the unchained rows are the only problem)."""
        if not self.ranges:
            return VerifyResult(False, checked, bad_id, problem or "", first_id)
        shown = ", ".join(span(first, last) for first, last in self.named)
        if self.ranges > _NAMED_RANGES:
            shown += f" and {self.ranges - _NAMED_RANGES} more ranges"
        one = self.rows == 1
        reason = (f"{'row' if one else 'rows'} {shown} {'is' if one else 'are'} not chained (no MAC): stored so by "
                  "an earlier run of aegisd that stopped before its vault was unlocked, or edited and the MAC "
                  f"removed; nothing vouches for {'it' if one else 'them'}")
        after = checked - self.checked_before
        if problem is not None:
            reason += f"; and {problem}"
        elif after == 0:
            reason += " (no chained row follows)"
        else:
            reason += f" (the {plural(after, 'chained row')} after {'it' if one else 'them'} "
            reason += f"{'verifies' if after == 1 else 'verify'})"
        return VerifyResult(False, self.checked_before, self.named[0][0], reason, first_id,
                            unchained_only=problem is None)


_NAMED_RANGES = 3


def span(first: int, last: int) -> str:
    """A range of row ids as verify and the writer's log name it: `7`, or `7..9`."""
    return str(first) if first == last else f"{first}..{last}"
