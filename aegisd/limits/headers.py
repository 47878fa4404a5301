"""RateLimit-Policy and RateLimit response fields, as Structured Field lists.

Form per draft-ietf-httpapi-ratelimit-headers-10 (sections 3 and 4): a policy item is a quoted
name with `q` (quota), `w` (window, seconds) and optionally `qu` (quota unit); a service-limit
item is the same name with `r` (remaining) and `t` (seconds until more quota is available).
"""

from __future__ import annotations

from collections.abc import Sequence

from aegisd.limits.gcra import NS, Standing

CONCURRENCY_POLICY = "concurrency"


def _seconds(ns: int) -> int:
    return -(-ns // NS)


def ratelimit_headers(standings: Sequence[Standing], concurrency: tuple[int, int] | None) -> dict[str, str]:
    """The two fields for these quotas; `concurrency` is (cap, slots left) when the cap is reported."""
    named = list(zip(policy_names(standings), standings, strict=True))
    policies = [f'"{name}";q={s.quota.rate.count};w={s.quota.rate.period_seconds}' for name, s in named]
    limits = [f'"{name}";r={0 if not s.allowed else s.remaining};t={_seconds(s.wait_ns)}' for name, s in named]
    if concurrency is not None:
        cap, left = concurrency
        policies.append(f'"{CONCURRENCY_POLICY}";q={cap};qu="concurrent-requests"')
        limits.append(f'"{CONCURRENCY_POLICY}";r={max(left, 0)}')
    return {"RateLimit-Policy": ", ".join(policies), "RateLimit": ", ".join(limits)}


def policy_names(standings: Sequence[Standing]) -> list[str]:
    """Each quota's policy name, unique as the draft asks: a second `rule` (a `;` path is held to two) is `rule-2`.
    The ledger's `rate_limit=` flag names them so too."""
    names: list[str] = []
    for standing in standings:
        name = standing.quota.name
        names.append(f"{name}-2" if name in names else name)
    return names


def retry_after(refused: Sequence[Standing], concurrency_refused: bool) -> int:
    """Whole seconds (at least 1) until every refusing limit would let the request through."""
    waits = [_seconds(s.wait_ns) for s in refused]
    if concurrency_refused:
        waits.append(1)
    return max(1, *waits) if waits else 1
