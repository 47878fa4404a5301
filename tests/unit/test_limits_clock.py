"""The rate limits' clock counts suspended time (a quota refills over a laptop's night asleep) and never steps."""

from __future__ import annotations

import sys
import time

from aegisd.gate.admission import GateLimits
from aegisd.limits.gcra import LIMITS_CLOCK, RateLimiter


def test_the_limits_run_on_a_clock_that_counts_suspend() -> None:
    if sys.platform.startswith("linux"):  # CLOCK_BOOTTIME = CLOCK_MONOTONIC + time suspended: never behind it
        monotonic = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        assert LIMITS_CLOCK() >= monotonic
        assert abs(LIMITS_CLOCK() - time.clock_gettime_ns(time.CLOCK_BOOTTIME)) < 10**9
    first = LIMITS_CLOCK()
    assert LIMITS_CLOCK() >= first
    assert RateLimiter().clock is LIMITS_CLOCK and GateLimits(4).rates.clock is LIMITS_CLOCK
