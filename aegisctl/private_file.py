"""Output files the way a security tool writes them: owner-only from the first byte, and atomic.

The data goes to a temporary file beside the target (created 0600 by mkstemp), is fsynced, and is
renamed over the target only when complete, so a failed or interrupted export or backup leaves no
partial file behind and never a file others can read.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from aegisctl.client import ClientError


class PrivateOutput:
    """The open temporary file, and where it is until it is renamed into place."""

    def __init__(self, file: IO[Any], temp_path: Path) -> None:
        self.file = file
        self.temp_path = temp_path


@contextlib.contextmanager
def private_output(path: Path, *, text: bool) -> Iterator[PrivateOutput]:
    """Yield a temporary file for `path`; on a clean exit it replaces `path` (mode 0600), else it is removed."""
    target = path.expanduser().absolute()
    if target.is_dir():
        raise ClientError(f"{path} is a directory", "name a file to write")
    try:
        fd, temp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial")
    except OSError as exc:
        raise ClientError(f"cannot write in {target.parent}: {exc.strerror or exc}",
                          "choose a directory that exists and that you can write to") from None
    temp_path = Path(temp)
    try:
        fh: IO[Any] = os.fdopen(fd, "w", newline="", encoding="utf-8") if text else os.fdopen(fd, "wb")
        with fh:
            yield PrivateOutput(fh, temp_path)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(temp_path, target)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            temp_path.unlink()
        if isinstance(exc, OSError):
            raise ClientError(f"cannot write {path}: {exc.strerror or exc}", "nothing was written; check the "
                              "disk space and permissions, then retry") from None
        raise
    sync_directory(target.parent)  # durability of the rename; the data itself is already synced


def sync_directory(directory: Path) -> None:
    """fsync a directory, so a name just created or renamed in it survives a crash; best effort."""
    with contextlib.suppress(OSError):
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
