"""Private scratch directories inside the data directory for snapshots and incoming restores.

They live beside the databases so the final rename is atomic (same file system) and the sandbox that
lets aegisd write its data directory covers them; leftovers from a crash are removed on the next use.
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

PREFIXES = (".backup-", ".restore-")


def clear_leftovers(data_dir: Path) -> None:
    """Remove scratch directories a crashed backup or restore left behind (call with none running)."""
    for prefix in PREFIXES:
        for path in data_dir.glob(f"{prefix}*"):
            shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def scratch(data_dir: Path, prefix: str) -> Iterator[Path]:
    """A fresh 0700 directory in the data directory, removed with everything in it afterwards."""
    path = data_dir / f"{prefix}{secrets.token_hex(6)}"
    path.mkdir(mode=0o700)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
