"""A restore's swap when the disk fails after the ledger's rename: in process, with the daemon's own vault,
store and ledger writer, because only a patched fsync can make that step fail on demand."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import shutil
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

import aegisd.ledger.writer as writer_module
from aegisd.backup import restore, take_snapshot, tar_stream
from aegisd.errors import AegisError, StorageFull, StorageUnavailable
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
        archive, _ = await backup_of_another_vault(tmp_path, LedgerEntry.system("in the backup"))
        store, vault, ledger = await daemon_parts(tmp_path / "a")
        vault_a = vault.vault_id
        await ledger.append(LedgerEntry.system("live"))
        vault.lock()

        def fsync_fails(directory: Path) -> None:
            raise OSError(errno.EIO, os.strerror(errno.EIO))

        async def chunks() -> AsyncIterator[bytes]:
            yield archive

        async def recorded(restored: Any) -> None:  # the ledger has moved: the service records even this
            halfway.append(restored.failed_half_way)

        halfway: list[str] = []
        monkeypatch.setattr(writer_module, "fsync_directory", fsync_fails)
        with pytest.raises(StorageUnavailable) as failed:
            await restore(tmp_path / "a", vault, store, ledger, chunks(), recorded, passphrase=lambda: PASSPHRASE)
        assert halfway == [failed.value.message]
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
        archive, _ = await backup_of_another_vault(tmp_path)
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


async def backup_of_another_vault(tmp_path: Path, *rows: LedgerEntry) -> tuple[bytes, str | None]:
    """A backup (and the vault id) of a second daemon's data under tmp_path/b, its ledger holding `rows` too."""
    store_b, vault_b, ledger_b = await daemon_parts(tmp_path / "b")
    for row in rows:
        await ledger_b.append(row)
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir(mode=0o700)
    manifest = take_snapshot(store_b, tmp_path / "b" / "ledger.db", snapshot)
    archive = b"".join(tar_stream(manifest, snapshot, 0))
    await ledger_b.close()
    store_b.close()
    return archive, vault_b.vault_id


