"""Printing what aegisd shows only once (an agent's token, a webhook's signing secret), and saying so when it is lost.

Such a value exists nowhere else once aegisctl exits: if standard output is closed (`>&-`) or the write fails (a full
disk, an I/O error, a reader that went away), the command fails, exit 1, saying what was made and how to get a new
value, rather than ending 0 with the value gone. (The unlock key, which aegisctl makes itself, has its own fallback
in unlock_key_out.)
"""

from __future__ import annotations

import sys

import click

from aegisctl.client import ClientError
from aegisctl.output import discard_output


def print_once(text: str, undelivered: str, hint: str) -> None:
    """`text` on stdout, flushed; else a ClientError saying why, then `undelivered` (what exists now without its
    value), with `hint` (how to get a new one)."""
    if sys.stdout is None:  # fd 1 closed: click.echo would drop the text without a word
        why = "standard output is closed"
    else:
        try:
            click.echo(text)
            sys.stdout.flush()
            return
        except OSError as exc:
            why = f"cannot write output: {exc.strerror or exc}"
            discard_output()
    raise ClientError(f"{why}; {undelivered}", hint, "output_failed")
