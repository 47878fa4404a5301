"""The ledger's SQLite file: created 0600, migrated in one transaction, and refused if it is not ours.

Every sqlite3 failure while opening becomes a LedgerError whose message says what is wrong with which
file, so the daemon and the CLI can print it instead of a traceback.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

# Written into the SQLite header (PRAGMA application_id) so any other database is told apart.
APPLICATION_ID = 0x4145474C  # "AEGL"

# MIGRATIONS[n] takes a ledger from schema version n to n + 1. Append new steps; never edit old ones.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        "CREATE TABLE schema_version (version INTEGER NOT NULL)",
        "INSERT INTO schema_version (version) VALUES (0)",
        """CREATE TABLE ledger (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            kind TEXT NOT NULL CHECK (kind IN ('request', 'system')),
            time_ms INTEGER NOT NULL,
            request_id TEXT NOT NULL,
            agent TEXT NOT NULL,
            credential TEXT NOT NULL,
            service TEXT NOT NULL,
            method TEXT NOT NULL,
            path TEXT NOT NULL,
            target_host TEXT NOT NULL,
            decision TEXT NOT NULL CHECK (decision IN ('allowed', 'denied', '')),
            reason TEXT NOT NULL,
            status INTEGER NOT NULL,
            duration_ms REAL NOT NULL,
            bytes_in INTEGER NOT NULL,
            bytes_out INTEGER NOT NULL,
            flags TEXT NOT NULL,
            detail TEXT NOT NULL,
            mac BLOB
        )""",
        "CREATE INDEX ledger_agent ON ledger (agent, id)",
        "CREATE INDEX ledger_service ON ledger (service, id)",
        "CREATE INDEX ledger_credential ON ledger (credential, id)",
        "CREATE INDEX ledger_time ON ledger (time_ms)",
        "CREATE INDEX ledger_denied ON ledger (id) WHERE decision = 'denied'",
        # For a future `prune --before`: verify starts at first_kept_id with prev_mac instead of genesis;
        # the checkpoint carries its own MAC so it cannot be forged to hide a truncation.
        """CREATE TABLE checkpoints (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            time_ms INTEGER NOT NULL,
            first_kept_id INTEGER NOT NULL,
            prev_mac BLOB NOT NULL,
            mac BLOB NOT NULL
        )""",
    ),
    (
        # How many rows each prune removed; covered by the checkpoint's MAC (aegisd.ledger.checkpoint).
        "ALTER TABLE checkpoints ADD COLUMN pruned INTEGER NOT NULL DEFAULT 0",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)


class LedgerError(Exception):
    """The ledger cannot be opened, written or read; the message is safe to show and log."""


def open_writable(path: str | os.PathLike[str], *, busy_timeout_s: float = 5.0) -> sqlite3.Connection:
    """Open (creating 0600 and migrating if needed) the ledger for its single writer."""
    db = Path(path)
    _create_private(db)
    try:
        conn = sqlite3.connect(db, timeout=busy_timeout_s, isolation_level=None)
    except sqlite3.Error as exc:
        raise LedgerError(f"cannot open ledger {db}: {exc}") from None
    try:
        _check_version(conn, db)  # before switching to WAL, so a foreign file is left untouched
        if conn.execute("PRAGMA journal_mode = WAL").fetchone()[0] != "wal":
            raise LedgerError(f"cannot open ledger {db}: WAL journal mode is not available")
        # NORMAL in WAL mode: a committed transaction survives a process crash (kill -9), not power loss.
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA foreign_keys = ON")
        # The writer checkpoints between commits itself (LedgerWriter), never inside one: an automatic
        # checkpoint runs within a COMMIT and holds back the answers of every request in that batch.
        conn.execute("PRAGMA wal_autocheckpoint = 0")
        _migrate(conn, db)
    except LedgerError:
        conn.close()
        raise
    except sqlite3.Error as exc:
        conn.close()
        raise _open_error(db, exc) from None
    return conn


def open_reader(path: str | os.PathLike[str]) -> sqlite3.Connection:
    """A read-only connection for queries and verify, separate from the writer's.

    check_same_thread is off so it may be opened in one thread and used in another (never two at once).
    """
    db = Path(path)
    if not db.is_file():
        raise LedgerError(f"no ledger at {db}")
    try:
        conn = sqlite3.connect(
            f"{db.resolve().as_uri()}?mode=ro", uri=True, isolation_level=None, check_same_thread=False
        )
    except sqlite3.Error as exc:
        raise LedgerError(f"cannot open ledger {db}: {exc}") from None
    try:
        version = _check_version(conn, db)
        if version < SCHEMA_VERSION:
            raise LedgerError(
                f"ledger {db} has schema version {version}, older than {SCHEMA_VERSION}; "
                "start aegisd once to migrate it"
            )
    except LedgerError:
        conn.close()
        raise
    except sqlite3.Error as exc:
        conn.close()
        raise _open_error(db, exc) from None
    return conn


def _create_private(db: Path) -> None:
    """Create the file owner-only before SQLite does; its -wal and -shm files inherit the mode."""
    try:
        fd = os.open(db, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    except OSError as exc:
        raise LedgerError(f"cannot create ledger {db}: {exc.strerror}") from None
    os.close(fd)


def _check_version(conn: sqlite3.Connection, db: Path) -> int:
    """The file's schema version (0 for a brand-new empty file); refuse foreign or newer files."""
    app_id = conn.execute("PRAGMA application_id").fetchone()[0]
    if app_id == 0 and conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0:
        return 0
    if app_id != APPLICATION_ID:
        raise LedgerError(f"{db} is an SQLite database but not an Aegis ledger; refusing to use it")
    row = conn.execute("SELECT version FROM schema_version").fetchone()
    if row is None or not isinstance(row[0], int):
        raise LedgerError(f"ledger {db} has no valid schema version; the file is damaged")
    version: int = row[0]
    if version > SCHEMA_VERSION:
        newest = SCHEMA_VERSION
        raise LedgerError(f"ledger {db} has schema version {version}, newer than {newest}; upgrade aegisd")
    return version


def _migrate(conn: sqlite3.Connection, db: Path) -> None:
    """Apply the missing steps in one transaction, so a crash leaves the old version intact."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = _check_version(conn, db)
        for step in MIGRATIONS[version:]:
            for sql in step:
                conn.execute(sql)
        if version < SCHEMA_VERSION:
            conn.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))
            conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        conn.execute("COMMIT")
    except BaseException:
        conn.rollback()
        raise


def _open_error(db: Path, exc: sqlite3.Error) -> LedgerError:
    if isinstance(exc, sqlite3.DatabaseError) and not isinstance(exc, sqlite3.OperationalError):
        return LedgerError(f"{db} is not an Aegis ledger or is corrupt ({exc})")
    if isinstance(exc, sqlite3.OperationalError) and "no such table" in str(exc):
        return LedgerError(f"ledger {db} is missing its tables; the file is damaged")
    return LedgerError(f"cannot open ledger {db}: {exc}")