def test_a_restored_vault_that_fails_to_open_is_reported_restored_and_opens_at_the_next_use(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Found by a cold review: when opening the moved-in vault failed (a full disk), the restore said "the ledger
    was replaced but the vault was not" (it was), recorded nothing, and every later call said "vault.db is not
    open" until a restart. Now it says both files are the backup's, records the restore, and the store opens the
    file at its next use once it can."""
    caplog.set_level(logging.DEBUG)

    async def main() -> tuple[str, list[str], str | None, str | None, str]:
        archive, vault_b = await backup_of_another_vault(tmp_path)
        store, vault, ledger = await daemon_parts(tmp_path / "a")
        vault.lock()
        real_open, calls = store.open, []

        def open_once_failing() -> None:
            calls.append(1)
            if len(calls) == 1:
                raise StorageFull("the disk holding the data directory is full; free some space and retry")
            real_open()

        async def chunks() -> AsyncIterator[bytes]:
            yield archive

        recorded: list[str] = []

        async def record(restored: Any) -> None:
            recorded.append(restored.manifest.vault_id)

        store.open = open_once_failing  # type: ignore[method-assign]
        with pytest.raises(StorageUnavailable) as failed:
            await restore(tmp_path / "a", vault, store, ledger, chunks(), record, passphrase=lambda: PASSPHRASE)
        with store.reading() as conn:  # the next use opens it
            stored = conn.execute("SELECT value FROM meta WHERE key = 'vault_id'").fetchone()[0]
        await ledger.close()
        store.close()
        return failed.value.message, recorded, vault_b, vault.vault_id, stored

    message, recorded, vault_b, vault_now, stored = asyncio.run(main())
    assert message.startswith("the backup was restored (the vault and ledger files are the backup's), but the "
                              "restored vault cannot be opened: the disk holding the data directory is full")
    assert recorded == [vault_b] and vault_now == vault_b and stored == vault_b
    assert not list((tmp_path / "a").glob(".restore-*"))
    for text in (message, caplog.text):
        assert PASSPHRASE not in text


def test_a_restore_whose_client_stops_sending_is_given_up_and_changes_nothing(tmp_path: Path) -> None:
    """Found by a cold review: a client that stopped sending held the one-at-a-time backup lock forever."""

    async def main() -> tuple[type[BaseException], str, str | None, str | None]:
        archive, _ = await backup_of_another_vault(tmp_path)
        store, vault, ledger = await daemon_parts(tmp_path / "a")
        vault_a = vault.vault_id
        vault.lock()

        async def stalls() -> AsyncIterator[bytes]:
            yield archive[:4096]
            await asyncio.Event().wait()

        with pytest.raises(AegisError) as failed:
            await asyncio.wait_for(restore(tmp_path / "a", vault, store, ledger, stalls(),
                                           passphrase=lambda: PASSPHRASE, idle_timeout=0.3), 10)
        with store.reading() as conn:
            stored = conn.execute("SELECT value FROM meta WHERE key = 'vault_id'").fetchone()[0]
        await ledger.close()
        store.close()
        return type(failed.value), failed.value.message, vault_a, stored

    kind, message, vault_a, stored = asyncio.run(main())
    assert kind.__name__ == "ClientStalled"
    assert message == ("no data from the client for 0.3 s; the restore was abandoned and nothing was changed: send "
                       "the file again")
    assert stored == vault_a
    assert not list((tmp_path / "a").glob(".restore-*"))


def test_a_restore_client_that_trickles_is_given_up_at_the_upload_deadline(tmp_path: Path) -> None:
    """Found by a cold review: the 60 s wait was per chunk, so a client sending a byte every 59 s held the one
    backup-or-restore turn for as long as it liked. The whole upload now has a deadline too."""

    async def main() -> tuple[type[BaseException], str, str | None, str | None]:
        archive, _ = await backup_of_another_vault(tmp_path)
        store, vault, ledger = await daemon_parts(tmp_path / "a")
        vault_a = vault.vault_id
        vault.lock()

        async def trickles() -> AsyncIterator[bytes]:
            for offset in range(len(archive)):
                yield archive[offset:offset + 1]
                await asyncio.sleep(0.05)  # well inside the idle timeout, every time

        with pytest.raises(AegisError) as failed:
            await asyncio.wait_for(restore(tmp_path / "a", vault, store, ledger, trickles(),
                                           passphrase=lambda: PASSPHRASE, idle_timeout=0.3, upload_deadline=0.6), 10)
        with store.reading() as conn:
            stored = conn.execute("SELECT value FROM meta WHERE key = 'vault_id'").fetchone()[0]
        await ledger.close()
        store.close()
        return type(failed.value), failed.value.message, vault_a, stored

    kind, message, vault_a, stored = asyncio.run(main())
    assert kind.__name__ == "ClientStalled"
    assert message == ("the client did not send the whole file within 0.6 s; the restore was abandoned and nothing "
                       "was changed: send the file again")
    assert stored == vault_a
    assert not list((tmp_path / "a").glob(".restore-*"))


def test_a_restore_upload_is_refused_past_a_third_of_the_free_disk(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by a cold review: the upload had no size cap, so a socket holder could fill the disk the live ledger
    writes to (the gate then forwards nothing). A restore needs about twice the file's size while it checks it;
    an upload may take at most a third of the space free when it starts, so a third is always left."""
    real_usage = shutil.disk_usage

    async def main() -> tuple[BaseException, str | None, str | None, int]:
        archive, _ = await backup_of_another_vault(tmp_path)
        store, vault, ledger = await daemon_parts(tmp_path / "a")
        vault_a = vault.vault_id
        vault.lock()
        cap = len(archive) - 1

        def disk_usage(path: str | os.PathLike[str]) -> Any:
            usage = real_usage(path)
            return type(usage)(usage.total, usage.used, 3 * cap + 2)

        async def chunks() -> AsyncIterator[bytes]:
            for offset in range(0, len(archive), 4096):
                yield archive[offset:offset + 4096]

        monkeypatch.setattr(shutil, "disk_usage", disk_usage)
        with pytest.raises(AegisError) as failed:
            await restore(tmp_path / "a", vault, store, ledger, chunks(), passphrase=lambda: PASSPHRASE)
        with store.reading() as conn:
            stored = conn.execute("SELECT value FROM meta WHERE key = 'vault_id'").fetchone()[0]
        await ledger.close()
        store.close()
        return failed.value, vault_a, stored, cap

    error, vault_a, stored, cap = asyncio.run(main())
    assert isinstance(error, StorageFull), error
    assert error.message.startswith(f"the backup is larger than {cap} bytes, a third of the space free on the disk "
                                    f"holding {tmp_path / 'a'}"), error.message
    assert "nothing was changed" in error.message
    assert stored == vault_a
    assert not list((tmp_path / "a").glob(".restore-*"))
