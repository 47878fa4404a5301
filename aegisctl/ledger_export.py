"""Writing exported ledger rows as CSV, a JSON array or JSON lines, one row at a time.

Memory stays constant however many rows arrive. CSV goes through the csv module (quotes, commas and
newlines escaped) and neutralises spreadsheet formulas: a cell starting with =, +, -, @, tab or CR
gets a leading apostrophe, so a path or agent name chosen by an attacker cannot run in Excel.
"""

from __future__ import annotations

import csv
import json
import sys
import time
from collections.abc import Callable
from typing import IO, Any, Protocol

import click

COLUMNS = ("id", "time", "request_id", "agent", "credential", "service", "method", "path", "target_host",
           "decision", "reason", "status", "duration_ms", "bytes_in", "bytes_out", "kind", "flags", "detail")
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")
FORMATS = ("csv", "json", "jsonl")


def neutralise(value: Any) -> Any:
    """A text cell a spreadsheet would evaluate, made inert with a leading apostrophe."""
    if isinstance(value, str) and value.startswith(FORMULA_PREFIXES):
        return "'" + value
    return value


class RowWriter(Protocol):
    def write(self, row: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class CsvRows:
    def __init__(self, out: IO[str], cell: Callable[[Any], Any] | None = None) -> None:
        self._writer = csv.writer(out)
        self._writer.writerow(COLUMNS)
        self._cell = cell  # applied to every value first (escaping control characters for a terminal)

    def write(self, row: dict[str, Any]) -> None:
        cell = self._cell
        values = [row[column] for column in COLUMNS] if cell is None else [cell(row[column]) for column in COLUMNS]
        self._writer.writerow([neutralise(value) for value in values])

    def close(self) -> None:
        pass


class JsonArrayRows:
    """A JSON array written incrementally: `[`, rows separated by commas, `]`."""

    def __init__(self, out: IO[str]) -> None:
        self._out = out
        self._first = True
        out.write("[")

    def write(self, row: dict[str, Any]) -> None:
        self._out.write(("\n" if self._first else ",\n") + json.dumps(row))
        self._first = False

    def close(self) -> None:
        self._out.write("]\n" if self._first else "\n]\n")


class JsonLines:
    def __init__(self, out: IO[str]) -> None:
        self._out = out

    def write(self, row: dict[str, Any]) -> None:
        self._out.write(json.dumps(row) + "\n")

    def close(self) -> None:
        pass


def row_writer(fmt: str, out: IO[str], cell: Callable[[Any], Any] | None = None) -> RowWriter:
    """The writer for one of FORMATS; it starts writing (CSV header, JSON `[`) at once. `cell` transforms
    each CSV value first (the JSON formats escape control characters themselves)."""
    if fmt == "csv":
        return CsvRows(out, cell)
    return JsonArrayRows(out) if fmt == "json" else JsonLines(out)


class Progress:
    """A row counter on stderr, redrawn at most five times a second; silent unless stderr is a terminal."""

    def __init__(self, enabled: bool | None = None) -> None:
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.count = 0
        self._drawn = 0.0

    def advance(self, rows: int) -> None:
        self.count += rows
        now = time.monotonic()
        if self.enabled and now - self._drawn >= 0.2:
            self._drawn = now
            click.echo(f"\rexported {self.count:,} rows", err=True, nl=False)

    def finish(self) -> None:
        if self.enabled:
            click.echo(f"\rexported {self.count:,} rows", err=True)
