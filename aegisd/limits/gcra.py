"""GCRA, the generic cell rate algorithm: an exact sliding-window rate limit in one integer per key.

For a rate of N requests per T seconds, each allowed request moves the key's "theoretical arrival
time" (TAT) forward by T/N. A request is allowed while the TAT stays within T of now: a burst of N
passes, then one more every T/N, and both the remaining count and the wait until the next request
passes follow exactly from the TAT. Times are scaled by N so every step is integer arithmetic.
Checking and consuming are separate calls so a caller can check every limit before consuming any.
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Callable, Hashable
from typing import NamedTuple

from aegisd.rates import Rate

NS = 1_000_000_000
_PRUNE_ABOVE = 10_000  # keys; past this, fully restored ones are forgotten (same as never seen)


class Quota(NamedTuple):
    """One limit that applies to a request: its RateLimit policy name, whose quota, and the rate.

    Tuples rather than frozen dataclasses: a few are built per request, and tuples build fastest.
    """

    name: str  # "credential", "agent" or "rule"
    key: Hashable  # credential id, agent id or rule ref
    rate: Rate
    enforced: bool = True  # False for a dry-run policy's rule: reported, never refused


class Standing(NamedTuple):
    """A quota as one request finds it, before anything is consumed."""

    quota: Quota
    allowed: bool
    remaining: int  # requests that would pass right now, this one included
    wait_ns: int  # refused: until this request would pass; allowed: until one more unit returns (0 if full)


class Unit:
    """One unit a request consumed and may still give back: where it ends on its key's timeline.

    The units of a key stack up on that timeline in the order they were taken. When one is given back, those
    taken after it move down by what it gave back, so each still covers its own slice of the key's debt and
    no later refund can return time the clock has already restored (an earlier refund moved it away).
    """

    __slots__ = ("ends", "key", "quota")

    def __init__(self, quota: Quota, key: tuple[str, Hashable, int, int], ends: int) -> None:
        self.quota = quota
        self.key = key
        self.ends = ends


def _suspend_counting_clock() -> Callable[[], int]:
    """The rate limits' clock in ns: it goes on while the machine is suspended, so a quota refills over a laptop's
    night asleep and a Retry-After stays true across one (time.monotonic stops in suspend on Linux and macOS);
    like it, it never steps with the wall clock. Linux's CLOCK_BOOTTIME; macOS's CLOCK_MONOTONIC, which there
    counts sleep."""
    if hasattr(time, "CLOCK_BOOTTIME"):
        return functools.partial(time.clock_gettime_ns, time.CLOCK_BOOTTIME)
    if sys.platform == "darwin":
        return functools.partial(time.clock_gettime_ns, time.CLOCK_MONOTONIC)
    return time.monotonic_ns


LIMITS_CLOCK = _suspend_counting_clock()


class RateLimiter:
    def __init__(self, clock: Callable[[], int] = LIMITS_CLOCK) -> None:
        self.clock = clock
        self._tat: dict[tuple[str, Hashable, int, int], int] = {}
        # Per key, the units of requests still in flight, oldest first: as many as requests in flight.
        self._held: dict[tuple[str, Hashable, int, int], list[Unit]] = {}

    def standing(self, quota: Quota, now_ns: int) -> Standing:
        """Whether one more request fits now, with the exact remaining count and wait; changes nothing."""
        rate = quota.rate
        n, seconds = rate.count, rate.period_seconds
        period = seconds * NS
        now = now_ns * n
        capacity = period * n
        tat = self._tat.get((quota.name, quota.key, n, seconds), 0)
        used = tat - now if tat > now else 0  # debt, in scaled ns, 0..capacity
        if used + period > capacity:
            return Standing(quota, False, 0, -(-(used + period - capacity) // n))
        if not used:  # nothing owed, the usual case below the limit: the whole burst is there
            return Standing(quota, True, n, 0)
        remaining = (capacity - used) // period
        return Standing(quota, True, remaining, -(-(used - (capacity - (remaining + 1) * period)) // n))

    def consume(self, quota: Quota, now_ns: int) -> Unit:
        """Use one unit; call only after every quota of the request was found to have room. The Unit goes to
        refund (the request was refused later) or settle (it was not)."""
        rate = quota.rate
        n, seconds = rate.count, rate.period_seconds
        # The rate is part of the key: changing a limit starts it afresh instead of reinterpreting old state.
        key = (quota.name, quota.key, n, seconds)
        tat = self._tat.get(key)
        if tat is None:
            if len(self._tat) >= _PRUNE_ABOVE:
                self._prune(now_ns)
            tat = 0
        now = now_ns * n
        ends = self._tat[key] = (tat if tat > now else now) + seconds * NS
        unit = Unit(quota, key, ends)
        held = self._held.get(key)
        if held is None:
            self._held[key] = [unit]
        else:
            held.append(unit)
        return unit

    def refund(self, unit: Unit, now_ns: int) -> None:
        """Give back what is left of `unit`: the request that used it was refused by a later step.

        Only the part time has not restored yet: a unit taken an hour ago under 10/hour is already back, and
        giving it back again would let an agent that holds requests open bank quota past the burst.
        """
        if not self._settle(unit):
            return  # given back or settled already
        tat = self._tat.get(unit.key)
        now = now_ns * unit.quota.rate.count
        left = min(unit.ends - now, unit.quota.rate.period_seconds * NS)
        if tat is None or left <= 0:
            return
        self._tat[unit.key] = max(tat - left, now)
        for later in self._held.get(unit.key, ()):
            if later.ends > unit.ends:
                later.ends -= left

    def settle(self, unit: Unit) -> None:
        """The request is over and keeps its unit: it can no longer be given back."""
        self._settle(unit)

    def _settle(self, unit: Unit) -> bool:
        held = self._held.get(unit.key)
        if held is None or unit not in held:
            return False
        held.remove(unit)
        if not held:
            del self._held[unit.key]
        return True

    def _prune(self, now_ns: int) -> None:
        self._tat = {key: tat for key, tat in self._tat.items() if tat > now_ns * key[2]}
