"""`aegisctl lock`: wipe key material from the daemon; the gate refuses traffic until unlocked."""

from __future__ import annotations

import click

from aegisctl.context import Context, pass_context
from aegisd.api.aegis.v1 import vault_pb2


@click.command("lock")
@pass_context
def command(ctx: Context) -> None:
    """Lock the vault."""
    client = ctx.client
    client.call(client.vault.Lock, vault_pb2.LockRequest())
    click.echo("Vault locked.")
