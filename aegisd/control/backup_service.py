"""aegis.v1.BackupService: stream a consistent backup out, and a backup back in.

The bytes travel over the control socket so that aegisctl, as the operator, writes and reads the file:
the daemon may run as its own user in a sandbox that could not reach the operator's path anyway.
One backup or restore at a time.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import grpc

from aegisd.api.aegis.v1 import backup_pb2 as pb
from aegisd.api.aegis.v1 import backup_pb2_grpc
from aegisd.backup import clear_leftovers, restore, scratch, take_snapshot, tar_stream
from aegisd.backup.archive import Manifest
from aegisd.backup.restore import Restored
from aegisd.backup.snapshot import DamagedDatabase
from aegisd.cancellation import outlive_cancellation
from aegisd.control.errors import rpc, stream_rpc
from aegisd.errors import StorageUnavailable, WrongPassphrase
from aegisd.ledger import LedgerEntry, LedgerError
from aegisd.ledger.chain import RESTORED
from aegisd.ledger.entry import iso_time
from aegisd.runtime import Runtime

Ctx = grpc.aio.ServicerContext[Any, Any]
log = logging.getLogger("aegisd.control")


class BackupService(backup_pb2_grpc.BackupServiceServicer):
    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime
        self.data_dir = runtime.config.data_dir
        self._busy = asyncio.Lock()
        self.idle_timeout: float | None = None  # a restore's wait for the next chunk; None: restore.IDLE_TIMEOUT

    @stream_rpc
    async def Backup(self, request: pb.BackupRequest, context: Ctx) -> AsyncGenerator[pb.BackupChunk, None]:
        async with self._busy:
            await asyncio.to_thread(clear_leftovers, self.data_dir)
            with scratch(self.data_dir, ".backup-") as directory:
                try:
                    manifest = await outlive_cancellation(asyncio.to_thread(
                        take_snapshot, self.rt.store, self.data_dir / "ledger.db", directory))
                    chunks = tar_stream(manifest, directory, manifest.created_ms // 1000)
                    while (data := await outlive_cancellation(asyncio.to_thread(next, chunks, None))) is not None:
                        yield pb.BackupChunk(data=data)
                except DamagedDatabase as exc:  # refused before anything was sent: aegisctl writes no file
                    self.rt.log_event("backup refused", level=logging.WARNING, why=exc.message)
                    raise
                except OSError as exc:
                    raise StorageUnavailable(f"cannot write the snapshot in {self.data_dir}: "
                                             f"{exc.strerror or exc}") from None
            self.rt.log_event("backup taken", vault_id=manifest.vault_id, ledger_rows=manifest.counts["ledger_rows"])

    @rpc
    async def Restore(self, request_iterator: AsyncIterator[pb.RestoreChunk], context: Ctx) -> pb.RestoreResponse:
        async with self._busy:
            await asyncio.to_thread(clear_leftovers, self.data_dir)

            given: list[str] = []  # the passphrase of the vault in place, sent with the first chunk if at all

            async def chunks() -> AsyncIterator[bytes]:
                async for chunk in request_iterator:
                    if chunk.passphrase and not given:
                        given.append(chunk.passphrase)
                    yield chunk.data

            # Recorded as part of the restore: a swap that outlives its client is still put in the ledger.
            try:
                restored = await restore(self.data_dir, self.rt.vault, self.rt.store, self.rt.ledger, chunks(),
                                         self._record, lambda: given[0] if given else "", self.idle_timeout)
            except WrongPassphrase:
                self.rt.log_event("restore refused: wrong passphrase for the vault in place", level=logging.WARNING)
                raise
            manifest = restored.manifest
        if self.rt.ledger.failing:  # the restored ledger was moved into place but cannot be opened or written
            raise StorageUnavailable("the backup was restored, but its ledger cannot be written (see aegisd's log: a "
                                     "full disk, or a ledger that cannot take another row), so the gate forwards "
                                     "nothing until it can; free the disk, or restore a good backup")
        counts = manifest.counts
        return pb.RestoreResponse(vault_id=manifest.vault_id, created_ms=_int64(manifest.created_ms),
                                  credentials=counts["credentials"], agents=counts["agents"],
                                  ledger_rows=counts["ledger_rows"], kept_key_slots=restored.kept_key_slots)

    async def _record(self, restored: Restored) -> None:
        """Log and record a swap that happened, whole or half-way; nothing in here may fail, whatever the manifest
        says."""
        manifest = restored.manifest
        created = f"{_when(manifest.created_ms)} as its manifest states it"
        newest = _newest_row(manifest)
        if restored.failed_half_way:  # the restore's error is logged already; this row is the ledger's record
            detail = (f"a restore failed half-way: the ledger was replaced by the one in a backup taken {created} "
                      f"(vault {manifest.vault_id}; {newest}), so rows written after the backup was taken are gone, "
                      f"but the vault was not replaced; the error: {restored.failed_half_way}")
            try:
                await self.rt.ledger.append(LedgerEntry.system(detail, reason="backup_restore_incomplete"))
            except LedgerError as exc:
                log.error("the restore failed half-way and could not be recorded in the ledger: %s", exc)
            return
        kept = "; the vault kept its current passphrase and unlock keys" if restored.kept_key_slots else ""
        detail = f"restored from a backup taken {created} (vault {manifest.vault_id}; {newest}){kept}"
        if restored.vault_not_opened:
            detail += f"; the restored vault could not be opened yet ({restored.vault_not_opened})"
        tip = manifest.newest_chained
        self.rt.log_event("backup restored", vault_id=manifest.vault_id, backup_created=_when(manifest.created_ms),
                          newest_chained_row=tip.id if tip else None,
                          newest_chained_time=_when(tip.time_ms) if tip and tip.time_ms is not None else None,
                          kept_key_slots=restored.kept_key_slots)
        try:
            await self.rt.ledger.append(LedgerEntry.system(detail, reason=RESTORED))
        except LedgerError as exc:
            log.error("the restore succeeded but could not be recorded in the ledger: %s", exc)


def _newest_row(manifest: Manifest) -> str:
    """The restored ledger's newest chained row, for the restore's record: the manifest's time is only what the file
    says (no checksum covers it), while this row's id and time are under its MAC, which `aegisctl ledger verify`
    checks once the vault is unlocked. So a restored backup cannot claim to be newer than the ledger it holds."""
    tip = manifest.newest_chained
    if tip is None:
        return "its ledger holds no chained row"
    written = _when(tip.time_ms) if tip.time_ms is not None else "at a time that is not a number"
    return f"its ledger's newest chained row is {tip.id}, written {written}"


def _when(time_ms: int) -> str:
    """The backup's creation time for the log and ledger; the manifest bounds it, and a swap that happened is
    recorded even if it were out of range."""
    try:
        return iso_time(time_ms)
    except (ValueError, OverflowError, OSError):
        return f"at an unreadable time ({time_ms} ms)"


def _int64(value: int) -> int:
    return value if 0 <= value < 2**63 else 0
