"""`aegisctl`: the root command, global options and error handling (exit 0 ok, 1 failed, 2 usage)."""

from __future__ import annotations

import contextlib
import errno
import importlib
import io
import sys

import click

from aegisctl import __version__, output
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
            try:
                result = super().invoke(ctx)
            except BaseException as exc:
                _flush_output(quietly=not _clean_exit(exc))  # a failing command has said what failed
                raise
            _flush_output()  # what is still buffered (ledger export's rows) fails here, reported, not at exit
            return result
        except ClientError as exc:
            click.echo(f"aegisctl: error: {printable(exc.message)}", err=True)  # it may quote what an agent sent
            if exc.hint:
                click.echo(f"  next: {printable(exc.hint)}", err=True)
            sys.exit(1)
        except OSError as exc:
            output_failed(exc)
            raise


def _clean_exit(exc: BaseException) -> bool:
    if isinstance(exc, SystemExit):
        return exc.code in (0, None)
    return isinstance(exc, click.exceptions.Exit) and exc.exit_code == 0


def _flush_output(quietly: bool = False) -> None:
    """Flush stdout now, so a write that fails is reported (output_failed), not printed as "Exception ignored" by
    Python's own flush at exit; `quietly`: drop what cannot be written instead."""
    if sys.stdout is None:
        return
    try:
        sys.stdout.flush()
    except OSError:
        if not quietly:
            raise
        output.discard_output()


def output_failed(exc: OSError) -> None:
    """A write to standard output that failed (a full disk, an I/O error): one error line, exit 1, not a traceback.
    Returns for any other OSError, and for a broken pipe (`| head`), which click ends quietly with exit 1."""
    failure = output.output_failure()
    if failure is None or exc.errno == errno.EPIPE or failure.errno == errno.EPIPE:
        return
    output.discard_output()
    with contextlib.suppress(OSError):  # stderr may be just as full
        click.echo(f"aegisctl: error: cannot write output: {failure.strerror or failure}", err=True)
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
    _tolerant_output()
    try:
        _check_argv(sys.argv[1:])
    except click.UsageError as exc:
        exc.show()
        sys.exit(exc.exit_code)
    output.watch_output()
    try:
        root()
    except OSError as exc:  # root's own --help or --version, printed before Root.invoke
        output_failed(exc)
        raise


def _tolerant_output() -> None:
    """Characters the output's encoding cannot hold (a ledger row's `€` under PYTHONIOENCODING=latin-1, say)
    printed as \\u20ac-style escapes rather than failing the command with a traceback. click.echo writes to
    these same streams (click wraps one only when its encoding is ASCII, and then with errors="replace")."""
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="backslashreplace")


def _check_argv(args: list[str]) -> None:
    """Every argument must be UTF-8 text, as everything aegisctl sends is: checked before anything is read
    (a secret on stdin) or sent. Bytes that are not UTF-8 reach Python as lone surrogates (surrogateescape),
    which no UTF-8 encoder takes. The error names where the argument is, never what it holds: it may be a
    secret typed where it does not belong."""
    for position, arg in enumerate(args, 1):
        if not _utf8(arg):
            raise click.UsageError(f"{_where(args, position)} is not UTF-8 text (nothing was sent)")


def _where(args: list[str], position: int) -> str:
    """"the value of --opt" when the argument is an option's value, else "argument N" (counted after aegisctl)."""
    arg = args[position - 1]
    option, equals, _ = arg.partition("=")
    if arg.startswith("--") and equals and _utf8(option):
        return f"the value of {option} (argument {position})"
    previous = args[position - 2] if position > 1 else ""
    if previous.startswith("-") and previous != "--" and not arg.startswith("-") and _utf8(previous):
        return f"argument {position} (after {previous})"
    return f"argument {position}"


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
