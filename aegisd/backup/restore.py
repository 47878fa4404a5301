"""Restoring a backup into the running daemon, while its vault is locked or not yet created.

Order: refuse if unlocked; receive the archive into a scratch directory; check all of it
(archive.read_backup); only then, holding the vault's lock so nothing can unlock or init meanwhile,
check what the vault's swap needs (the staged file opens for writing, the live one is in no other
process), leave a mark a crash from here on cannot hide (interrupted.py), then swap the ledger (in its
writer thread, between commits) and the vault database (under the store's lock), each by an atomic
rename, and re-read the vault. No restart is needed: the vault comes back locked, and the next unlock
keys the restored ledger's chain.

A backup of the vault that is in place comes back with the key slots that vault has now: its current
passphrase and unlock keys, not the backup's. Another vault's backup over an existing vault needs that
vault's passphrase. Otherwise a restore, which needs only the control socket, would undo a passphrase
change or a replaced unlock key (bringing a leaked one back) without the passphrase that `aegisctl
passphrase` and `unlock-key` demand: directly, or in two steps through another vault.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import shutil
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aegisd.backup import interrupted
from aegisd.backup.archive import LEDGER_DB, VAULT_DB, Manifest, read_backup
from aegisd.backup.staging import scratch
from aegisd.cancellation import outlive_cancellation
from aegisd.errors import AegisError, FailedPrecondition, Kind, StorageFull, StorageUnavailable, log_safe
from aegisd.ledger import LedgerError, LedgerWriter, ReplaceIncomplete
from aegisd.store import ReplacedNotOpened, VaultStore, connect_for_writing
from aegisd.vault.vault import Vault

log = logging.getLogger("aegisd.backup")


def require_not_unlocked(vault: Vault) -> None:
    """Restore replaces what an unlocked vault is using; the operator locks it first."""
    if vault.state == "unlocked":
        raise FailedPrecondition("the vault is unlocked; lock it first (`aegisctl lock`), then restore",
                                 reason="vault_unlocked")


@dataclass
class Restored:
    """What came back: the backup's manifest, and whether the vault kept its current key slots (a backup of
    the same vault) or has the backup's (another vault's backup, or none was in place)."""

    manifest: Manifest
    kept_key_slots: bool = False
    vault_not_opened: str = ""  # why the restored vault, in place, could not be opened yet ("" if it was)
    ledger_replaced: bool = False  # the backup's ledger was moved into place (the old one is gone)
    failed_half_way: str = ""  # why the restore failed after the ledger had been replaced ("" if it did not)


async def restore(data_dir: Path, vault: Vault, store: VaultStore, ledger: LedgerWriter,
                  chunks: AsyncIterator[bytes], recorded: Callable[[Restored], Awaitable[None]] | None = None,
                  passphrase: Callable[[], str] = str, idle_timeout: float | None = None,
                  upload_deadline: float | None = None) -> Restored:
    """Receive, check, and swap in a backup; nothing changes unless every check passes.

    Once the swap has begun it runs to its end (and `recorded` after it) even if the caller is cancelled:
    the client going away then cannot leave the data directory half restored. `recorded` is also called when
    the swap fails after the backup's ledger has replaced the old one (`failed_half_way` says why): that is a
    change too. `passphrase` gives the passphrase of the vault in place, once every chunk has been read (it
    comes with them). A client that sends nothing for `idle_timeout` seconds (IDLE_TIMEOUT by default), or has
    not sent the whole file within `upload_deadline` seconds (UPLOAD_DEADLINE), or sends more than a third of the
    space free on the data directory's disk, is given up on before anything changed.
    """
    require_not_unlocked(vault)
    loop = asyncio.get_running_loop()
    with scratch(data_dir, ".restore-") as directory:
        archive = directory / "archive.tar"
        try:
            limit = shutil.disk_usage(data_dir).free // 3
            await _receive(chunks, archive, idle_timeout, upload_deadline, limit, data_dir)
            manifest = await outlive_cancellation(asyncio.to_thread(read_backup, archive, directory))
        except OSError as exc:
            raise _disk_error(exc, data_dir) from None

        restored = Restored(manifest)
        marked_here = False  # this restore wrote the mark (not an earlier, cut-off one's, kept until one completes)

        def swap() -> None:
            if vault.vault_id is not None and manifest.vault_id != vault.vault_id:
                _require_passphrase(vault, passphrase())
            restored.kept_key_slots = _keep_live_key_slots(store, directory / VAULT_DB, vault.vault_id)
            try:
                store.check_replaceable(directory / VAULT_DB)
            except AegisError as exc:
                exc.message = f"nothing was restored: {exc.message}"
                exc.args = (exc.message,)
                raise
            nonlocal marked_here
            try:  # from here a crash must leave a trace (interrupted.py)
                marked_here = interrupted.mark(data_dir, manifest.created_ms, manifest.vault_id,
                                               time.time_ns() // 1_000_000)
            except OSError as exc:
                raise StorageUnavailable(f"nothing was restored: cannot write {interrupted.MARK} in the data "
                                         f"directory: {exc.strerror or exc}") from None
            try:
                asyncio.run_coroutine_threadsafe(ledger.replace_file(directory / LEDGER_DB), loop).result()
            except ReplaceIncomplete as exc:
                restored.ledger_replaced = True
                raise StorageUnavailable(f"the restore failed half-way: {exc}; the vault was not replaced: run the "
                                         "restore again") from None
            except LedgerError as exc:
                raise StorageUnavailable(f"nothing was restored: {exc}") from None
            restored.ledger_replaced = True
            try:
                store.replace_with(directory / VAULT_DB)
            except ReplacedNotOpened:
                vault.vault_id = manifest.vault_id  # what the file in place holds (checked), not the old vault's
                raise
            except (OSError, AegisError) as exc:
                why = exc.message if isinstance(exc, AegisError) else exc.strerror or str(exc)
                raise StorageUnavailable(f"the restore failed half-way: the ledger was replaced but the vault "
                                         f"was not ({why}); run the restore again") from None

        async def record() -> None:
            if recorded is not None:
                try:
                    await recorded(restored)
                except Exception as exc:  # reported in the log; the restore itself stands
                    log.error("the restore was %s but recording it failed: %s",
                              "begun" if restored.failed_half_way else "completed", log_safe(exc))

        async def swap_and_record() -> None:
            try:
                await asyncio.to_thread(vault.reopen, swap)
            except ReplacedNotOpened as exc:
                restored.vault_not_opened = exc.message
            except Exception as exc:
                if restored.ledger_replaced:  # the old ledger is gone: say so in the log and in the one in place
                    restored.failed_half_way = log_safe(exc)
                    log.error("a restore failed after the backup's ledger had replaced the old one (rows written "
                              "since the backup was taken are gone): %s", restored.failed_half_way)
                    await record()
                if restored.ledger_replaced or marked_here:  # recorded; or nothing changed, and the mark is ours
                    await asyncio.to_thread(interrupted.clear, data_dir)
                raise
            await record()  # both files are the backup's now: the restore is done, whatever else fails
            await asyncio.to_thread(interrupted.clear, data_dir)  # and recorded (an earlier cut-off one's mark too)
            if restored.vault_not_opened:
                raise StorageUnavailable(
                    f"the backup was restored (the vault and ledger files are the backup's), but the restored vault "
                    f"cannot be opened: {restored.vault_not_opened}; fix that and run `aegisctl status`, which opens "
                    "it again (or restart aegisd)")

        await outlive_cancellation(swap_and_record(), _orphaned_swap)
    return restored


def _require_passphrase(vault: Vault, passphrase: str) -> None:
    """Another vault's backup replaces what opens this one: only with this one's passphrase (nothing changed yet)."""
    if not passphrase:
        raise FailedPrecondition(f"the backup is of another vault than the one in place ({vault.vault_id}); replacing "
                                 "it changes what opens the vault, so it needs that vault's passphrase",
                                 reason="passphrase_required")
    vault.verify_passphrase(passphrase)


def _keep_live_key_slots(store: VaultStore, staged: Path, live_vault_id: str | None) -> bool:
    """If the staged vault is the live one (same vault id), put the live key slots into it in place of its own.

    Runs first in the swap, under the vault's lock, so a failure here leaves everything as it was.
    """
    try:
        # Deleting the backup's slots overwrites them (a retired key the backup held must not stay in the restored
        # file's free space); whatever else the backup left there goes when the store opens the file (VACUUM).
        with contextlib.closing(connect_for_writing(staged, isolation_level=None)) as conn:
            row = conn.execute("SELECT value FROM meta WHERE key = 'vault_id'").fetchone()
            if live_vault_id is None or row is None or row[0] != live_vault_id:
                return False
            with store.reading() as live:
                slots = live.execute(f"SELECT {_SLOT_COLUMNS} FROM key_slots ORDER BY id").fetchall()  # noqa: S608
            if not any(kind == "passphrase" for kind in (slot[1] for slot in slots)):
                raise StorageUnavailable("the vault in place has no passphrase slot to keep; nothing was restored")
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("DELETE FROM key_slots")
            conn.executemany(f"INSERT INTO key_slots ({_SLOT_COLUMNS}) VALUES (?,?,?,?,?,?,?,?)", slots)  # noqa: S608
            conn.execute("COMMIT")
            conn.execute("PRAGMA journal_mode = DELETE")  # fold any write-ahead log into the file that is moved
            if conn.execute(f"SELECT {_SLOT_COLUMNS} FROM key_slots ORDER BY id").fetchall() != slots:  # noqa: S608
                raise StorageUnavailable("nothing was restored: the backup's key slots did not become the vault's")
    except sqlite3.Error as exc:
        raise StorageUnavailable(f"nothing was restored: cannot carry the vault's key slots into the backup ({exc})"
                                 ) from None
    return True


_SLOT_COLUMNS = "id, kind, kdf, params, salt, nonce, wrapped, created_at"


def _orphaned_swap(outcome: asyncio.Future[Any]) -> None:
    """How a swap ended whose client went away: only the log can say it now."""
    error = None if outcome.cancelled() else outcome.exception()
    if outcome.cancelled() or error is not None:
        why = error.message if isinstance(error, AegisError) else repr(error) if error else "cancelled"
        log.error("a restore whose client went away (cancelled, or past its deadline) failed during the swap: %s",
                  why)
    else:
        log.warning("a restore whose client went away (cancelled, or past its deadline) was completed: the vault "
                    "and ledger are the backup's, locked; unlock with the passphrase the vault had before (a backup "
                    "of the same vault) or the one the backup had (another vault's)")


IDLE_TIMEOUT = 60.0  # seconds a restore waits for the client's next chunk before it gives up
# Seconds the whole upload may take: aegisctl's own deadline for the restore call, so no restore aegisctl could
# finish is cut, and no client holds the one backup-or-restore turn longer by sending a byte every minute.
UPLOAD_DEADLINE = 3600.0


class ClientStalled(AegisError):
    """The client stopped sending mid-restore; waiting longer would keep every other backup and restore out."""

    kind = Kind.UNAVAILABLE
    reason = "client_stalled"


async def _receive(chunks: AsyncIterator[bytes], path: Path, idle_timeout: float | None, upload_deadline: float | None,
                   limit: int, data_dir: Path) -> None:
    """Write the client's chunks to `path`: each within the idle timeout, all within the deadline, at most `limit`
    bytes (a third of the free space: the archive and the databases staged from it take about twice its size,
    and the live ledger, written all the while, keeps the rest)."""
    idle = IDLE_TIMEOUT if idle_timeout is None else idle_timeout
    deadline = UPLOAD_DEADLINE if upload_deadline is None else upload_deadline
    ends = asyncio.get_running_loop().time() + deadline
    stream = aiter(chunks)
    received = 0
    with path.open("xb") as fh:
        while True:
            left = ends - asyncio.get_running_loop().time()
            try:
                data = await asyncio.wait_for(anext(stream), max(0.0, min(idle, left)))
            except StopAsyncIteration:
                return
            except TimeoutError:
                if left <= idle:
                    raise ClientStalled(f"the client did not send the whole file within {deadline:g} s; the restore "
                                        "was abandoned and nothing was changed: send the file again") from None
                raise ClientStalled(f"no data from the client for {idle:g} s; the restore was abandoned and "
                                    "nothing was changed: send the file again") from None
            received += len(data)
            if received > limit:
                raise StorageFull(f"the backup is larger than {limit} bytes, a third of the space free on the disk "
                                  f"holding {data_dir} (a restore needs about twice the backup's size free, and the "
                                  "ledger keeps the rest); nothing was changed: free some space, then restore again")
            await outlive_cancellation(asyncio.to_thread(fh.write, data))


def _disk_error(exc: OSError, data_dir: Path) -> StorageFull | StorageUnavailable:
    if exc.errno == errno.ENOSPC:
        return StorageFull(f"the disk holding {data_dir} is full; restore needs about twice the backup's size free")
    return StorageUnavailable(f"cannot stage the backup in {data_dir}: {exc.strerror or exc}")
