"""Private scratch directories inside the data directory for snapshots and incoming restores.

They live beside the databases so the final rename is atomic (same file system) and the sandbox that
lets aegisd write its data directory covers them; leftovers from a crash are removed at the next start and
on the next use.
Work on them runs in worker threads, which a cancelled RPC cannot stop: aegisd.cancellation's
`outlive_cancellation` keeps the directory (and the caller's lock) until such work has ended.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar

PREFIXES = (".backup-", ".restore-")
T = TypeVar("T")
log = logging.getLogger("aegisd.backup")


def clear_leftovers(data_dir: Path) -> list[str]:
    """Remove scratch directories a crashed backup or restore left behind (call with none running); their names.

    aegisd calls it at start too, once it holds the data directory's lock: a backup's scratch holds a copy of
    vault.db, key slots included, which must not outlive a crash until the next backup or restore (a passphrase
    changed meanwhile would still open that copy)."""
    removed: list[str] = []
    for prefix in PREFIXES:
        for path in data_dir.glob(f"{prefix}*"):
            if path.is_symlink() or not path.is_dir():  # never aegisd's: left alone, and not reported removed
                continue
            shutil.rmtree(path, ignore_errors=True)
            if path.exists():
                log.error("cannot remove %s, which a backup or restore cut off by a stop left behind (it may hold a "
                          "copy of vault.db): remove it by hand", path)
            else:
                removed.append(path.name)
    return removed


@contextlib.contextmanager
def scratch(data_dir: Path, prefix: str) -> Iterator[Path]:
    """A fresh 0700 directory in the data directory, removed with everything in it afterwards."""
    path = data_dir / f"{prefix}{secrets.token_hex(6)}"
    path.mkdir(mode=0o700)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
