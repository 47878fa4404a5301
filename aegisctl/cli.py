"""`aegisctl`: the root command, global options and error handling (exit 0 ok, 1 failed, 2 usage)."""

from __future__ import annotations

import importlib
import sys

import click

from aegisctl import __version__
from aegisctl.client import ClientError
from aegisctl.context import Context
from aegisctl.output import printable

# Each verb and where it lives (a module under aegisctl.commands, and its attribute). A verb's module is
# imported only when it runs: each pulls in its own protobuf messages, and an aegisctl call that imports
# every verb's spends a fifth of its start-up on verbs it does not run.
COMMANDS: dict[str, tuple[str, str]] = {
    "init": ("init", "command"),
    "unlock": ("unlock", "command"),
    "lock": ("lock", "command"),
    "status": ("status", "command"),
    "passphrase": ("passphrase", "command"),
    "unlock-key": ("unlock_key", "command"),
    "vault": ("vault", "command"),
    "agent": ("agent", "command"),
    "grant": ("grant", "grant_command"),
    "revoke": ("grant", "revoke_command"),
    "policy": ("policy", "command"),
    "ledger": ("ledger", "command"),
    "webhook": ("webhook", "command"),
    "mcp": ("mcp", "command"),
    "doctor": ("doctor", "command"),
    "backup": ("backup", "backup"),
    "restore": ("backup", "restore"),
}

ENV_HELP = """
\b
Environment:
  AEGIS_SOCKET       control socket of aegisd   [default: the config file's `socket`, else
                     $XDG_RUNTIME_DIR/aegis/aegisd.sock, else DATA_DIR/run/aegisd.sock; either of
                     these two, if absent, gives way to /run/aegis/aegisd.sock when that exists]
  AEGIS_CONFIG       aegisd's TOML config file, read for `socket` and `data_dir`
  AEGIS_DATA_DIR     aegisd's data directory (locates the default socket) [default: the config
                     file's `data_dir`, else $XDG_DATA_HOME/aegis, else ~/.local/share/aegis]
  AEGIS_GATE_LISTEN  aegisd's gate address [default: 127.0.0.1:3100]; aegisctl asks the
                     running daemon for it (see `aegisctl status`)
\b
Secrets, passphrases and unlock keys are read from a hidden prompt, or with --secret-stdin,
--passphrase-stdin or --unlock-key-stdin from the first line of standard input (`passphrase`
reads the current one, then the new one, from two lines); never from arguments. A webhook URL
that holds a token can come from stdin too: webhook add --url-stdin.
"""


class Root(click.Group):
    """Loads each verb when it is asked for (COMMANDS), and turns ClientError into one error line plus a hint,
    exit status 1."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        where = COMMANDS.get(cmd_name)
        if where is None:
            return None
        module, attribute = where
        command: click.Command = getattr(importlib.import_module(f"aegisctl.commands.{module}"), attribute)
        return command

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except ClientError as exc:
            click.echo(f"aegisctl: error: {printable(exc.message)}", err=True)  # it may quote what an agent sent
            if exc.hint:
                click.echo(f"  next: {printable(exc.hint)}", err=True)
            sys.exit(1)


@click.group(cls=Root, epilog=ENV_HELP, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--socket", "socket_flag", metavar="PATH", help="Control socket of aegisd.")
@click.option("--config", metavar="FILE", help="aegisd's config file (for the socket path).")
@click.version_option(__version__, prog_name="aegisctl")
@click.pass_context
def root(ctx: click.Context, socket_flag: str | None, config: str | None) -> None:
    """Operate Aegis: the vault, credentials, agents and grants, and the daemon's state."""
    state = Context(socket_flag, config)
    ctx.obj = state
    ctx.call_on_close(state.close)


def main() -> None:
    root()
