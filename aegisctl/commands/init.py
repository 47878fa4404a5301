"""`aegisctl init`: create the vault, optionally with an unlock key for unattended starts."""

from __future__ import annotations

import click

from aegisctl.context import Context, pass_context
from aegisctl.secrets_input import read_secret
from aegisctl.unlock_key_out import unlock_key_out as unlock_key_out_file
from aegisd.api.aegis.v1 import vault_pb2


@click.command("init")
@click.option("--passphrase-stdin", is_flag=True, help="Read the passphrase from stdin's first line.")
@click.option("--unlock-key-out", metavar="FILE|-",
              help="Also create an unlock key and write it to FILE (created 0600) or '-' for stdout. "
                   "It is shown once; systemd can load it with LoadCredentialEncrypted.")
@pass_context
def command(ctx: Context, passphrase_stdin: bool, unlock_key_out: str | None) -> None:
    """Create the vault and leave it unlocked."""
    # The key file is created before the vault exists, so a bad path cannot leave a slot whose key is lost.
    with unlock_key_out_file(unlock_key_out) as deliver:
        client = ctx.client
        client.require_state("uninitialized")  # before the passphrase is typed twice for nothing
        passphrase = read_secret("passphrase", passphrase_stdin, confirm=True, flag="--passphrase-stdin")
        reply = client.call(client.vault.Init,
                            vault_pb2.InitRequest(passphrase=passphrase, create_unlock_key=bool(unlock_key_out)),
                            timeout=120)
        told = deliver(reply.unlock_key) if unlock_key_out else ""
    # With the key on stdout, stdout holds the key alone, so `KEY=$(aegisctl init --unlock-key-out -)` works.
    click.echo(f"Vault {reply.vault_id} created and unlocked.", err=unlock_key_out == "-")
    if told:
        click.echo(told, err=unlock_key_out == "-")
