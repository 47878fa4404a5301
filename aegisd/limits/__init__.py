"""Rate limits and concurrency caps for the gate: exact, O(1) per request, state in memory only."""

from aegisd.limits.concurrency import ConcurrencyLimiter
from aegisd.limits.gcra import Quota, RateLimiter, Standing, Unit
from aegisd.limits.headers import ratelimit_headers

__all__ = ["ConcurrencyLimiter", "Quota", "RateLimiter", "Standing", "Unit", "ratelimit_headers"]
