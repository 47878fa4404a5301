"""`aegisctl unlock`: open the vault with the passphrase or an unlock key."""

from __future__ import annotations

import click

from aegisctl.context import Context, pass_context
from aegisctl.secrets_input import read_secret
from aegisd.api.aegis.v1 import vault_pb2


@click.command("unlock")
@click.option("--passphrase-stdin", is_flag=True, help="Read the passphrase from stdin's first line.")
@click.option("--unlock-key-stdin", is_flag=True, help="Read an unlock key (not the passphrase) from stdin.")
@pass_context
def command(ctx: Context, passphrase_stdin: bool, unlock_key_stdin: bool) -> None:
    """Unlock the vault so the gate can inject credentials."""
    if passphrase_stdin and unlock_key_stdin:
        raise click.UsageError("use either --passphrase-stdin or --unlock-key-stdin, not both")
    client = ctx.client
    if client.status().state == vault_pb2.VAULT_STATE_UNLOCKED:
        click.echo("The vault is already unlocked.")
        return
    if unlock_key_stdin:
        request = vault_pb2.UnlockRequest(unlock_key=read_secret("unlock key", True, flag="--unlock-key-stdin"))
    else:
        request = vault_pb2.UnlockRequest(
            passphrase=read_secret("passphrase", passphrase_stdin, flag="--passphrase-stdin"))
    client.call(client.vault.Unlock, request, timeout=120)
    click.echo("Vault unlocked.")
