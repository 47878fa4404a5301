"""The mark a restore leaves in the data directory while it swaps files, so a crash in that window is not silent.

A restore moves the backup's ledger into place, then its vault, then records itself in the ledger. A crash (a
SIGKILL, a power loss) in between leaves the backup's ledger beside the old vault, or both swapped and no record:
rows are gone and nothing says why. The mark, written before the first swap and removed once the restore is
recorded (or known to have changed nothing), tells the next start, which logs it and records it in the ledger,
and `aegisctl doctor`, until a restore completes or the operator removes it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from aegisd.ledger.entry import iso_time
from aegisd.ledger.writer import fsync_directory
from aegisd.policy.memory import NotRegular, read_regular

MARK = "restore-in-progress"
_MAX_BYTES = 4096  # what the mark holds is a few fields; anything larger is not aegisd's


def mark(data_dir: Path, backup_created_ms: int, vault_id: str, now_ms: int) -> bool:
    """Write the mark, durably, before anything is swapped; False if one is there already (an earlier restore's,
    cut off), which is kept as it is: only a restore that completes, or the operator, removes that one."""
    if os.path.lexists(data_dir / MARK):
        return False
    staged = data_dir / f".{MARK}.tmp"
    body = json.dumps({"started_ms": now_ms, "backup_created_ms": backup_created_ms, "vault_id": vault_id})
    fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, body.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(staged, data_dir / MARK)
    try:
        fsync_directory(data_dir)
    except OSError:  # not durable: the restore is refused, and a mark of nothing must not stay
        clear(data_dir)
        raise
    return True


def clear(data_dir: Path) -> None:
    """The restore is recorded, or changed nothing: no mark."""
    (data_dir / MARK).unlink(missing_ok=True)


def cut_off(data_dir: Path) -> str | None:
    """What the mark says of a restore a crash cut off, as a sentence for the log, the ledger and doctor; None if
    there is no mark."""
    path = data_dir / MARK
    try:  # never through a link, never waiting on a FIFO: whoever can write the data directory put it there
        raw = read_regular(path, _MAX_BYTES + 1, follow_symlinks=False)
    except FileNotFoundError:
        return None
    except NotRegular:
        raw = b""  # reported unreadable, below
    except OSError as exc:
        return f"a restore was cut off by a stop, and its mark ({path}) cannot be read: {exc.strerror or exc}"
    try:
        fields = json.loads(raw) if len(raw) <= _MAX_BYTES else {}
        started, created, vault_id = fields["started_ms"], fields["backup_created_ms"], str(fields["vault_id"])
        when = f"begun {iso_time(int(started))}, of a backup of vault {vault_id} taken {iso_time(int(created))}"
    except Exception:  # anything else in the file (deep nesting: RecursionError) is no mark of aegisd's
        when = f"its mark ({path}) is unreadable"
    return (f"a restore was cut off by a stop ({when}): the ledger may be the backup's and the vault the one from "
            "before, or both the backup's with no record of it; rows written after the backup was taken may be gone")


def way_out(data_dir: Path) -> str:
    """What the operator does about a cut-off restore: the log's and doctor's words."""
    return (f"run the restore again (`aegisctl restore FILE`), or, having checked the ledger and the vault, remove "
            f"{data_dir / MARK}")
