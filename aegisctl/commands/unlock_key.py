"""`aegisctl unlock-key new|remove`: what opens the vault besides the passphrase, after `init`."""

from __future__ import annotations

import click

from aegisctl.context import Context, pass_context
from aegisctl.secrets_input import confirm_destructive, read_secret
from aegisctl.unlock_key_out import require_path, unlock_key_out
from aegisd.api.aegis.v1 import vault_pb2

PASSPHRASE_STDIN = click.option("--passphrase-stdin", is_flag=True,
                                help="Read the passphrase (which proves you may) from stdin's first line.")


@click.group("unlock-key")
def command() -> None:
    """Create or remove the unlock key: a random key that opens the vault at unattended starts."""


@command.command("new")
@click.option("--out", "out", metavar="FILE|-", required=True, callback=require_path,
              help="Write the new key to FILE (created 0600; it must not exist) or '-' for stdout.")
@PASSPHRASE_STDIN
@pass_context
def new(ctx: Context, out: str, passphrase_stdin: bool) -> None:
    """Create an unlock key in place of any the vault has (they stop working). Needs the passphrase."""
    client = ctx.client
    with unlock_key_out(out) as made:  # a path that cannot be written fails here, before anything is asked
        assert made is not None
        client.require_initialized()  # before the passphrase is typed for nothing
        passphrase = read_secret("passphrase", passphrase_stdin, flag="--passphrase-stdin")
        reply = made.send(lambda key: client.call(
            client.vault.ReplaceUnlockKey, vault_pb2.ReplaceUnlockKeyRequest(passphrase=passphrase, unlock_key=key),
            timeout=120))
        made.taken()
    told = made.delivered()
    replaced = f" It replaces {_keys(reply.replaced)}, which no longer open the vault." if reply.replaced else ""
    click.echo(f"New unlock key created.{replaced}", err=out == "-")
    click.echo(told, err=out == "-")


@command.command("remove")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@PASSPHRASE_STDIN
@pass_context
def remove(ctx: Context, yes: bool, passphrase_stdin: bool) -> None:
    """Remove every unlock key: afterwards only the passphrase opens the vault. Needs the passphrase."""
    client = ctx.client
    client.require_initialized()
    confirm_destructive("Remove the vault's unlock keys? A service that starts with one will start locked.", yes)
    passphrase = read_secret("passphrase", passphrase_stdin, flag="--passphrase-stdin")
    reply = client.call(client.vault.RemoveUnlockKeys, vault_pb2.RemoveUnlockKeysRequest(passphrase=passphrase),
                        timeout=120)
    if reply.removed:
        click.echo(f"Removed {_keys(reply.removed)}; only the passphrase opens the vault now.")
    else:
        click.echo("The vault had no unlock key; only the passphrase opens it.")


def _keys(n: int) -> str:
    return "1 unlock key" if n == 1 else f"{n} unlock keys"
