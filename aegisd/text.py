"""Words in aegisd's messages, shared so that every module says a count the same way."""

from __future__ import annotations


def plural(n: int, noun: str) -> str:
    """`1 row`, `2 rows`: the count and its noun (regular plurals only)."""
    return f"{n} {noun}{'' if n == 1 else 's'}"
