"""Prune checkpoints: where the chain starts once old rows are gone, authenticated with the ledger key.

A checkpoint says "rows before first_kept_id were pruned; the last of them had MAC prev_mac". verify
starts from the newest checkpoint instead of genesis. Its own MAC (under a key derived from the ledger
key, so it can never be confused with a row's MAC) covers every column including its id, so an attacker
without the key can neither forge one to hide a deletion nor move one to a later row. Their ids run 1, 2,
3 ... with no gap, so removing one is caught too (chain.chain_start).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import sqlite3
from dataclasses import dataclass

_LABEL = b"aegis ledger checkpoint v1"
_COLUMNS = "id, time_ms, first_kept_id, prev_mac, pruned, mac"


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """One prune: rows with id < first_kept_id are gone; prev_mac is the MAC of the last of them."""

    id: int
    time_ms: int
    first_kept_id: int
    prev_mac: bytes
    pruned: int
    mac: bytes


def checkpoint_mac(key: bytes, cp_id: int, time_ms: int, first_kept_id: int, prev_mac: bytes, pruned: int) -> bytes:
    """The checkpoint's MAC: HMAC-SHA256 under HMAC(ledger key, label) over its canonical JSON form."""
    subkey = hmac.new(key, _LABEL, hashlib.sha256).digest()
    body = json.dumps([cp_id, time_ms, first_kept_id, prev_mac.hex(), pruned], separators=(",", ":"))
    return hmac.new(subkey, body.encode("ascii"), hashlib.sha256).digest()


def is_authentic(key: bytes, cp: Checkpoint) -> bool:
    """Whether the checkpoint was written by a holder of the ledger key, exactly as it is now."""
    stored: tuple[object, ...] = (cp.prev_mac, cp.mac)  # as read from the file: any type at all
    if not all(isinstance(value, bytes) for value in stored):
        return False
    try:
        expected = checkpoint_mac(key, cp.id, cp.time_ms, cp.first_kept_id, cp.prev_mac, cp.pruned)
    except (TypeError, ValueError):  # a column of a type we never write
        return False
    return hmac.compare_digest(cp.mac, expected)


def all_checkpoints(conn: sqlite3.Connection) -> list[Checkpoint]:
    """Every checkpoint, oldest first (one per prune; a handful in practice)."""
    rows = conn.execute(f"SELECT {_COLUMNS} FROM checkpoints ORDER BY id").fetchall()  # noqa: S608 - constant
    return [Checkpoint(*row) for row in rows]


def latest_checkpoint(conn: sqlite3.Connection) -> Checkpoint | None:
    """The checkpoint the chain currently starts from, if any prune has happened."""
    row = conn.execute(f"SELECT {_COLUMNS} FROM checkpoints ORDER BY id DESC LIMIT 1").fetchone()  # noqa: S608
    return Checkpoint(*row) if row else None


def write_checkpoint(
    conn: sqlite3.Connection, key: bytes, *, cp_id: int | None, time_ms: int, first_kept_id: int, prev_mac: bytes,
    pruned: int,
) -> int:
    """Insert a checkpoint (cp_id None) or move an existing one forward; inside the caller's transaction.

    A new one takes the id after the newest, not SQLite's counter (which an edit can move on): verify requires
    ids 1, 2, 3 ... with no gap, so that removing an older checkpoint shows.
    """
    if cp_id is None:
        cursor = conn.execute(
            "INSERT INTO checkpoints (id, time_ms, first_kept_id, prev_mac, pruned, mac) "
            "VALUES ((SELECT coalesce(max(id), 0) + 1 FROM checkpoints), ?, ?, ?, ?, ?)",
            (time_ms, first_kept_id, prev_mac, pruned, b""),
        )
        assert cursor.lastrowid is not None
        cp_id = cursor.lastrowid
    mac = checkpoint_mac(key, cp_id, time_ms, first_kept_id, prev_mac, pruned)
    conn.execute(
        "UPDATE checkpoints SET time_ms = ?, first_kept_id = ?, prev_mac = ?, pruned = ?, mac = ? WHERE id = ?",
        (time_ms, first_kept_id, prev_mac, pruned, mac, cp_id),
    )
    return cp_id
