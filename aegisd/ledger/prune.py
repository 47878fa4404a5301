"""`ledger prune`: delete the oldest rows and move the chain's start to an authenticated checkpoint.

It runs in the writer's thread (LedgerWriter.run_exclusive), one chunk at a time, so it never races a
group commit and appends wait for at most one chunk. A first pass reads every row to prune and refuses the
prune, with nothing deleted, if one does not verify: a prune never launders a tampered range, or a forged
checkpoint, into an authentic checkpoint. The second pass checks each chunk again as it deletes it, in one
transaction that moves the checkpoint forward with the rows, so the ledger verifies after every chunk, even
if aegisd dies half-way; should a chunk fail there (the file changed, or the disk failed, between the
passes), the result says how far the prune got, for the caller to record.
"""

from __future__ import annotations

import functools
import hmac
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, replace

from aegisd.ledger.chain import SELECT_CHAIN, ChainStart, VerifyResult, chain_start, row_mac
from aegisd.ledger.checkpoint import write_checkpoint
from aegisd.ledger.entry import now_ms
from aegisd.ledger.query import not_utf8
from aegisd.ledger.schema import LedgerError
from aegisd.ledger.writer import LedgerWriter

CHUNK_ROWS = 10_000  # rows per transaction: a few tens of milliseconds of the writer's time
_NEXT_ID = (
    "SELECT max(coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'ledger'), 0), "
    "coalesce((SELECT max(id) FROM ledger), 0)) + 1"
)


class PruneRefused(LedgerError):
    """The rows to prune do not verify; deleting them would destroy the evidence."""


class KeyMissing(LedgerError):
    """The chain key is not known yet (the vault has not been unlocked since aegisd started)."""


class LedgerReplaced(LedgerError):
    """A restore moved another ledger into place during the prune: what was pruned is not in the ledger now."""


@dataclass(frozen=True, slots=True)
class PruneResult:
    """pruned rows were deleted; the chain now starts at first_kept_id (checkpoint_id None: nothing to do)."""

    pruned: int
    first_kept_id: int
    checkpoint_id: int | None
    unchained: int = 0  # of the pruned rows, those without a MAC (only when the caller accepted them)
    stopped: LedgerError | None = None  # a chunk of the second pass failed: first_kept_id is where the chain starts


@dataclass
class _Progress:
    before_ms: int
    time_ms: int
    include_unchained: bool = False
    first_kept_id: int | None = None  # fixed by the first pass, so rows appended meanwhile never count
    pruned: int = 0
    checkpoint_id: int | None = None
    unchained: int = 0
    chain_start: int | None = None  # the first row left once the last chunk committed
    checked_to: int | None = None  # the first pass: the next row to read ...
    checked_mac: bytes = b""  # ... and the MAC it chains from


async def prune(writer: LedgerWriter, before_ms: int, *, chunk_rows: int = CHUNK_ROWS,
                include_unchained: bool = False) -> PruneResult:
    """Delete every row before the first one recorded at or after before_ms (ids, hence the chain, stay gapless).

    A row recorded earlier but committed after that one (a long request) is kept with it. A row in that range
    with no MAC refuses the prune unless include_unchained: the operator has seen it in `ledger verify` and
    lets it go (nothing vouched for it; the chain runs past it). Every other row must verify, or the prune is
    refused (PruneRefused) before anything is deleted. A failure after some chunks were deleted is not raised
    but returned (`stopped`), with what was done.
    """
    if chunk_rows < 1:
        raise ValueError("chunk_rows must be at least 1")
    progress = _Progress(before_ms, now_ms(), include_unchained)
    restores = writer.restores
    check = functools.partial(_job, writer, restores, _check_chunk, progress, chunk_rows)
    while not await writer.run_exclusive(check):
        pass
    chunk = functools.partial(_job, writer, restores, _prune_chunk, progress, chunk_rows)
    try:
        while not await writer.run_exclusive(chunk):
            pass
    except LedgerError as exc:
        if not progress.pruned:
            raise
        return _result(progress, exc)
    return _result(progress)


def _result(progress: _Progress, stopped: LedgerError | None = None) -> PruneResult:
    first_kept = progress.chain_start if stopped is not None else progress.first_kept_id
    return PruneResult(progress.pruned, first_kept or 1, progress.checkpoint_id, progress.unchained, stopped)


def _job(writer: LedgerWriter, restores: int, job: Callable[[_Progress, int, sqlite3.Connection, bytes], bool],
         progress: _Progress, chunk_rows: int, conn: sqlite3.Connection, key: bytes | None) -> bool:
    """One chunk of either pass, in the writer's thread: on the file the prune began on, with the key, and with
    SQLite's own errors (a lock held past the busy timeout, a full disk) as LedgerError, which prune reports."""
    if writer.restores != restores:  # the restore swaps the file in this thread, so this is the file in place now
        raise LedgerReplaced("a restore replaced the ledger during the prune; the restored ledger is as its backup "
                             "left it")
    if key is None:
        raise KeyMissing("the ledger key derives from the vault: unlock it once, then prune")
    try:
        return job(progress, chunk_rows, conn, key)
    except sqlite3.Error as exc:
        raise LedgerError(f"the ledger could not be read or written: {exc}") from None


