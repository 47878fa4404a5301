"""A new unlock key for `init --unlock-key-out` and `unlock-key new --out`: made here, kept safe, then sent.

aegisctl makes the key (secrets travel inward only) and writes it to its file (0600, a new file, synced)
before it asks aegisd to use it. So the key that may open the vault is never lost with a call that is
cut off: when aegisd refuses, the file goes; when the outcome is unknown (no answer in time, the daemon
gone mid-call, Ctrl-C), the file stays and aegisctl says the vault may already use it.
"""

from __future__ import annotations

import base64
import contextlib
import os
import secrets
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, TypeVar

import click

from aegisctl.client import ClientError
from aegisctl.private_file import private_output, sync_directory

# Refusals aegisd makes before it changes anything: only after one of these does the new key open nothing.
# Any other failure (no answer, the daemon gone, an internal error) may have come after the change.
# vault_changed: the vault changed while the passphrase was checked, so aegisd changed nothing (VaultChanged);
# key_slot_damaged: no key slot could be read, so none was opened, let alone replaced.
REFUSED_BEFORE_CHANGE = frozenset({"invalid_argument", "wrong_passphrase", "vault_exists", "vault_uninitialized",
                                   "unimplemented", "passphrase_required", "vault_changed", "key_slot_damaged"})
# The form aegisd takes and checks (aegisd/vault/unlock_key_format.py; the proto's ReplaceUnlockKeyRequest).
UNLOCK_KEY_PREFIX, KEY_BYTES = "aegis-unlock-", 32
T = TypeVar("T")


class UnlockKeyOut:
    """The new key, and where it goes: FILE, or '-' for stdout once aegisd has taken it."""

    def __init__(self, path: str) -> None:
        if not path:  # never taken for "no key wanted": the user asked for one
            raise click.UsageError("the unlock key needs a file path, or '-' for stdout; the path given is empty")
        self.path = path
        self.key = new_unlock_key()
        self.sent = self.printed = False
        if path != "-":
            _write_new_file(Path(path), self.key + "\n")

    def send(self, call: Callable[[str], T]) -> T:
        """Make the call that hands the key to aegisd; from here on a failure may leave it in use. Call `taken`
        right after it returns."""
        self.sent = True
        return call(self.key)

    def taken(self, theirs: str | None = None) -> None:
        """aegisd has the key: on stdout it is printed now. `theirs`: a key aegisd made itself (an older aegisd
        ignores the one sent to init), which is then the one to keep."""
        if theirs and theirs != self.key:
            if self.path != "-":
                try:
                    _replace_file(Path(self.path), theirs + "\n")
                except (OSError, ClientError):  # the file still holds the ignored key: put aegisd's elsewhere
                    self.printed = _print_key(theirs, to_file=True)
            self.key = theirs
        if self.path == "-":
            self.printed = _print_key(self.key)

    def delivered(self) -> str:
        """The line that tells the user where the key aegisd took is."""
        if self.path == "-":
            return "Store this unlock key now; it is not shown again."
        return f"Unlock key written to {self.path} (mode 0600). It is not shown again."


def require_path(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """The option's callback: an empty FILE is a usage error at parse time, before anything is made or asked
    (an empty path would otherwise read as "no unlock key")."""
    if value is not None and not value:
        raise click.BadParameter("an empty path; give a file to create, or '-' for stdout")
    return value


def new_unlock_key() -> str:
    """256 random bits, printable, with a prefix that says what they are."""
    return UNLOCK_KEY_PREFIX + base64.urlsafe_b64encode(secrets.token_bytes(KEY_BYTES)).decode().rstrip("=")


@contextlib.contextmanager
def unlock_key_out(path: str | None) -> Iterator[UnlockKeyOut | None]:
    """Yield the new key (None without a path); on a refusal remove its file, on an unknown outcome keep it."""
    out = UnlockKeyOut(path) if path is not None else None
    try:
        yield out
    except BaseException as exc:
        if out is not None:
            refused = isinstance(exc, ClientError) and exc.reason in REFUSED_BEFORE_CHANGE
            if not out.sent or refused:  # never sent, or aegisd said no: this key opens nothing
                if out.path != "-":
                    Path(out.path).unlink(missing_ok=True)
            else:
                _keep(out)
        raise


def _keep(out: UnlockKeyOut) -> None:
    """The call's outcome is unknown: the vault may already use this key, so it must not be lost."""
    where = f"is kept in {out.path}" if out.path != "-" else "was printed on stdout"
    if out.path == "-" and not out.printed:
        out.printed = _print_key(out.key)
    click.echo(f"aegisctl: the new unlock key {where}: aegisd may have taken it before the call was cut off "
               "(`aegisctl unlock --unlock-key-stdin` on a locked vault tells)", err=True)


def _print_key(key: str, to_file: bool = False) -> bool:
    """On stdout alone (KEY=$(aegisctl ... -) works). If stdout cannot take it (closed, or a broken pipe), into a
    new 0600 file whose path goes to stderr: never the key itself on stderr, which often ends in a log."""
    if not to_file and sys.stdout is not None:  # with fd 1 closed it is None, and click.echo would drop the key
        try:
            click.echo(key)
            return True
        except OSError:
            pass
    fd, name = tempfile.mkstemp(prefix="aegis-unlock-key-", suffix=".txt")
    with os.fdopen(fd, "w") as fh:
        _write_synced(fh, key + "\n")
    click.echo(f"aegisctl: the unlock key aegisd now uses is in {name} (mode 0600)", err=True)
    return True


def _replace_file(path: Path, text: str) -> None:
    """Put `text` in place of the file's content by a rename (0600), so no moment leaves it empty."""
    with private_output(path, text=True) as out:
        out.file.write(text)


def _write_synced(fh: IO[str], text: str) -> None:
    fh.write(text)
    fh.flush()
    os.fsync(fh.fileno())


def _write_new_file(path: Path, text: str) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise click.UsageError(f"{path} already exists; choose a new file for the unlock key") from None
    except OSError as exc:
        raise click.UsageError(f"cannot create the unlock key file {path}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "w") as fh:
            _write_synced(fh, text)
    except BaseException as exc:  # a full disk, or Ctrl-C: no partial file left to block the path
        path.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise click.UsageError(f"cannot write the unlock key file {path}: {exc.strerror}; nothing was "
                                   "changed") from None
        raise
    sync_directory(path.absolute().parent)  # the new name's durability; the key itself is synced
