"""Printing: aligned tables for people, JSON for scripts, errors on stderr.

Text for people passes through `printable`: ledger rows carry what agents sent (a service name is stored
percent-decoded), and a raw ESC or CSI in it would let an agent move the cursor, erase lines, retitle the
window or worse on the operator's terminal. JSON needs nothing: json.dumps escapes every control character.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import click
from google.protobuf.timestamp_pb2 import Timestamp

# C0 controls (newline and tab included: a cell is one line), DEL and C1 controls become \xNN; the Unicode
# line separators and bidirectional overrides, which can hide or reorder what is printed around them, \uNNNN.
_ESCAPES = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F, *range(0x80, 0xA0))}
_ESCAPES.update({c: f"\\u{c:04x}" for c in (0x2028, 0x2029, *range(0x202A, 0x202F), *range(0x2066, 0x206A))})


def printable(value: Any) -> str:
    """str(value) safe to print on a terminal: control characters shown as escapes, never sent."""
    return str(value).translate(_ESCAPES)


def emit_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=False))


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
