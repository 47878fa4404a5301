"""Reading passphrases and secrets: a hidden prompt on a terminal, or the first line of stdin.

Never from argv, where any process on the machine can read them.
"""

from __future__ import annotations

import sys

import click


def read_secret(what: str, from_stdin: bool, *, confirm: bool = False, flag: str = "--secret-stdin") -> str:
    """The secret from stdin's first line (scripts) or a hidden prompt (people)."""
    if from_stdin:
        line = sys.stdin.readline()
        value = line.rstrip("\r\n")
        if not value:
            raise click.UsageError(f"{flag}: standard input was empty; pipe the {what} in, one line")
        return value
    if not sys.stdin.isatty():
        raise click.UsageError(f"no terminal to prompt for the {what} on; pipe it in with {flag}")
    value = click.prompt(what.capitalize(), hide_input=True, confirmation_prompt=confirm and "Repeat to confirm",
                         show_default=False)
    return str(value)


def confirm_destructive(question: str, yes: bool) -> None:
    """Ask on a terminal; in scripts require --yes rather than guessing."""
    if yes:
        return
    if not sys.stdin.isatty():
        raise click.UsageError(f"{question} Pass --yes to confirm when not on a terminal.")
    if not click.confirm(question, default=False):
        raise click.exceptions.Exit(1)
