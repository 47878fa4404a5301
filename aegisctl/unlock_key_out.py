"""Where an unlock key goes when the daemon hands one out (init, unlock-key new): shown once, never lost.

The file is created (0600, and only if it does not exist) before the daemon makes the key, so a bad
path fails while nothing has changed; a failed call removes it again.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

import click


@contextlib.contextmanager
def unlock_key_out(path: str | None) -> Iterator[Callable[[str], str]]:
    """Yield `deliver(key) -> what to tell the user`, for `path` ('-' is stdout, None writes nothing).

    The file exists from the start of the block; if the block raises, it is removed.
    """
    fd = _create(path) if path and path != "-" else None
    delivered = False

    def deliver(key: str) -> str:
        nonlocal delivered
        delivered = True
        if path == "-":
            click.echo(key)
            return "Store this unlock key now; it is not shown again."
        assert fd is not None
        with os.fdopen(fd, "w") as fh:
            fh.write(key + "\n")
        return f"Unlock key written to {path} (mode 0600). It is not shown again."

    try:
        yield deliver
    except BaseException:
        if fd is not None and path and not delivered:
            os.close(fd)
            os.unlink(path)
        raise


def _create(path: str) -> int:
    try:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise click.UsageError(f"{path} already exists; choose a new file for the unlock key") from None
    except OSError as exc:
        raise click.UsageError(f"cannot create the unlock key file {path}: {exc.strerror}") from None
