"""`aegisctl init`: create the vault, optionally with an unlock key for unattended starts."""

from __future__ import annotations

import click

from aegisctl.context import Context, pass_context
from aegisctl.secrets_input import read_new_passphrase
from aegisctl.unlock_key_out import require_path, unlock_key_out
from aegisd.api.aegis.v1 import vault_pb2


@click.command("init")
@click.option("--passphrase-stdin", is_flag=True, help="Read the passphrase from stdin's first line.")
@click.option("--unlock-key-out", "unlock_key_out_path", metavar="FILE|-", callback=require_path,
              help="Also create an unlock key and write it to FILE (created 0600) or '-' for stdout. "
                   "It is shown once; systemd can load it with LoadCredentialEncrypted.")
@pass_context
def command(ctx: Context, passphrase_stdin: bool, unlock_key_out_path: str | None) -> None:
    """Create the vault and leave it unlocked."""
    client = ctx.client
    # The key is made here and written to its file before anything is asked: a bad path fails first, and no
    # slot can outlive its key.
    with unlock_key_out(unlock_key_out_path) as made:
        client.require_state("uninitialized")  # before the passphrase is typed twice for nothing
        passphrase = read_new_passphrase("passphrase", passphrase_stdin, "--passphrase-stdin", client.weak_passphrase)

        def init(key: str) -> vault_pb2.InitResponse:
            return client.call(client.vault.Init, vault_pb2.InitRequest(
                passphrase=passphrase, create_unlock_key=bool(key), unlock_key=key), timeout=120)

        reply = made.send(init) if made else init("")
        if made:
            made.taken(reply.unlock_key or None)
    told = made.delivered() if made else ""
    click.echo(f"Vault {reply.vault_id} created and unlocked.", err=unlock_key_out_path == "-")
    if told:
        click.echo(told, err=unlock_key_out_path == "-")
