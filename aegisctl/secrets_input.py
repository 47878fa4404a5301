"""Reading passphrases and secrets: a hidden prompt on a terminal, or the first line of stdin.

Never from argv, where any process on the machine can read them.
"""

from __future__ import annotations

import sys

import click

from aegisctl.client import ClientError

# aegisd's limit on a credential's secret (MAX_SECRET_BYTES in aegisd/vault/credentials.py; aegisctl imports
# only the API stubs from aegisd). Checked here as well, in the daemon's words, because a secret over gRPC's
# 4 MiB message limit never reaches the daemon's own check: the client would only see gRPC's refusal.
MAX_SECRET_BYTES = 16384


def read_secret(what: str, from_stdin: bool, *, confirm: bool = False, flag: str = "--secret-stdin",
                max_bytes: int | None = None) -> str:
    """The secret from stdin's first line (scripts) or a hidden prompt (people); with `max_bytes`, one
    longer than that (UTF-8) is refused before it is sent, with a message that never quotes it."""
    if from_stdin:
        line = sys.stdin.readline()
        value = line.rstrip("\r\n")
        if not value:
            raise click.UsageError(f"{flag}: standard input was empty; pipe the {what} in, one line")
    else:
        if not sys.stdin.isatty():
            raise click.UsageError(f"no terminal to prompt for the {what} on; pipe it in with {flag}")
        value = str(click.prompt(what.capitalize(), hide_input=True,
                                 confirmation_prompt=confirm and "Repeat to confirm", show_default=False))
    if max_bytes is not None and len(value.encode()) > max_bytes:
        raise ClientError(f"the secret is longer than {max_bytes} bytes", reason="invalid_argument")
    return value


def confirm_destructive(question: str, yes: bool) -> None:
    """Ask on a terminal; in scripts require --yes rather than guessing."""
    if yes:
        return
    if not sys.stdin.isatty():
        raise click.UsageError(f"{question} Pass --yes to confirm when not on a terminal.")
    if not click.confirm(question, default=False):
        raise click.exceptions.Exit(1)
