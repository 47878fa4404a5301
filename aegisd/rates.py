"""Rate strings like `100/min`: parsed once, refused when malformed, never failing open."""

from __future__ import annotations

import re
from dataclasses import dataclass

UNITS = {"sec": 1, "s": 1, "second": 1, "min": 60, "m": 60, "minute": 60,
         "hour": 3600, "h": 3600, "day": 86400, "d": 86400}
_RATE = re.compile(r"^\s*([0-9]{1,9})\s*/\s*([a-z]+)\s*\Z")  # ASCII digits only


class RateError(ValueError):
    """The rate string is malformed; the message says the accepted form."""


@dataclass(frozen=True)
class Rate:
    count: int
    period_seconds: int

    def __str__(self) -> str:
        unit = {1: "sec", 60: "min", 3600: "hour", 86400: "day"}[self.period_seconds]
        return f"{self.count}/{unit}"


def parse_rate(text: str) -> Rate:
    """Parse `N/sec|min|hour|day` (N ≥ 1)."""
    match = _RATE.match(text.lower())
    if not match or match.group(2) not in UNITS:
        raise RateError(f"rate {text!r} must look like N/sec, N/min, N/hour or N/day (e.g. 100/min)")
    count = int(match.group(1))
    if count < 1:
        raise RateError(f"rate {text!r} must allow at least 1 request")
    return Rate(count, UNITS[match.group(2)])
