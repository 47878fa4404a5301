"""Finding whether any of many literal byte strings occurs in a body, at a cost that does not grow with
their number.

Python's `re` tries an alternation branch by branch at each position, so even a trie-shaped pattern
costs about one comparison per distinct first byte per position: ~20 ms for 64 KiB against 100
random secrets. Instead every literal of at least ANCHORED_MIN bytes registers the 8-byte words at
its first eight offsets; any occurrence then covers a word at a position divisible by 8, so looking up
the body's aligned 8-byte words (a C-speed set test over len/8 integers) finds every candidate, and
`in` confirms it. The few shorter literals (secrets under 15 bytes) go into a trie-shaped regex.
"""

from __future__ import annotations

import itertools
import re
import sys
from collections.abc import Iterable

WORD = 8
ANCHORED_MIN = 2 * WORD - 1  # long enough that an aligned word lies inside it at any offset


class LiteralSearch:
    """Answers "does any of these literals occur in data?" for a fixed set, built once."""

    def __init__(self, literals: Iterable[bytes]) -> None:
        words = {w for w in literals if w}
        self._anchors: dict[int, set[bytes]] = {}
        for literal in (w for w in words if len(w) >= ANCHORED_MIN):
            for offset in range(WORD):
                key = int.from_bytes(literal[offset:offset + WORD], sys.byteorder)
                self._anchors.setdefault(key, set()).add(literal)
        self._keys = frozenset(self._anchors)
        self._short = compile_literals(w for w in words if len(w) < ANCHORED_MIN)

    def search(self, data: bytes) -> bool:
        if self._short is not None and self._short.search(data):
            return True
        size = len(data) // WORD * WORD
        if not self._keys or not size:
            return False
        aligned = memoryview(data)[:size].cast("Q")
        if self._keys.isdisjoint(aligned):
            return False
        return any(literal in data for key in self._keys.intersection(aligned) for literal in self._anchors[key])


def compile_literals(literals: Iterable[bytes]) -> re.Pattern[bytes] | None:
    """A trie-shaped pattern matching any of `literals` (None when there are none).

    Meant for "is any of them present": where one literal is a prefix of another, only the
    shorter is kept, since any text containing the longer contains the shorter.
    """
    words = sorted({w for w in literals if w})
    if not words:
        return None
    try:
        return re.compile(_trie(words, 0))
    except RecursionError:  # pathologically nested prefixes: a flat alternation is slower but exact
        return re.compile(b"|".join(re.escape(w) for w in sorted(words, key=len, reverse=True)))


def compile_longest(literals: Iterable[bytes]) -> re.Pattern[bytes]:
    """A trie-shaped pattern whose match at any starting byte is the longest literal there (for replacing)."""
    words = sorted({w for w in literals if w})
    if not words:
        raise ValueError("compile_longest needs at least one literal")
    try:
        return re.compile(_trie_longest(words, 0))
    except RecursionError:  # a flat alternation, longest first, chooses the same matches
        return re.compile(b"|".join(re.escape(w) for w in sorted(words, key=len, reverse=True)))


def _trie_longest(words: list[bytes], depth: int) -> bytes:
    ends_here = len(words[0]) == depth
    rest = words[1:] if ends_here else words
    if not rest:
        return b""
    common = _common_prefix(rest[0], rest[-1])
    if common > depth:
        tail = re.escape(rest[0][depth:common]) + _trie_longest(rest, common)
    else:
        branches = [_trie_longest(list(group), depth) for _, group in itertools.groupby(rest, key=lambda w: w[depth])]
        tail = b"(?:" + b"|".join(branches) + b")"
    return b"(?:" + tail + b")?" if ends_here else tail  # greedy: the longer literal is tried first


def _trie(words: list[bytes], depth: int) -> bytes:
    """Pattern for the suffixes after `depth` of sorted `words`, which share their first `depth` bytes."""
    if len(words[0]) == depth:  # sorted: a word ending here comes first and covers all the others
        return b""
    common = _common_prefix(words[0], words[-1])  # sorted: the first and last bound all the others
    if common > depth:
        return re.escape(words[0][depth:common]) + _trie(words, common)
    branches = [_trie(list(group), depth) for _, group in itertools.groupby(words, key=lambda w: w[depth])]
    return b"(?:" + b"|".join(branches) + b")"


def _common_prefix(a: bytes, b: bytes) -> int:
    size = min(len(a), len(b))
    for i in range(size):
        if a[i] != b[i]:
            return i
    return size
