"""`aegisd`: run the daemon in the foreground (it never daemonises itself)."""

# ruff: noqa: E402 - SIGHUP is ignored before the other imports, which take about 0.2 s

from __future__ import annotations

import signal

# SIGHUP's default is to exit: a `kill -HUP` (logrotate, a script) while aegisd starts, before its reload handler
# is in place, must not end it. Ignored first thing, when the command's module loads (Daemon.run installs the
# handler); only the daemon's entry points import this module.
signal.signal(signal.SIGHUP, signal.SIG_IGN)

import asyncio
import sys
from typing import Any

import click

from aegisd import __version__
from aegisd.config import ConfigError, load_config
from aegisd.control.socket import SocketError
from aegisd.errors import AegisError
from aegisd.logs import setup_logging
from aegisd.sdnotify import NotifyUnavailable, require_notify

ENV_HELP = """
\b
Settings come from, in order: flags, environment, the TOML config file, defaults.
Environment:
  AEGIS_CONFIG        config file (TOML)
  AEGIS_DATA_DIR      data directory       [default: $STATE_DIRECTORY or $XDG_DATA_HOME/aegis or
                                            ~/.local/share/aegis]
  AEGIS_SOCKET        control socket       [default: $RUNTIME_DIRECTORY/aegisd.sock or
                                            $XDG_RUNTIME_DIR/aegis/aegisd.sock or DATA_DIR/run/aegisd.sock]
  AEGIS_SOCKET_GROUP  group that may use the control socket (mode becomes 0660)
  AEGIS_SOCKET_MODE   socket mode, octal   [default: 0600]
  AEGIS_GATE_LISTEN   gate address         [default: 127.0.0.1:3100]; loopback only unless
                                           AEGIS_GATE_ALLOW_NON_LOOPBACK=1 ([gate] allow_non_loopback)
  AEGIS_POLICIES_DIR  policy files (*.yaml) [default: none: grants and scopes only]
  AEGIS_UNLOCK_KEY    unlock key for unattended start (CI); prefer a file or systemd credential
  AEGIS_KDF_MEMORY_MIB, AEGIS_KDF_ITERATIONS
                      Argon2id cost of new passphrase slots [default: 64 MiB, 3 passes]
\b
Auto-unlock, first found wins: $CREDENTIALS_DIRECTORY/aegis-unlock (systemd LoadCredential),
the file named by --unlock-key-file / unlock_key_file (must be mode 0600), AEGIS_UNLOCK_KEY.
Without one the daemon starts locked; run `aegisctl unlock`.
\b
Signals: SIGTERM/SIGINT drain and exit 0; SIGHUP reloads the config file and the policies.
"""


@click.command(epilog=ENV_HELP, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", type=click.Path(dir_okay=False), help="TOML config file.")
@click.option("--data-dir", type=click.Path(file_okay=False), help="Where the vault and ledger live.")
@click.option("--socket", type=click.Path(dir_okay=False), help="Control socket path.")
@click.option("--socket-group", help="Group allowed to use the control socket.")
@click.option("--socket-mode", help="Control socket mode, octal (0600 or 0660).")
@click.option("--gate-listen", help="Gate listen address HOST:PORT.")
@click.option("--policies-dir", type=click.Path(file_okay=False), help="Directory of policy files (*.yaml).")
@click.option("--unlock-key-file", type=click.Path(dir_okay=False), help="File holding an unlock key (0600).")
@click.option("--log-format", type=click.Choice(["human", "json"]), help="Log line format on stderr.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), help="Log level.")
@click.version_option(__version__, prog_name="aegisd")
def command(**flags: Any) -> None:
    """Run the Aegis daemon: the vault, the control socket and the gate."""
    try:  # first: under systemd without systemd-python, touch nothing and say how to fix it
        require_notify()
    except NotifyUnavailable as exc:
        click.echo(f"aegisd: error: {exc}", err=True)
        sys.exit(1)
    try:
        config = load_config(flags)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    setup_logging(config.log_format, config.log_level)
    from aegisd.daemon import Daemon, StartupError
    from aegisd.gate.server import GateError

    try:
        code = _run(Daemon(config, flags).run())
    except (StartupError, SocketError, GateError, AegisError) as exc:
        click.echo(f"aegisd: error: {exc}", err=True)
        sys.exit(1)
    sys.exit(code)


def _run(coro: Any) -> int:
    try:
        import uvloop
    except ImportError:
        return int(asyncio.run(coro))
    return int(uvloop.run(coro))


def main() -> None:
    command()
