"""Times for --since/--until: ISO 8601 (`2026-11-26`, `2026-11-26T10:00:00Z`) or ago (`15m`, `2h`, `7d`)."""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime, timedelta

import click

_AGO = re.compile(r"^(\d{1,9})([smhdw])\Z")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# Every time given is sent as a protobuf Timestamp (years 1 to 9999, UTC) and shown or judged as a datetime,
# possibly in another timezone: a day's margin at each end keeps its local date within years 1 to 9999 in
# every zone, so no command has to handle a time it cannot send, print or judge.
FIRST_MS = (datetime(1, 1, 2, tzinfo=UTC) - EPOCH) // timedelta(milliseconds=1)
LAST_MS = (datetime(9999, 12, 31, tzinfo=UTC) - EPOCH) // timedelta(milliseconds=1) - 1
RANGE = "0001-01-02 to 9999-12-30, UTC"


class TimeSpec(click.ParamType):  # type: ignore[type-arg]
    """A click type giving epoch milliseconds, refusing a time outside FIRST_MS..LAST_MS as a usage error."""

    name = "time"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        text = str(value).strip()
        match = _AGO.match(text.lower())
        if match:
            ms = int((time.time() - int(match.group(1)) * _UNITS[match.group(2)]) * 1000)
        else:
            try:
                parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
            except ValueError:
                self.fail(f"{value!r} is neither a time like 2026-11-26T10:00:00Z nor an age like 15m, 2h, 7d (that "
                          "long ago)", param, ctx)
            if parsed.tzinfo is None:
                parsed = parsed.replace(tzinfo=UTC)
            ms = (parsed - EPOCH) // timedelta(milliseconds=1)  # exact: a float timestamp can lose the last ms
        if not FIRST_MS <= ms <= LAST_MS:
            self.fail(f"{value!r} is outside the times aegisctl handles ({RANGE})", param, ctx)
        return ms
