"""Taking a backup: consistent copies of vault.db and ledger.db.

The vault is copied under the store's lock (it is small), rebuilt from its rows (`VACUUM INTO`, one read
transaction) so the copy carries no free space: a key slot deleted where SQLite left the bytes in place
(an older aegisd) is not in it. The ledger is copied with SQLite's online backup API from its own read
connection in one backup step, which in WAL mode is one read snapshot and never blocks the ledger's
writer, so the gate keeps serving (and recording) throughout. The two copies are each consistent; rows
the gate commits between the two copies are simply in the ledger copy or not.

Before anything is sent, both copies go through the checks a restore makes of them (a ledger with damaged
pages copies page by page without complaint): a backup that would be refused when it is needed fails now,
while the operator can still run `aegisctl doctor` and repair the live files.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
from pathlib import Path

from aegisd import __version__
from aegisd.backup.archive import DATABASES, LEDGER_DB, VAULT_DB, InvalidBackup, Manifest, check_databases, file_digest
from aegisd.errors import StorageCorrupt, StorageFull, StorageUnavailable, VaultUninitialized
from aegisd.ledger import LedgerError, now_ms, open_reader
from aegisd.store import VaultStore


class DamagedDatabase(StorageCorrupt):
    """A database in the data directory fails a check a restore makes, so a backup of it would be refused."""

    reason = "database_damaged"


def _create_private(path: Path) -> None:
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


def take_snapshot(store: VaultStore, ledger_path: Path, directory: Path) -> Manifest:
    """Write vault.db and ledger.db copies into `directory` and return the manifest describing them.

    Raises StorageFull, before anything is written, if the copies could take more than half the free space
    there, and DamagedDatabase if a copy fails a check a restore would make of it."""
    _check_room([store.path, ledger_path, ledger_path.with_name(ledger_path.name + "-wal")], directory)
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


def _check_room(sources: list[Path], directory: Path) -> None:
    """The copies share their disk with the live ledger, which the gate writes all the while: copies that filled
    it would make its commits fail, and the requests those held were already forwarded, so their rows would be
    lost. A backup may take at most half of the free space (as a restore, a third for its upload); the rest is the
    ledger's."""
    needed = sum(path.stat().st_size for path in sources if path.exists())
    free = shutil.disk_usage(directory).free
    if needed > free // 2:
        raise StorageFull(f"a backup copies both databases first, about {needed} bytes, more than half of the "
                          f"{free} bytes free on the disk holding {directory.parent} (the live ledger, written all "
                          "the while, keeps the rest); nothing was written: free some space, then back up again")


def _describe(directory: Path, created: int) -> Manifest:
    """The manifest, read from the copies themselves (once they pass a restore's checks) so it matches what is
    sent."""
    try:
        found = check_databases(directory, "")
    except InvalidBackup as exc:
        # Each message starts with the file's name: "ledger.db fails its integrity check (...)".
        name = next((name for name in DATABASES if exc.message.startswith(f"{name} ")), "a database")
        why = exc.message.removeprefix(f"{name} ")
        raise DamagedDatabase(f"{name} is damaged: it {why}; no backup was written, as a restore would refuse it: see "
                              "`aegisctl doctor`") from None
    if found.vault_id is None:
        raise VaultUninitialized()
    members = {name: file_digest(directory / name) for name in DATABASES}
    return Manifest(created, __version__, found.vault_id, found.vault_schema_version, found.ledger_schema_version,
                    members, found.counts, found.newest_chained)