def _check_chunk(progress: _Progress, chunk_rows: int, conn: sqlite3.Connection, key: bytes) -> bool:
    """One chunk of the first pass, which deletes nothing; True when every row to prune has been read."""
    if progress.checked_to is None:
        start = _chain_start(conn, key)
        progress.checked_to, progress.checked_mac = start.first_id, start.prev_mac
        row = conn.execute("SELECT id FROM ledger WHERE time_ms >= ? ORDER BY id LIMIT 1",
                           (progress.before_ms,)).fetchone()
        progress.first_kept_id = row[0] if row else conn.execute(_NEXT_ID).fetchone()[0]
    assert progress.first_kept_id is not None
    if progress.checked_to >= progress.first_kept_id:
        return True
    end = min(progress.first_kept_id, progress.checked_to + chunk_rows)
    progress.checked_mac, _ = _verify_rows(conn, key, progress.checked_mac, progress.checked_to, end,
                                           progress.include_unchained)
    progress.checked_to = end
    return end >= progress.first_kept_id


def _prune_chunk(progress: _Progress, chunk_rows: int, conn: sqlite3.Connection, key: bytes) -> bool:
    """One transaction of the second pass; True when nothing is left to delete."""
    before = replace(progress)
    conn.execute("BEGIN IMMEDIATE")
    try:
        done = _delete_chunk(conn, key, progress, chunk_rows)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.rollback()
        vars(progress).update(vars(before))  # nothing of the chunk happened
        raise
    return done


def _chain_start(conn: sqlite3.Connection, key: bytes) -> ChainStart:
    # Every checkpoint is checked as verify checks them: rows checked against a forged one, then deleted under a
    # genuine one, would launder the deletion it covers.
    start = chain_start(conn, key)
    if isinstance(start, VerifyResult):
        raise PruneRefused(f"{start.reason}; the prune was refused to keep the evidence; see `aegisctl ledger verify`")
    return start


def _delete_chunk(conn: sqlite3.Connection, key: bytes, progress: _Progress, chunk_rows: int) -> bool:
    start = _chain_start(conn, key)
    prev_mac, start_id = start.prev_mac, start.first_id
    target = progress.first_kept_id
    assert target is not None  # the first pass fixed it
    if start_id >= target:
        progress.chain_start = start_id
        return True
    end = min(target, start_id + chunk_rows)
    prev_mac, unchained = _verify_rows(conn, key, prev_mac, start_id, end, progress.include_unchained)
    progress.unchained += unchained
    progress.pruned += conn.execute("DELETE FROM ledger WHERE id < ?", (end,)).rowcount
    # Move our own checkpoint forward; if another prune wrote a newer one meanwhile, start a new one after it.
    ours = start.checkpoint_id == progress.checkpoint_id  # both None: no checkpoint yet, so a new one
    progress.checkpoint_id = write_checkpoint(
        conn, key, cp_id=progress.checkpoint_id if ours else None, time_ms=progress.time_ms, first_kept_id=end,
        prev_mac=prev_mac, pruned=progress.pruned)
    progress.chain_start = end
    return end >= target


def _verify_rows(conn: sqlite3.Connection, key: bytes, prev_mac: bytes, start_id: int, end: int,
                 include_unchained: bool) -> tuple[bytes, int]:
    """Check rows start_id..end-1 chain on from prev_mac; the last one's MAC, and how many had none (let go)."""
    mac_of = row_mac(key)
    expected, unchained = start_id, 0
    try:
        for row in conn.execute(f"{SELECT_CHAIN} WHERE id >= ? AND id < ? ORDER BY id", (start_id, end)):
            row_id, values, mac = row[0], row[1:-1], row[-1]
            if mac is None and row_id == expected and include_unchained:  # the chain runs past it
                unchained += 1
                expected = row_id + 1
                continue
            try:
                good = row_id == expected and isinstance(mac, bytes) and hmac.compare_digest(
                    mac, mac_of(prev_mac, row_id, values))
            except (TypeError, ValueError):
                good = False
            if not good:
                if mac is None and row_id == expected:
                    raise PruneRefused(f"row {row_id} is not chained (no MAC), so the prune was refused; see `aegisctl "
                                       "ledger verify`, and prune with --include-unchained to let such rows go")
                raise PruneRefused(f"row {min(row_id, expected)} does not verify, so the prune was refused to keep "
                                   "the evidence; see `aegisctl ledger verify`")
            prev_mac, expected = mac, row_id + 1
    except sqlite3.OperationalError as exc:
        if not not_utf8(exc):
            raise
        raise PruneRefused(f"a row before row {end} holds text that is not UTF-8, which aegisd never writes (the file "
                           "was edited), so the prune was refused to keep the evidence; see `aegisctl ledger verify`"
                           ) from None
    if expected != end:
        raise PruneRefused(f"rows {expected}..{end - 1} are missing, so the prune was refused to keep the "
                           "evidence; see `aegisctl ledger verify`")
    return prev_mac, unchained
