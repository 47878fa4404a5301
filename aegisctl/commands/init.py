"""`aegisctl init`: create the vault, optionally with an unlock key for unattended starts."""

from __future__ import annotations

import os

import click

from aegisctl.context import Context, pass_context
from aegisctl.secrets_input import read_secret
from aegisd.api.aegis.v1 import vault_pb2


@click.command("init")
@click.option("--passphrase-stdin", is_flag=True, help="Read the passphrase from stdin's first line.")
@click.option("--unlock-key-out", metavar="FILE|-",
              help="Also create an unlock key and write it to FILE (created 0600) or '-' for stdout. "
                   "It is shown once; systemd can load it with LoadCredentialEncrypted.")
@pass_context
def command(ctx: Context, passphrase_stdin: bool, unlock_key_out: str | None) -> None:
    """Create the vault and leave it unlocked."""
    # Create the key file before the vault exists, so a bad path cannot leave a slot whose key is lost.
    key_fd = _create_key_file(unlock_key_out) if unlock_key_out and unlock_key_out != "-" else None
    try:
        client = ctx.client
        client.require_state("uninitialized")  # before the passphrase is typed twice for nothing
        passphrase = read_secret("passphrase", passphrase_stdin, confirm=True, flag="--passphrase-stdin")
        reply = client.call(client.vault.Init,
                            vault_pb2.InitRequest(passphrase=passphrase, create_unlock_key=bool(unlock_key_out)),
                            timeout=120)
    except BaseException:
        if key_fd is not None and unlock_key_out:
            os.close(key_fd)
            os.unlink(unlock_key_out)
        raise
    # With the key on stdout, stdout holds the key alone, so `KEY=$(aegisctl init --unlock-key-out -)` works.
    click.echo(f"Vault {reply.vault_id} created and unlocked.", err=unlock_key_out == "-")
    if unlock_key_out == "-":
        click.echo(reply.unlock_key)
        click.echo("Store this unlock key now; it is not shown again.", err=True)
    elif key_fd is not None:
        with os.fdopen(key_fd, "w") as fh:
            fh.write(reply.unlock_key + "\n")
        click.echo(f"Unlock key written to {unlock_key_out} (mode 0600). It is not shown again.")


def _create_key_file(path: str) -> int:
    try:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise click.UsageError(f"{path} already exists; choose a new file for the unlock key") from None
    except OSError as exc:
        raise click.UsageError(f"cannot create the unlock key file {path}: {exc.strerror}") from None
