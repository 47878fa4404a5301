"""Backup and restore of the vault and ledger databases (docs/operations.md, "Backup and restore")."""

from aegisd.backup.archive import CHUNK, InvalidBackup, Manifest, read_backup, tar_stream
from aegisd.backup.restore import restore
from aegisd.backup.snapshot import take_snapshot
from aegisd.backup.staging import clear_leftovers, scratch

__all__ = ["CHUNK", "InvalidBackup", "Manifest", "clear_leftovers", "read_backup", "restore",
           "scratch", "take_snapshot", "tar_stream"]
