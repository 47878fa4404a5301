"""`aegisctl passphrase`: change the passphrase that opens the vault."""

from __future__ import annotations

import click

from aegisctl.context import Context, pass_context
from aegisctl.secrets_input import read_new_passphrase, read_secret
from aegisd.api.aegis.v1 import vault_pb2


@click.command("passphrase")
@click.option("--passphrase-stdin", is_flag=True,
              help="Read the current passphrase from stdin's first line and the new one from its second.")
@pass_context
def command(ctx: Context, passphrase_stdin: bool) -> None:
    """Change the vault's passphrase (locked or unlocked, it stays as it is).

    Backup files taken before still open, offline, with the old passphrase; restoring one of this vault
    into aegisd keeps the new one.
    """
    client = ctx.client
    client.require_initialized()  # before three passphrases are typed for nothing
    current = read_secret("current passphrase", passphrase_stdin, flag="--passphrase-stdin")
    new = read_new_passphrase("new passphrase", passphrase_stdin, "--passphrase-stdin", client.weak_passphrase)
    client.call(client.vault.ChangePassphrase,
                vault_pb2.ChangePassphraseRequest(current=current, new_passphrase=new), timeout=120)
    click.echo("Passphrase changed. Backup files taken before still hold the old one; `aegisctl restore` of one "
               "into this vault keeps the new one.")
