"""Finding whether any of many literal byte strings occurs in a body, at a cost that does not grow with
their number.

Python's `re` tries an alternation branch by branch at each position (~20 ms for 64 KiB against 100
random secrets), and even a C-speed set lookup per aligned 8-byte word makes a Python integer of each
word (~0.6 ms). Hyperscan (Vectorscan) compiles the whole set into one SIMD literal matcher that reads
64 KiB in a few tens of microseconds whatever the number of literals, and calls back only where one occurs.
"""

from __future__ import annotations

import itertools
import re
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import hyperscan

# Hyperscan refuses patterns past ~16 KB and compiles long literals more slowly; a longer literal
# registers its first FRAGMENT bytes and is confirmed where they occur, which only its own text does.
FRAGMENT = 64
# What a scan calls for each occurrence: (literal index, 0, end offset, 0, context); true stops the scan.
MatchHandler = Callable[[int, int, int, int, Any], bool | None]


class LiteralScanner:
    """One compiled Hyperscan literal database, scanned from any thread.

    Hyperscan releases the GIL while it scans, and its scratch space serves one scan at a time, so each
    thread gets its own (a shared one would fail with ScratchInUseError when two threads overlap).
    """

    def __init__(self, literals: Sequence[bytes]) -> None:
        if not literals or any(not w or b"\0" in w for w in literals):
            raise ValueError("Hyperscan's literal API takes non-empty literals without NUL bytes")
        self._load(list(literals), literal=True)

    def _load(self, expressions: list[bytes], **options: Any) -> None:
        database = hyperscan.Database()
        # Distinct ids: with one id shared by thousands of literals, compiling takes seconds, not milliseconds.
        database.compile(expressions=expressions, ids=list(range(len(expressions))), **options)
        self._local = threading.local()
        self._database = database  # last: a scan that finds it finds everything it needs

    def scan(self, data: bytes, on_match: MatchHandler, context: object = None) -> bool:
        """Calls `on_match` for each occurrence; False when it stopped the scan by returning true."""
        scratch = getattr(self._local, "scratch", None)
        if scratch is None:
            scratch = self._local.scratch = hyperscan.Scratch(self._database)
        try:
            self._database.scan(data, on_match, context=context, scratch=scratch)
        except hyperscan.ScanTerminated:
            return False
        return True


class PatternScanner(LiteralScanner):
    """The same for regular expressions in Hyperscan's dialect (no lookaround, no backreferences; `^` and `$` are
    the data's ends), each reporting its first match only: linear in the data whatever it holds, and GIL-free.

    Compiled at its first scan, not when made: the patterns are fixed (their tests compile them), and a daemon that
    never sees a body they apply to (most never get a multipart one) then pays neither the compile (0.1 s for the
    multipart patterns, a fifth of aegisd's start) nor its memory; the first such body waits for it once."""

    def __init__(self, patterns: Sequence[bytes]) -> None:
        self._patterns = list(patterns)
        self._compiling = threading.Lock()

    def scan(self, data: bytes, on_match: MatchHandler, context: object = None) -> bool:
        if not hasattr(self, "_database"):
            with self._compiling:
                if not hasattr(self, "_database"):
                    self._load(self._patterns, flags=hyperscan.HS_FLAG_SINGLEMATCH)
        return super().scan(data, on_match, context)

    def search(self, data: bytes) -> bool:
        """Whether any of the patterns matches somewhere in `data`."""
        return not self.scan(data, stop_scan)


def stop_scan(*_: object) -> bool:
    """A match handler that ends the scan at the first match, for "does any occur?"."""
    return True


class LiteralSearch:
    """Answers "does any of these literals occur in data?" for a fixed set, built once."""

    def __init__(self, literals: Iterable[bytes]) -> None:
        words = sorted({w for w in literals if w})
        heads: dict[bytes, list[bytes]] = {}
        for word in words:
            if b"\0" not in word:
                heads.setdefault(word[:FRAGMENT], []).append(word)
        self._heads = tuple(heads)
        self._candidates = tuple(tuple(found) for found in heads.values())
        self._scanner = LiteralScanner(self._heads) if heads else None
        # Hyperscan's Python binding hands literals over as C strings, so one with a NUL byte (a binary
        # secret, never any of its encoded forms) goes into a regex instead.
        self._with_nul = compile_literals(w for w in words if b"\0" in w)

    def search(self, data: bytes) -> bool:
        if self._with_nul is not None and self._with_nul.search(data):
            return True
        return self._scanner is not None and not self._scanner.scan(data, self._confirm, data)

    def _confirm(self, index: int, _from: int, end: int, _flags: int, data: bytes) -> bool:
        """Whether a literal registered under this head starts where the head does (stops the scan)."""
        start = end - len(self._heads[index])
        return any(data.startswith(word, start) for word in self._candidates[index])


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
