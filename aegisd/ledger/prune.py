"""`ledger prune`: delete the oldest rows and move the chain's start to an authenticated checkpoint.

It runs in the writer's thread (LedgerWriter.run_exclusive), one chunk at a time, so it never races a
group commit and appends wait for at most one chunk. Each chunk is one transaction that deletes rows
and moves the checkpoint forward with them, so the ledger verifies after every chunk, even if aegisd
dies half-way. Rows, and every checkpoint, are verified before rows are deleted: a prune never launders a
tampered range, or a forged checkpoint, into an authentic checkpoint.
"""

from __future__ import annotations

import functools
import hmac
import sqlite3
from dataclasses import dataclass

from aegisd.ledger.chain import SELECT_CHAIN, VerifyResult, chain_start, row_mac
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


@dataclass(frozen=True, slots=True)
class PruneResult:
    """pruned rows were deleted; the chain now starts at first_kept_id (checkpoint_id None: nothing to do)."""

    pruned: int
    first_kept_id: int
    checkpoint_id: int | None
    unchained: int = 0  # of the pruned rows, those without a MAC (only when the caller accepted them)


@dataclass
class _Progress:
    before_ms: int
    time_ms: int
    include_unchained: bool = False
    first_kept_id: int | None = None  # fixed by the first chunk, so rows appended meanwhile never count
    pruned: int = 0
    checkpoint_id: int | None = None
    unchained: int = 0


async def prune(writer: LedgerWriter, before_ms: int, *, chunk_rows: int = CHUNK_ROWS,
                include_unchained: bool = False) -> PruneResult:
    """Delete every row before the first one recorded at or after before_ms (ids, hence the chain, stay gapless).

    A row recorded earlier but committed after that one (a long request) is kept with it. A row in that range
    with no MAC refuses the prune unless include_unchained: the operator has seen it in `ledger verify` and
    lets it go (nothing vouched for it; the chain runs past it). Every other row must verify.
    """
    if chunk_rows < 1:
        raise ValueError("chunk_rows must be at least 1")
    progress = _Progress(before_ms, now_ms(), include_unchained)
    chunk = functools.partial(_prune_chunk, progress, chunk_rows)
    while not await writer.run_exclusive(chunk):
        pass
    return PruneResult(progress.pruned, progress.first_kept_id or 1, progress.checkpoint_id, progress.unchained)


def _prune_chunk(progress: _Progress, chunk_rows: int, conn: sqlite3.Connection, key: bytes | None) -> bool:
    """One transaction of the prune; True when nothing is left to delete."""
    if key is None:
        raise KeyMissing("the ledger key derives from the vault: unlock it once, then prune")
    conn.execute("BEGIN IMMEDIATE")
    try:
        done = _delete_chunk(conn, key, progress, chunk_rows)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.rollback()
        raise
    return done


def _delete_chunk(conn: sqlite3.Connection, key: bytes, progress: _Progress, chunk_rows: int) -> bool:
    # Every checkpoint is checked as verify checks them: rows checked against a forged one, then deleted under a
    # genuine one, would launder the deletion it covers.
    start = chain_start(conn, key)
    if isinstance(start, VerifyResult):
        raise PruneRefused(f"{start.reason}; the prune was refused to keep the evidence; see `aegisctl ledger verify`")
    prev_mac, start_id = start.prev_mac, start.first_id
    if progress.first_kept_id is None:
        row = conn.execute("SELECT id FROM ledger WHERE time_ms >= ? ORDER BY id LIMIT 1",
                           (progress.before_ms,)).fetchone()
        progress.first_kept_id = row[0] if row else conn.execute(_NEXT_ID).fetchone()[0]
    target: int = progress.first_kept_id
    if start_id >= target:
        return True
    end = min(target, start_id + chunk_rows)
    mac_of = row_mac(key)
    expected = start_id
    try:
        for row in conn.execute(f"{SELECT_CHAIN} WHERE id < ? ORDER BY id", (end,)):
            row_id, values, mac = row[0], row[1:-1], row[-1]
            if mac is None and row_id == expected and progress.include_unchained:  # the chain runs past it
                progress.unchained += 1
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
    progress.pruned += conn.execute("DELETE FROM ledger WHERE id < ?", (end,)).rowcount
    # Move our own checkpoint forward; if another prune wrote a newer one meanwhile, start a new one after it.
    ours = start.checkpoint_id == progress.checkpoint_id  # both None: no checkpoint yet, so a new one
    progress.checkpoint_id = write_checkpoint(
        conn, key, cp_id=progress.checkpoint_id if ours else None, time_ms=progress.time_ms, first_kept_id=end,
        prev_mac=prev_mac, pruned=progress.pruned)
    return end >= target
