"""A restore's swap when the disk fails after the ledger's rename: in process, with the daemon's own vault,
store and ledger writer, because only a patched fsync can make that step fail on demand."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

import aegisd.ledger.writer as writer_module
from aegisd.backup import restore, take_snapshot, tar_stream
from aegisd.errors import StorageUnavailable
from aegisd.ledger import LedgerEntry, LedgerWriter, query_rows
from aegisd.store import VaultStore
from aegisd.vault.vault import Vault

PASSPHRASE = "correct horse battery staple 42"


async def daemon_parts(root: Path) -> tuple[VaultStore, Vault, LedgerWriter]:
    root.mkdir(mode=0o700)
    store = VaultStore(root / "vault.db")
    store.open()
    vault = Vault(store)
    ledger = LedgerWriter(root / "ledger.db")
    await ledger.start()
    await asyncio.to_thread(vault.init, PASSPHRASE, False)
    ledger.set_key(bytes(vault.master().subkey("ledger")))
    return store, vault, ledger


def test_a_restore_whose_ledger_moved_but_was_not_made_durable_says_it_failed_half_way(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Found by a cold review: the restore said "nothing was restored" although the ledger had been replaced,
    and the writer kept the old vault's key for the backup's ledger."""
    caplog.set_level(logging.DEBUG)

    async def main() -> tuple[str, str | None, str | None, bytes | None]:
        store_b, _, ledger_b = await daemon_parts(tmp_path / "b")
        await ledger_b.append(LedgerEntry.system("in the backup"))
        snapshot = tmp_path / "snapshot"
        snapshot.mkdir(mode=0o700)
        manifest = take_snapshot(store_b, tmp_path / "b" / "ledger.db", snapshot)
        archive = b"".join(tar_stream(manifest, snapshot, 0))
        await ledger_b.close()
        store_b.close()

        store, vault, ledger = await daemon_parts(tmp_path / "a")
        vault_a = vault.vault_id
        await ledger.append(LedgerEntry.system("live"))
        vault.lock()

        def fsync_fails(directory: Path) -> None:
            raise OSError(errno.EIO, os.strerror(errno.EIO))

        async def chunks() -> AsyncIterator[bytes]:
            yield archive

        monkeypatch.setattr(writer_module, "fsync_directory", fsync_fails)
        with pytest.raises(StorageUnavailable) as failed:
            await restore(tmp_path / "a", vault, store, ledger, chunks(), passphrase=lambda: PASSPHRASE)
        key = ledger.key
        await ledger.close()
        store.close()
        return failed.value.message, vault_a, vault.vault_id, key

    message, vault_a, vault_now, key = asyncio.run(main())
    assert message == ("the restore failed half-way: the restored ledger was moved into place, but making the move "
                       "durable (fsync of the data directory) failed: Input/output error; the vault was not "
                       "replaced: run the restore again")
    assert vault_now == vault_a  # the vault was left alone, as the message says
    assert [r.detail for r in query_rows(tmp_path / "a" / "ledger.db")] == ["in the backup"]  # the ledger was not
    assert key is None  # so the old vault's key is gone
    assert not list((tmp_path / "a").glob(".restore-*"))
    for text in (message, caplog.text):
        assert PASSPHRASE not in text


def test_a_vault_whose_old_log_cannot_be_removed_is_not_swapped(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by a cold review: the vault file was moved first and its old -wal removed after, so a -wal that
    could not be removed was replayed by SQLite onto the restored file. Now nothing moves until it is gone."""

    async def main() -> tuple[str, str | None, str | None]:
        store_b, _, ledger_b = await daemon_parts(tmp_path / "b")
        snapshot = tmp_path / "snapshot"
        snapshot.mkdir(mode=0o700)
        manifest = take_snapshot(store_b, tmp_path / "b" / "ledger.db", snapshot)
        archive = b"".join(tar_stream(manifest, snapshot, 0))
        await ledger_b.close()
        store_b.close()

        store, vault, ledger = await daemon_parts(tmp_path / "a")
        vault_a = vault.vault_id
        vault.lock()
        real_unlink = os.unlink

        def unlink(path: str | os.PathLike[str], **kwargs: Any) -> None:
            if str(path).endswith("vault.db-wal"):
                raise OSError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            real_unlink(path, **kwargs)

        async def chunks() -> AsyncIterator[bytes]:
            yield archive

        monkeypatch.setattr(os, "unlink", unlink)
        with pytest.raises(StorageUnavailable) as failed:
            await restore(tmp_path / "a", vault, store, ledger, chunks(), passphrase=lambda: PASSPHRASE)
        monkeypatch.undo()
        await ledger.close()
        with store.reading() as conn:
            stored = conn.execute("SELECT value FROM meta WHERE key = 'vault_id'").fetchone()[0]
        store.close()
        return failed.value.message, vault_a, stored

    message, vault_a, stored = asyncio.run(main())
    assert message == ("the restore failed half-way: the ledger was replaced but the vault was not (Permission "
                       "denied); run the restore again")
    assert stored == vault_a  # the old vault file, opened again whole


def test_a_vault_read_by_another_process_is_not_swapped(store: VaultStore, tmp_path: Path) -> None:
    """A reader elsewhere (an operator's sqlite3 shell) keeps the log from being folded in; removing it then
    would lose the old file's last writes if the move failed, so the swap stops first and says why."""
    staged = tmp_path / "staged.db"
    staged.write_bytes(b"not moved")
    with store.transaction() as conn:
        conn.execute("INSERT INTO meta (key, value) VALUES ('probe', 'kept')")
    reader = sqlite3.connect(store.path)
    try:
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM meta").fetchone()
        with pytest.raises(StorageUnavailable, match="is open in another process"):
            store.replace_with(staged)
    finally:
        reader.close()
    assert staged.read_bytes() == b"not moved"
    with store.reading() as conn:
        assert conn.execute("SELECT value FROM meta WHERE key = 'probe'").fetchone()[0] == "kept"
