"""Reading passphrases and secrets: a hidden prompt on a terminal, or the first line of stdin.

Never from argv, where any process on the machine can read them.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Callable
from typing import BinaryIO

import click

from aegisctl.client import ClientError
from aegisctl.output import printable

# aegisd's limit on a credential's secret (MAX_SECRET_BYTES in aegisd/vault/credentials.py; aegisctl imports
# only the API stubs from aegisd). Checked here as well, in the daemon's words, because a secret over gRPC's
# 4 MiB message limit never reaches the daemon's own check: the client would only see gRPC's refusal.
MAX_SECRET_BYTES = 16384
# The longest line read from stdin for anything without a limit of its own (a passphrase, an unlock key): far past
# any real one, and what bounds the memory a stream with no line break (`< /dev/zero`) can take.
MAX_LINE_BYTES = 65536


def stdin_line(what: str, flag: str, max_bytes: int = MAX_LINE_BYTES, too_long: Exception | None = None) -> str:
    """Stdin's next line without its line break: a usage error, never quoting it, if it is empty or not UTF-8.

    At most `max_bytes` (UTF-8) are taken, however long the line or endless the stream: a longer one is `too_long`,
    else a usage error, neither quoting it; nothing was sent.

    Read as bytes and decoded as UTF-8 here, whatever the locale or PYTHONIOENCODING says: decoded in another
    encoding, the same bytes would be a different passphrase or secret, sent without a word. A line that is
    not UTF-8 ends here, before anything is sent.

    When stdin is a terminal (the flag given by hand, or a script run by hand), the line would be typed with
    the terminal's echo on, on screen for anyone to see and in the scrollback: it is asked for at a hidden
    prompt instead, as without the flag."""
    if on_terminal():
        return _hidden_prompt(what, flag)
    not_utf8 = f"{flag}: standard input is not UTF-8 text; aegisctl reads it as UTF-8 (nothing was sent)"
    raw = _stdin_bytes().readline(max_bytes + 3)  # the line, its \r\n, and one byte more to tell one too long
    if len(raw.rstrip(b"\r\n")) > max_bytes:
        raise too_long or click.UsageError(f"{flag}: the {what} on standard input is longer than {max_bytes} bytes, "
                                           "more than any real one (nothing was sent)")
    try:
        value = raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError:
        raise click.UsageError(not_utf8) from None
    if not value:
        raise click.UsageError(f"{flag}: standard input was empty; pipe the {what} in, one line")
    return value


def _stdin_bytes() -> BinaryIO:
    """Stdin's byte stream; an empty one when fd 0 is closed (sys.stdin is None), which reads as empty input."""
    stream = getattr(sys.stdin, "buffer", None)
    return stream if stream is not None else io.BytesIO()


def on_terminal() -> bool:
    """Whether stdin is a terminal: a person, who can be asked at a hidden prompt."""
    return sys.stdin is not None and sys.stdin.isatty()


def _hidden_prompt(what: str, flag: str, text: str = "") -> str:
    """The value typed at a prompt that does not echo it; the prompt says `text`, or else names `what`."""
    if not on_terminal():
        raise click.UsageError(f"no terminal to prompt for the {what} on; pipe it in with {flag}")
    try:
        value = str(click.prompt(text or what[:1].upper() + what[1:], hide_input=True, show_default=False))
        value.encode("utf-8")
    except (UnicodeDecodeError, UnicodeEncodeError):
        raise click.UsageError(f"the {what} typed is not UTF-8 text; set the terminal to UTF-8, or pipe it "
                               f"in with {flag} (nothing was sent)") from None
    return value


def read_secret(what: str, from_stdin: bool, *, flag: str = "--secret-stdin", max_bytes: int | None = None) -> str:
    """The secret from stdin's first line (scripts) or a hidden prompt (people, and a *-stdin flag whose stdin is
    a terminal); with `max_bytes`, one longer than that (UTF-8) is refused before it is sent, with a message
    that never quotes it."""
    limit = MAX_LINE_BYTES if max_bytes is None else max_bytes
    too_long = None if max_bytes is None else ClientError(f"the secret is longer than {max_bytes} bytes",
                                                          reason="invalid_argument")
    value = stdin_line(what, flag, limit, too_long) if from_stdin else _hidden_prompt(what, flag)
    if too_long is not None and len(value.encode()) > limit:
        raise too_long
    return value


def read_new_passphrase(what: str, from_stdin: bool, flag: str, weakness: Callable[[str], str | None]) -> str:
    """A new passphrase: from stdin's first line as read_secret reads it, or typed twice at a hidden prompt. On a
    terminal `weakness` (aegisd's rule, asked of it: the message if the passphrase fails it, else None) is
    checked after the first entry, so a weak one is asked for again at once, as a mismatch is, rather than
    refused after it was typed twice. From stdin it is not: the call that sends it fails on a weak one, exit 1,
    as scripts expect."""
    if from_stdin and not on_terminal():
        return stdin_line(what, flag)
    while True:
        value = _hidden_prompt(what, flag)
        problem = weakness(value)
        if problem is not None:
            click.echo(f"Error: {printable(problem)}. Try another.", err=True)
            continue
        if _hidden_prompt(what, flag, text="Repeat to confirm") == value:
            return value
        click.echo("Error: The two entered values do not match.", err=True)


def confirm_destructive(question: str, yes: bool) -> None:
    """Ask on a terminal; in scripts require --yes rather than guessing."""
    if yes:
        return
    if not sys.stdin.isatty():
        raise click.UsageError(f"{question} Pass --yes to confirm when not on a terminal.")
    if not click.confirm(question, default=False):
        raise click.exceptions.Exit(1)
