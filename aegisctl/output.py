"""Printing: aligned tables for people, JSON for scripts, errors on stderr.

Text for people passes through `printable`: ledger rows carry what agents sent (a service name is stored
percent-decoded), and a raw ESC or CSI in it would let an agent move the cursor, erase lines, retitle the
window or worse on the operator's terminal. JSON needs nothing: json.dumps escapes every control character.
"""

from __future__ import annotations

import io
import json
import os
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import click
from google.protobuf.timestamp_pb2 import Timestamp

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

class _WatchedOutput(io.FileIO):
    """Standard output's file descriptor as sys.stdout's lowest layer, keeping the error of a write that failed (a
    full disk, an I/O error), so that Root.invoke can tell it from any other OSError."""

    failure: OSError | None = None

    def write(self, data: ReadableBuffer, /) -> int:
        try:
            return super().write(data)
        except OSError as exc:
            self.failure = exc
            raise


_watched: _WatchedOutput | None = None


def watch_output() -> None:
    """Put sys.stdout on a _WatchedOutput, with the same encoding, error handler and buffering; done once at start,
    before anything is printed. Nothing to watch when fd 1 is closed (sys.stdout is None)."""
    global _watched
    stream = sys.stdout
    if not isinstance(stream, io.TextIOWrapper):
        return
    try:
        fd = stream.fileno()
        stream.flush()
        raw = _WatchedOutput(fd, "w", closefd=False)
    except (OSError, ValueError):
        return
    # Unbuffered (PYTHONUNBUFFERED, -u), Python writes text straight to the file descriptor: so does this one.
    layer = io.BufferedWriter(raw) if isinstance(stream.buffer, io.BufferedWriter) else raw
    sys.stdout = io.TextIOWrapper(layer, encoding=stream.encoding, errors=stream.errors, newline="\n",
                                  line_buffering=stream.line_buffering, write_through=stream.write_through)
    _watched = raw


def output_failure() -> OSError | None:
    """The error of the write to standard output that failed, if one did."""
    return _watched.failure if _watched is not None else None


def discard_output() -> None:
    """After a failed write, point fd 1 at /dev/null: what is still buffered then goes nowhere when Python flushes
    it at exit, rather than failing again with an "Exception ignored" message."""
    if sys.stdout is None:  # fd 1 was closed at start: it may be some other file's descriptor now
        return
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(null, sys.stdout.fileno())
        finally:
            os.close(null)
    except (OSError, ValueError):
        pass


def printable(value: Any) -> str:
    """str(value) safe to print on a terminal: every character str.isprintable() refuses shown as an escape, never
    sent. That is controls (newline and tab too: a cell is one line), the line separators, and format characters:
    bidi overrides, which reorder what is printed around them, and zero-width ones, which make `git\u200bhub` read
    as `github`. aegisd's log escapes the same characters."""
    text = str(value)
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else _escape(ord(char)) for char in text)


def _escape(code: int) -> str:
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def json_text(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=False)


def emit_json(value: Any) -> None:
    click.echo(json_text(value))


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[printable(c) for c in headers], *[[("-" if c in (None, "") else printable(c)) for c in r] for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for row in cells:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def fields(pairs: Sequence[tuple[str, Any]]) -> None:
    width = max(len(k) for k, _ in pairs)
    for key, value in pairs:
        click.echo(f"{printable(key) + ':':{width + 1}} {'-' if value in (None, '') else printable(value)}")


def iso(ts: Timestamp | None) -> str | None:
    if ts is None or (ts.seconds == 0 and ts.nanos == 0):
        return None
    return datetime.fromtimestamp(ts.ToMilliseconds() / 1000, UTC).isoformat(timespec="seconds").replace(
        "+00:00", "Z")


def iso_ms(ms: int) -> str:
    """Epoch milliseconds as ISO 8601 UTC with milliseconds, the ledger's time format."""
    stamp = datetime.fromtimestamp(ms / 1000, UTC)
    return f"{stamp:%Y-%m-%dT%H:%M:%S}.{ms % 1000:03d}Z"


def duration(seconds: float) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{days}d"] if days else []
    if days or hours:
        parts.append(f"{hours}h")
    parts.append(f"{minutes}m" if days or hours or minutes else f"{secs}s")
    return " ".join(parts)
