"""Deleted key material leaves the vault's files, in-process on a real vault database, as on a stock SQLite.

SQLite's default build only marks a deleted cell free; this host's (Debian's) overwrites it. Each test here makes
sqlite3.connect behave as a stock build does (`secure_delete` off on every new connection, before aegisd's own
setup), removes or replaces key material, and searches the files' raw bytes for what was deleted. The end-to-end
tests (tests/e2e/test_deleted_key_material.py) do the same through a real aegisd and aegisctl.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from aegisd.backup.restore import _keep_live_key_slots
from aegisd.store import VaultStore
from aegisd.vault import crypto
from aegisd.vault.credentials import Credential
from aegisd.vault.unlock_key_format import new_unlock_key
from aegisd.vault.vault import Vault
from tests.harness import PASSPHRASE

CHEAP = crypto.argon2_settings(19, 2)
NEW = "another long passphrase 9921"
SECRET = "sk-live-unit-deleted-secret-0123456789"


@pytest.fixture
def stock_sqlite(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every connection opened from here on starts with SQLite's default secure_delete (off)."""
    connect = sqlite3.connect

    def stock_connect(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        conn: sqlite3.Connection = connect(*args, **kwargs)
        conn.execute("PRAGMA secure_delete = 0")
        return conn

    monkeypatch.setattr(sqlite3, "connect", stock_connect)
    assert sqlite3.connect(":memory:").execute("PRAGMA secure_delete").fetchone()[0] == 0


@pytest.fixture
def vault(tmp_path: Path, stock_sqlite: None) -> Iterator[Vault]:
    store = VaultStore(tmp_path / "vault.db")
    store.open()
    vault = Vault(store, CHEAP)
    vault.init(PASSPHRASE, create_unlock_key=True, unlock_key=new_unlock_key())
    vault.add_credential(Credential(id="", name="svc", service="svc", domains=["svc.example"]), SECRET)
    yield vault
    store.close()


def store_of(vault: Vault) -> VaultStore:
    return vault._store


def material(path: Path, query: str) -> list[bytes]:
    """The values of `query`'s columns in the file at `path`, read through a connection of its own."""
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        values = [bytes(value) for row in conn.execute(query) for value in row]
    finally:
        conn.close()
    assert values
    return values


SLOTS = "SELECT salt, nonce, wrapped FROM key_slots WHERE kind = '{}'"


def files_holding(values: list[bytes], *paths: Path) -> list[str]:
    """Which of `paths` (and their -wal) hold any of `values`."""
    found = []
    for path in paths:
        for candidate in (path, Path(f"{path}-wal")):
            if candidate.exists():
                data = candidate.read_bytes()
                found += [f"{candidate.name}@{data.find(v)}" for v in values if v in data]
    return found


@pytest.mark.parametrize("change", ["remove", "replace", "passphrase"])
def test_a_retired_slot_leaves_the_vault_files(vault: Vault, change: str) -> None:
    path = store_of(vault).path
    retired = material(path, SLOTS.format("passphrase" if change == "passphrase" else "unlock_key"))
    if change == "remove":
        assert vault.remove_unlock_keys(PASSPHRASE) == 1
    elif change == "replace":
        assert vault.replace_unlock_key(PASSPHRASE, new_unlock_key()) == 1
    else:
        vault.change_passphrase(PASSPHRASE, NEW)
    assert files_holding(retired, path) == []
    backup = path.parent / "copy.db"
    store_of(vault).backup_to(backup)
    assert files_holding(retired, backup) == []


def test_a_rotated_or_removed_secret_leaves_the_vault_files(vault: Vault) -> None:
    path = store_of(vault).path
    query = "SELECT nonce, ciphertext FROM credentials WHERE name = 'svc'"
    sealed = material(path, query)
    vault.rotate_credential("svc", "sk-live-unit-rotated-secret-9876543210")
    assert files_holding(sealed, path) == []
    sealed += material(path, query)
    vault.remove_credential("svc")
    assert files_holding(sealed, path) == []


def leave_residue(vault: Vault) -> list[bytes]:
    """Delete the unlock key's slot the way an older aegisd did on a stock SQLite: the bytes stay in the file."""
    store = store_of(vault)
    retired = material(store.path, SLOTS.format("unlock_key"))
    with store.transaction() as conn:
        conn.execute("PRAGMA secure_delete = 0")  # what the older aegisd's connection had
        conn.execute("DELETE FROM key_slots WHERE kind = 'unlock_key'")
    assert files_holding(retired, store.path), "the residue this test is about was not left"
    return retired


def test_a_backup_carries_no_residue_from_before_the_fix(vault: Vault) -> None:
    retired = leave_residue(vault)
    backup = store_of(vault).path.parent / "copy.db"
    backup.touch(mode=0o600)  # as the snapshot makes it
    store_of(vault).backup_to(backup)
    assert files_holding(retired, backup) == []
    conn = sqlite3.connect(backup)
    try:  # a whole, self-contained vault: every row, no log beside it, no free page
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
        assert conn.execute("PRAGMA freelist_count").fetchone()[0] == 0
        assert conn.execute("PRAGMA quick_check").fetchone()[0] == "ok"
        assert conn.execute("SELECT count(*) FROM credentials").fetchone()[0] == 1
        assert conn.execute("SELECT value FROM meta WHERE key = 'vault_id'").fetchone()[0] == vault.vault_id
    finally:
        conn.close()
    assert not Path(f"{backup}-wal").exists()
    assert backup.stat().st_mode & 0o777 == 0o600


def test_opening_a_vault_clears_residue_from_before_the_fix(vault: Vault) -> None:
    retired = leave_residue(vault)
    store = store_of(vault)
    store.close()
    store.open()
    assert files_holding(retired, store.path) == []
    assert Vault(store, CHEAP).unlock(passphrase=PASSPHRASE)


def test_a_restore_overwrites_the_backups_slots_it_replaces(vault: Vault) -> None:
    """A backup of this vault taken while a leaked unlock key was in it, restored after the key was removed: the
    restored file gets the live slots, and the backup's old slot is not left in it."""
    store = store_of(vault)
    leaked = material(store.path, SLOTS.format("unlock_key"))
    staged = store.path.parent / "staged.db"
    store.backup_to(staged)
    assert files_holding(leaked, staged)
    vault.remove_unlock_keys(PASSPHRASE)
    assert _keep_live_key_slots(store, staged, vault.vault_id)
    assert files_holding(leaked, staged) == []


def test_a_key_change_clears_residue_from_before_the_fix(vault: Vault) -> None:
    """A vault that kept running since an older aegisd left residue: the operator's next key change clears it."""
    retired = leave_residue(vault)
    vault.change_passphrase(PASSPHRASE, NEW)
    assert files_holding(retired, store_of(vault).path) == []
