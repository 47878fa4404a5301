"""Human durations for --ttl: 45s, 30m, 12h, 90d, 2w (and plain seconds; `m` is minutes)."""

from __future__ import annotations

import re

import click

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION = re.compile(r"^(\d{1,9})([smhdw]?)\Z")


class Duration(click.ParamType):  # type: ignore[type-arg]
    """A click type that turns `90d` into seconds; `never` means 0 (no expiry)."""

    name = "duration"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        text = str(value).strip().lower()
        if text == "never":
            return 0
        match = _DURATION.match(text)
        if not match:
            self.fail(f"{value!r} is not a duration like 45s, 30m, 12h, 90d or 2w (or 'never')", param, ctx)
        seconds = int(match.group(1)) * _UNITS[match.group(2) or "s"]
        if seconds == 0:  # 0 is how the API says "no expiry": an operator meaning "now" must not get "never"
            self.fail(f"{value!r} is no time at all; give a positive duration, or 'never' for no expiry", param, ctx)
        return seconds
