"""Rate limits and concurrency caps for the gate: exact, state in memory only; a request costs O(1), and its
release O(requests of the same key in flight), which a refund needs (gcra.Unit)."""

from aegisd.limits.concurrency import ConcurrencyLimiter
from aegisd.limits.gcra import Quota, RateLimiter, Standing, Unit
from aegisd.limits.headers import ratelimit_headers

__all__ = ["ConcurrencyLimiter", "Quota", "RateLimiter", "Standing", "Unit", "ratelimit_headers"]
