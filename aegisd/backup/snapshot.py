"""Taking a backup: consistent copies of vault.db and ledger.db.

The vault is copied under the store's lock (it is small), rebuilt from its rows (`VACUUM INTO`, one read
transaction) so the copy carries no free space: a key slot deleted where SQLite left the bytes in place
(an older aegisd) is not in it. The ledger is copied with SQLite's online backup API from its own read
connection in one backup step, which in WAL mode is one read snapshot and never blocks the ledger's
writer, so the gate keeps serving (and recording) throughout. The two copies are each consistent; rows
the gate commits between the two copies are simply in the ledger copy or not.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from aegisd import __version__
from aegisd.backup.archive import DATABASES, LEDGER_DB, VAULT_DB, Manifest, file_digest
from aegisd.errors import StorageUnavailable, VaultUninitialized
from aegisd.ledger import LedgerError, now_ms, open_reader
from aegisd.store import VaultStore


def _create_private(path: Path) -> None:
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


def take_snapshot(store: VaultStore, ledger_path: Path, directory: Path) -> Manifest:
    """Write vault.db and ledger.db copies into `directory` and return the manifest describing them."""
    created = now_ms()
    vault_copy, ledger_copy = directory / VAULT_DB, directory / LEDGER_DB
    _create_private(vault_copy)
    store.backup_to(vault_copy)
    _create_private(ledger_copy)
    try:
        source = open_reader(ledger_path)
    except LedgerError as exc:
        raise StorageUnavailable(str(exc)) from None
    try:
        target = sqlite3.connect(ledger_copy)
        try:
            source.backup(target)
            target.execute("PRAGMA journal_mode = DELETE")  # self-contained: no -wal beside it
        finally:
            target.close()
    except sqlite3.Error as exc:
        raise StorageUnavailable(f"cannot snapshot the ledger: {exc}") from None
    finally:
        source.close()
    return _describe(directory, created)


def _describe(directory: Path, created: int) -> Manifest:
    """The manifest, read from the copies themselves so it matches what is sent."""
    conn = sqlite3.connect(f"{(directory / VAULT_DB).resolve().as_uri()}?mode=ro", uri=True)
    try:
        row = conn.execute("SELECT value FROM meta WHERE key = 'vault_id'").fetchone()
        if row is None:
            raise VaultUninitialized()
        vault_id = str(row[0])
        vault_version = int(conn.execute("SELECT version FROM schema_version").fetchone()[0])
        counts = {table: int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])  # noqa: S608 - constant
                  for table in ("credentials", "agents", "grants")}
    finally:
        conn.close()
    conn = sqlite3.connect(f"{(directory / LEDGER_DB).resolve().as_uri()}?mode=ro", uri=True)
    try:
        ledger_version = int(conn.execute("SELECT version FROM schema_version").fetchone()[0])
        counts["ledger_rows"] = int(conn.execute("SELECT count(*) FROM ledger").fetchone()[0])
    finally:
        conn.close()
    members = {name: file_digest(directory / name) for name in DATABASES}
    return Manifest(created, __version__, vault_id, vault_version, ledger_version, members, counts)
